"""The locks in deploy/lock/ agree with pyproject.toml and with each other.

A dependency added to pyproject.toml without `bash deploy/lock.sh` would install unlocked (or
not at all, with --no-deps); an agent lock that drifted from the full one would put versions on
devices that CI never ran.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "deploy" / "lock"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)\s*(?:;\s*(.+))?$")


def pins(path: Path) -> dict[tuple[str, str], str]:
    """(name, marker) -> version, for every pinned line of a lock."""
    found: dict[tuple[str, str], str] = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            found[(canonicalize_name(m.group(1)), m.group(3) or "")] = m.group(2)
    return found


# The devices' and CI's interpreters and machines (Marker.evaluate fills in the rest).
ENVIRONMENTS = [
    {"python_version": py, "python_full_version": f"{py}.0", "platform_machine": machine}
    for py in ("3.10", "3.11", "3.12", "3.13")
    for machine in ("x86_64", "aarch64")
]


def resolve(
    lock: dict[tuple[str, str], str], env: dict[str, str] | None = None
) -> dict[str, str]:
    """The versions an interpreter (this one, or `env`) would install from a lock."""
    return {
        name: v
        for (name, marker), v in lock.items()
        if not marker or Marker(marker).evaluate(env)  # type: ignore[arg-type]
    }


def test_every_declared_dependency_is_locked_at_a_version_its_range_allows() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [
        Requirement(r) for r in [*project["dependencies"], *extras["server"], *extras["dev"]]
    ]
    locked = resolve(pins(LOCKS / "all.txt"))
    for req in declared:
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is not in deploy/lock/all.txt: run bash deploy/lock.sh"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"deploy/lock/all.txt pins {name}=={locked[name]}, outside {req}"
        )


def test_the_agent_lock_is_the_full_lock_at_the_same_versions_and_lean() -> None:
    agent, full = pins(LOCKS / "agent.txt"), pins(LOCKS / "all.txt")
    for env in ENVIRONMENTS:
        on_device, in_ci = resolve(agent, env), resolve(full, env)
        for name, version in on_device.items():
            assert in_ci.get(name) == version, f"{env}: agent.txt {name}=={version}, all.txt " \
                f"{in_ci.get(name)}: run bash deploy/lock.sh"
        for server_only in ("onnx", "fastapi", "psycopg", "scikit-learn", "matplotlib", "torch"):
            assert server_only not in on_device, f"{server_only} would be on every device"
        for needed in ("onnxruntime", "numpy", "opencv-python-headless", "paho-mqtt", "pip"):
            assert needed in on_device, f"{env}: {needed} missing from agent.txt"
