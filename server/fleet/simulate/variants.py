"""Model variants a simulated device can run: what each costs per operating point, per class.

A variant stands for one bundle of the catalogue (named by its manifest sha256, as a device's
status names what it runs). Its latency per operating point is given for a device of speed 1.0;
a device of class c runs it `CLASS_SPEED[c]` times slower (or faster below 1.0). Tests turn a
real bundle into a variant with `sim_variant_from_manifest`: the latency then follows each
operating point's `expected_macs`, as the coordinator's own predictions do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from edgefleet.agent.bundle import ManifestBody
from edgefleet.agent.protocol.ids import is_valid_id

# Latency multiplier per device class of the four simulated boards (workload.BOARDS).
CLASS_SPEED: Final[dict[str, float]] = {
    "rpi5": 1.0,
    "rpi4": 2.5,
    "jetson-orin-nano": 0.6,
    "x86-avx2": 0.4,
}

# Share of frames leaving at the first exit, from the accurate point to the fast one (the
# spread of workload.POINTS), when a variant does not say.
_SHARE_ACCURATE: Final = 0.19
_SHARE_FAST: Final = 0.55
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


def default_exit_shares(points: int) -> tuple[float, ...]:
    """A ramp of first-exit shares over `points` operating points, accurate to fast."""
    if points == 1:
        return (_SHARE_ACCURATE,)
    step = (_SHARE_FAST - _SHARE_ACCURATE) / (points - 1)
    return tuple(round(_SHARE_ACCURATE + i * step, 4) for i in range(points))


@dataclass(frozen=True)
class SimVariant:
    """One bundle as simulated devices run it."""

    manifest_sha256: str  # what the device reports in Status.bundle_sha256 while running it
    model_id: str
    version: int
    point_ms: tuple[float, ...]  # p50 per operating point (accurate -> fast), speed 1.0
    default_point: int
    early_exit_share: tuple[float, ...] = ()  # per point; () means default_exit_shares

    def __post_init__(self) -> None:
        name = f"variant {self.manifest_sha256[:12]!r}"
        if not _SHA256.fullmatch(self.manifest_sha256):
            raise ValueError(
                f"variant manifest_sha256 {self.manifest_sha256!r} is not 64 lowercase hex digits"
            )
        if not is_valid_id(self.model_id):
            raise ValueError(f"{name}: model_id {self.model_id!r} is not a valid id")
        if self.version < 1:
            raise ValueError(f"{name}: version must be >= 1, got {self.version}")
        if not self.point_ms:
            raise ValueError(f"{name}: point_ms needs at least one operating point")
        if not all(0 < ms < 1e6 for ms in self.point_ms):
            raise ValueError(f"{name}: point_ms must be latencies in ms > 0, got {self.point_ms}")
        if not 0 <= self.default_point < len(self.point_ms):
            raise ValueError(
                f"{name}: default_point {self.default_point} out of range "
                f"(0..{len(self.point_ms) - 1})"
            )
        shares = self.early_exit_share
        if shares and len(shares) != len(self.point_ms):
            raise ValueError(
                f"{name}: early_exit_share has {len(shares)} values "
                f"for {len(self.point_ms)} operating points"
            )
        if not all(0.0 <= s <= 1.0 for s in shares):
            raise ValueError(f"{name}: early_exit_share values must be in [0, 1], got {shares}")

    @property
    def points(self) -> int:
        """How many operating points the variant has."""
        return len(self.point_ms)

    def exit_share(self, point: int) -> float:
        """Share of the frames leaving at the first exit at `point`."""
        shares = self.early_exit_share or default_exit_shares(self.points)
        return shares[point]

    def label(self) -> str:
        """How logs and events name the variant: model, version and manifest prefix."""
        return f"{self.model_id} v{self.version} ({self.manifest_sha256[:12]})"


def sim_variant_from_manifest(
    manifest_sha256: str, manifest: ManifestBody, ms_per_mac: float
) -> SimVariant:
    """The variant a bundle makes: each point's p50 is its `expected_macs` x `ms_per_mac`.

    A point without `expected_macs` (or a bundle without operating points) costs the sum of
    the stages' `macs`: every frame through every stage. The first-exit shares come from the
    points' `exit_rates` when every point has them and the bundle has an early exit.
    """
    if not ms_per_mac > 0:
        raise ValueError(f"ms_per_mac must be > 0, got {ms_per_mac}")
    stage_macs = [s.macs for s in manifest.stages]
    full = float(sum(m for m in stage_macs if m is not None)) if None not in stage_macs else None

    def cost(macs: float | None, what: str) -> float:
        value = macs if macs is not None else full
        if value is None or value <= 0:
            raise ValueError(
                f"bundle {manifest.model_id} v{manifest.version}: {what} has no expected_macs "
                "and its stages do not all give macs"
            )
        return value * ms_per_mac

    ops = manifest.operating_points
    if not ops:
        return SimVariant(
            manifest_sha256=manifest_sha256,
            model_id=manifest.model_id,
            version=manifest.version,
            point_ms=(cost(None, "the bundle (no operating points)"),),
            default_point=0,
        )
    rates = [op.exit_rates for op in ops]
    shares: tuple[float, ...] = ()
    if manifest.early_exits and all(r is not None and len(r) >= 2 for r in rates):
        shares = tuple(min(1.0, max(0.0, float(r[0]))) for r in rates if r is not None)
    return SimVariant(
        manifest_sha256=manifest_sha256,
        model_id=manifest.model_id,
        version=manifest.version,
        point_ms=tuple(cost(op.expected_macs, f"operating point {op.name!r}") for op in ops),
        default_point=manifest.default_operating_point,
        early_exit_share=shares,
    )
