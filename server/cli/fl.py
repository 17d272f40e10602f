"""`edgefleet fl`: federated rounds of a group's exit heads, through the coordinator's API.

`start` creates a round (the coordinator announces it to the group's devices) and, with
--watch, prints its progress until it ends; its exit status is 0 only for a round that ended
`done` (published) or `aggregated` (accepted, waiting to be signed), so a script can rely on
it. `status` shows one round and its devices' updates, or the rounds running; `history` lists
rounds; `abort` stops one; `sign` turns the unsigned candidate of a coordinator without the
fleet's signing key into a signed bundle for `edgefleet deploy`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.server.federated.candidate import sign_candidate
from edgefleet.server.federated.client import RoundClient
from edgefleet.server.federated.spec import RoundSpec
from edgefleet.server.federated.views import RoundView
from edgefleet.server.keystore import load_key
from edgefleet.server.paths import keys_dir
from edgefleet.server.rollout.plan import parse_duration

from .errors import CliError
from .fleet import _connection, _dump, table

FINISHED = frozenset({"done", "aggregated", "failed", "aborted"})
_SPEC = RoundSpec.model_fields


def _default(name: str) -> Any:
    return _SPEC[name].default


def register(sub: Any) -> None:
    """Add `fl start|status|history|abort|sign`."""
    p = sub.add_parser(
        "fl",
        help="federated rounds: devices improve the exit heads on their own frames",
        parents=[_connection(defaults=True)],
        description="Federated rounds of a group's early-exit heads (docs/coordinator.md).",
    )
    fs = p.add_subparsers(dest="fl_command", required=True, metavar="ACTION")
    shared = [_connection(defaults=False)]

    s = fs.add_parser(
        "start",
        help="announce a round to a group and (with --watch) follow it",
        parents=shared,
        description="The group's online devices running one bundle train its exit heads on "
        "their own frames for --deadline; the coordinator aggregates their deltas, checks the "
        "result and rolls it out as version + 1 through a canary rollout.",
    )
    s.add_argument("--group", required=True, help="the group whose devices take part")
    s.add_argument("--heads", help="early exits to train, e.g. '0,1' (default: every one)")
    s.add_argument(
        "--aggregator",
        default=_default("aggregator"),
        choices=["fedavg", "median", "trimmed_mean", "norm_clipped_fedavg", "krum"],
        help="how the deltas are combined; the robust rules resist poisoned updates",
    )
    s.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="aggregator parameter: trim=0.2 (trimmed_mean), f=1 and m=1 (krum), bound=2.0 "
        "(norm_clipped_fedavg); repeatable",
    )
    s.add_argument("--deadline", default="10m", help="how long devices have (90s, 5m, 1h)")
    s.add_argument(
        "--quorum",
        default=_default("quorum"),
        help="accepted updates needed: a count ('2') or a share of the devices expected",
    )
    s.add_argument(
        "--sampling", type=float, default=_default("sampling"), help="share of devices asked"
    )
    s.add_argument(
        "--labels",
        default=_default("labels"),
        choices=["pseudo", "supplied", "both"],
        help="pseudo: the final head's confident predictions; supplied: given labels",
    )
    s.add_argument("--epochs", type=int, default=_default("local_epochs"), help="local epochs")
    s.add_argument("--lr", type=float, default=_default("learning_rate"), help="learning rate")
    s.add_argument("--batch-size", type=int, default=_default("batch_size"), help="batch size")
    s.add_argument(
        "--weight-decay", type=float, default=_default("weight_decay"), help="L2 on the weights"
    )
    s.add_argument(
        "--prox-mu", type=float, default=_default("prox_mu"), help="FedProx term (0: FedAvg)"
    )
    s.add_argument(
        "--min-confidence",
        type=float,
        default=_default("min_confidence"),
        help="pseudo labels only from final predictions at least this sure",
    )
    s.add_argument(
        "--min-samples",
        type=int,
        default=_default("min_samples"),
        help="a device with fewer examples sits the round out",
    )
    s.add_argument("--cpu-budget", default="60s", help="CPU time a device may spend training")
    s.add_argument(
        "--max-norm", type=float, help="reject updates with a larger L2 norm (default: 5x the "
        "round's median norm)"
    )
    s.add_argument("--clip", type=float, help="devices clip their update to this L2 norm")
    s.add_argument("--dp-clip", type=float, help="differential privacy: clip each update")
    s.add_argument("--dp-noise", type=float, help="differential privacy: noise multiplier")
    s.add_argument(
        "--compression",
        default=_default("compression"),
        choices=["fp32", "fp16", "q8"],
        help="how devices send their deltas",
    )
    s.add_argument(
        "--max-drop",
        type=float,
        default=_default("max_accuracy_drop") * 100,
        help="accuracy points the new heads may lose and still be published",
    )
    s.add_argument("--canary", default="10%", help="rollout of the result: canaries")
    s.add_argument("--soak", default="5m", help="rollout of the result: canary soak")
    s.add_argument(
        "--halt-if", action="append", default=[], metavar="RULE",
        help="rollout of the result: halt rule, e.g. 'exit_rate<0.3'; repeatable",
    )
    s.add_argument("--waves", default="100%", help="rollout of the result: waves")
    s.add_argument("--watch", action="store_true", help="follow it until it ends")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_start)

    st = fs.add_parser(
        "status", help="one round and its updates, or the rounds running", parents=shared
    )
    st.add_argument("round", nargs="?", help="round id (default: every running round)")
    st.add_argument("--watch", action="store_true", help="follow the round until it ends")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    h = fs.add_parser("history", help="one line per round, newest first", parents=shared)
    h.add_argument("--group", help="only this group")
    h.add_argument("--limit", type=int, default=20, help="at most this many rounds")
    h.add_argument("--json", action="store_true", help="machine-readable output")
    h.set_defaults(func=_history)

    a = fs.add_parser("abort", help="stop a running round (no result)", parents=shared)
    a.add_argument("round", help="round id")
    a.set_defaults(func=_abort)

    sign = fs.add_parser(
        "sign",
        help="sign a round's candidate (a coordinator without --signing-key)",
        description="Where the fleet key is: sign the unsigned candidate directory a round "
        "left on the coordinator (its reason names it), then `edgefleet deploy OUT --group G`.",
    )
    sign.add_argument("candidate", type=Path, help="the candidate directory")
    sign.add_argument("--out", type=Path, required=True, help="the signed bundle directory")
    sign.add_argument(
        "--dir", type=Path, default=None,
        help="fleet key directory (default: $EDGEFLEET_HOME/keys, as `edgefleet keys`)",
    )
    sign.set_defaults(func=_sign)


def _client(args: argparse.Namespace) -> RoundClient:
    return RoundClient(args.url, args.token)


def spec_of(args: argparse.Namespace) -> dict[str, Any]:
    """The RoundSpec a `fl start` command line asks for (checked by the coordinator)."""
    try:
        deadline_s = parse_duration(args.deadline)
        cpu_s = parse_duration(args.cpu_budget)
        soak_s = parse_duration(args.soak)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    spec: dict[str, Any] = {
        "group": args.group,
        "aggregator": args.aggregator,
        "aggregator_params": dict(_param(p) for p in args.param),
        "deadline_s": deadline_s,
        "quorum": args.quorum,
        "sampling": args.sampling,
        "labels": args.labels,
        "local_epochs": args.epochs,
        "learning_rate": args.lr,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "prox_mu": args.prox_mu,
        "min_confidence": args.min_confidence,
        "min_samples": args.min_samples,
        "cpu_budget_s": cpu_s,
        "compression": args.compression,
        "max_accuracy_drop": args.max_drop / 100,
        "rollout": {
            "canary": args.canary,
            "soak_s": soak_s,
            "halt_if": args.halt_if,
            "waves": args.waves,
        },
    }
    if args.heads:
        try:
            spec["heads"] = [int(k) for k in args.heads.split(",")]
        except ValueError:
            raise CliError(f"--heads {args.heads!r}: expected exit indexes like '0,1'") from None
    for name, value in (("max_norm", args.max_norm), ("clip", args.clip)):
        if value is not None:
            spec[name] = value
    if (args.dp_clip is None) != (args.dp_noise is None):
        raise CliError("--dp-clip and --dp-noise go together")
    if args.dp_clip is not None:
        spec["privacy"] = {"clip": args.dp_clip, "noise_multiplier": args.dp_noise}
    return spec


def _param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise CliError(f"--param {text!r}: expected NAME=NUMBER, e.g. trim=0.2") from None


def _start(args: argparse.Namespace) -> int:
    client = _client(args)
    view = client.start_round(spec_of(args))
    print(
        f"round {view.round_id}: {view.model_id} v{view.base_version}, heads {view.heads}, "
        f"group {view.group}: {len(view.expected)} device(s) expected"
    )
    if args.watch:
        view = watch(client, view.round_id)
    if args.json:
        _dump(view)
    if not args.watch:
        return 0
    return 0 if view.state in ("done", "aggregated") else 1


def line(v: RoundView) -> str:
    """One line of a round: state, phase, counts, and the reason once it has one."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(v.counts.items())) or "no updates"
    why = f" ({v.reason})" if v.reason else ""
    return f"{v.round_id}: {v.state}, {v.phase}: {len(v.expected)} expected, {counts}{why}"


def _print(text: str) -> None:
    print(text, flush=True)


def watch(
    client: RoundClient,
    round_id: str,
    poll_s: float = 1.0,
    say: Callable[[str], None] = _print,
    timeout_s: float | None = None,
) -> RoundView:
    """Say each change of the round and of its updates until it has ended."""
    seen: dict[str, str] = {}
    last = ""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        view = client.round(round_id)
        text = line(view)
        if text != last:
            say(text)
            last = text
        for u in view.updates or []:
            state = u.status + (f": {u.reason}" if u.reason else "")
            key = f"{u.device_id}/{u.base_manifest_sha256}"
            if seen.get(key) != state:
                seen[key] = state
                say(f"  {u.device_id}: {state}")
        if view.state in FINISHED:
            return view
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"round {round_id} not finished after {timeout_s:g} s: {text}")
        time.sleep(poll_s)


def _figures(v: RoundView) -> list[str]:
    f = v.figures or {}
    out: list[str] = []
    held = f.get("holdout")
    if held:
        out.append(
            f"held-out ({held['samples']} frames): accuracy {held['accuracy_before']:.2%} -> "
            f"{held['accuracy_after']:.2%}, exit rate {held['exit_rate_before']:.2%} -> "
            f"{held['exit_rate_after']:.2%}"
        )
    dev = f.get("devices_val")
    if dev:
        out.append(
            f"devices' validation ({dev['val_samples']} frames): accuracy "
            f"{dev['accuracy_before']:.2%} -> {dev['accuracy_after']:.2%}"
        )
    if v.result_version is not None:
        where = f"rollout {v.rollout_id}" if v.rollout_id else v.result_path
        out.append(f"result: v{v.result_version}, {where}")
    return out


def _status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.round is None:
        views = [v for v in client.rounds() if v.state == "running"]
        if args.json:
            _dump(views)
        elif not views:
            print("no round running")
        for v in [] if args.json else views:
            print(line(v))
        return 0
    view = watch(client, args.round) if args.watch else client.round(args.round)
    if args.json:
        _dump(view)
        return 0
    if not args.watch:
        print(line(view))
        for text in _figures(view):
            print(f"  {text}")
        rows = [["DEVICE", "STATUS", "SAMPLES", "NORM", "REASON"]]
        for u in view.updates or []:
            norm = "-" if u.norm is None else f"{u.norm:.4g}"
            rows.append([u.device_id, u.status, str(u.samples), norm, (u.reason or "")[:80]])
        if len(rows) > 1:
            print(table(rows))
    return 0


def _history(args: argparse.Namespace) -> int:
    views = _client(args).rounds(args.group, args.limit)
    if args.json:
        _dump(views)
        return 0
    if not views:
        print("no rounds")
        return 0
    rows = [["ROUND", "GROUP", "BASE", "STATE", "UPDATES", "RESULT"]]
    for v in views:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(v.counts.items())) or "-"
        result = f"v{v.result_version}" if v.result_version is not None else "-"
        if v.rollout_id:
            result += f" ({v.rollout_id})"
        rows.append(
            [v.round_id, v.group, f"{v.model_id}@{v.base_version}", v.state, counts, result]
        )
    print(table(rows))
    return 0


def _abort(args: argparse.Namespace) -> int:
    print(line(_client(args).abort_round(args.round)))
    return 0


def _sign(args: argparse.Namespace) -> int:
    key = load_key(args.dir or keys_dir())
    manifest = sign_candidate(args.candidate, args.out, key.private)
    print(f"signed {manifest.model_id} v{manifest.version} into {args.out} (key {key.id})")
    return 0
