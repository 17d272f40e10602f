"""A network namespace behind a slow, lossy link: `ip netns`, a veth pair, `tc netem`.

`slow_link()` creates a namespace joined to the root namespace by a veth pair on a private /30
(10.213.0.0/16 cut into /30s: root side .1, namespace side .2), shapes BOTH directions with
netem (the root side shapes what goes to the namespace, the namespace side what comes back)
and tears everything down on exit, after a failure too. A process started with
`link.exec_prefix + argv` runs inside the namespace and reaches the root namespace only through
the shaped link, at `link.host_ip`; a server bound to `link.host_ip` is reached by root
processes over loopback (a local address), unshaped.

Needs root, iproute2 and network namespaces: missing any is an error with instructions
(`NetnsUnavailable`), never a silent skip: tests turn it into a failure. A kernel without the
netem qdisc (some VM kernels, e.g. Firecracker's, build only tbf/htb) gets the rate from tbf and
the loss from iptables' `statistic` match (random drops of packets each way, in the
namespace's own tables), and NO delay; `Netns.shaping` says what was applied, `Netns.netem`
is False, and `require_netem=True` makes that an error instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

SUBNET = ipaddress.IPv4Network("10.213.0.0/16")
_SLOTS = SUBNET.num_addresses // 4
_counter = itertools.count()

INSTRUCTIONS = (
    "network namespaces with netem are needed for the slow-link tests: run the tests as root "
    "(CAP_NET_ADMIN) on a Linux host with iproute2 (`apt-get install -y iproute2`) and the "
    "sch_netem kernel module (`modprobe sch_netem`; on Debian/Ubuntu it is in "
    "linux-modules-extra-$(uname -r))"
)


class NetnsUnavailable(RuntimeError):
    """The machine cannot create the namespace, the veth pair or the netem qdisc."""


@dataclass(frozen=True)
class Netns:
    """One namespace and its link to the root namespace."""

    name: str
    host_veth: str  # root side of the pair
    ns_veth: str  # namespace side
    host_ip: str  # what the namespace reaches the root namespace at
    ns_ip: str
    netem: bool  # False: the kernel has no netem; only the rate (tbf) is shaped
    shaping: str  # the qdisc as applied on both ends, for test output

    @property
    def exec_prefix(self) -> list[str]:
        """Prepend to an argv to run it inside the namespace (`ip netns exec` execs it)."""
        return ["ip", "netns", "exec", self.name]

    def set_link(self, up: bool) -> None:
        """Take the root side of the link down (a cable pulled) or up again."""
        _ip("link", "set", "dev", self.host_veth, "up" if up else "down")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    done = _run(argv)
    if done.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {done.stderr.strip()}; {INSTRUCTIONS}")


def _qdisc(dev: str, spec: list[str], netns: str | None) -> subprocess.CompletedProcess[str]:
    argv = ["tc", "qdisc", "add", "dev", dev, "root", *spec]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return _run(argv)


def _shape(link_name: str, host_veth: str, ns_veth: str, netem: list[str], tbf: list[str]) -> str:
    """netem on both ends; tbf (rate only) where the kernel lacks netem. What was applied."""
    for spec in (netem, tbf):
        first = _qdisc(host_veth, spec, None)
        if first.returncode != 0:
            if spec is netem and "unknown" in first.stderr.lower():
                if not tbf:
                    raise NetnsUnavailable(f"this kernel has no netem qdisc; {INSTRUCTIONS}")
                continue  # no sch_netem in this kernel: fall back to the rate alone
            raise NetnsUnavailable(
                f"`tc qdisc add dev {host_veth} root {' '.join(spec)}` failed: "
                f"{first.stderr.strip()}; {INSTRUCTIONS}"
            )
        second = _qdisc(ns_veth, spec, link_name)
        if second.returncode != 0:
            raise NetnsUnavailable(
                f"`tc qdisc add dev {ns_veth} root {' '.join(spec)}` in {link_name} failed: "
                f"{second.stderr.strip()}; {INSTRUCTIONS}"
            )
        return " ".join(spec)
    raise AssertionError("unreachable: tbf either applies or raises")


def _percent(value: str) -> float:
    """'5%' -> 0.05."""
    return float(value.strip().rstrip("%")) / 100.0


def _drop_rule(dev: str, p: float) -> list[str]:
    """An iptables INPUT rule dropping share p of what arrives on dev (loss on the wire).

    On arrival, not on OUTPUT: a packet dropped on its way out is an error (EPERM) for the
    sender, which a lossy link never is.
    """
    match = ["-m", "statistic", "--mode", "random", "--probability", f"{p:.4f}"]
    return ["INPUT", "-i", dev, *match, "-j", "DROP"]


def _drop_randomly(link: Netns, loss: str) -> str:
    """Drop `loss` of the packets each way: arriving in the namespace, and arriving from it."""
    p = _percent(loss)
    if p <= 0:
        return ""
    if shutil.which("iptables") is None:
        raise NetnsUnavailable(
            "this kernel has no netem and iptables is not installed for the loss "
            f"(`apt-get install -y iptables`); {INSTRUCTIONS}"
        )
    for argv in (
        ["ip", "netns", "exec", link.name, "iptables", "-A", *_drop_rule(link.ns_veth, p)],
        # The root namespace's table: matched by this link's own device only, deleted with it.
        ["iptables", "-A", *_drop_rule(link.host_veth, p)],
    ):
        done = _run(argv)
        if done.returncode != 0:
            raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return f" + iptables statistic drop {loss} each way (no delay: no netem)"


def _undrop(link: Netns, loss: str) -> None:
    with contextlib.suppress(ValueError):
        p = _percent(loss)
        if p > 0 and shutil.which("iptables") is not None:
            _run(["iptables", "-D", *_drop_rule(link.host_veth, p)])


def _used_subnets() -> set[ipaddress.IPv4Network]:
    """The /30s of SUBNET already on an interface (another test's namespace)."""
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    used: set[ipaddress.IPv4Network] = set()
    for word in out.split():
        with contextlib.suppress(ValueError):
            iface = ipaddress.ip_interface(word)
            if isinstance(iface, ipaddress.IPv4Interface) and iface.ip in SUBNET:
                used.add(ipaddress.IPv4Network(f"{iface.ip}/30", strict=False))
    return used


def _pick_subnet(n: int) -> ipaddress.IPv4Network:
    used = _used_subnets()
    start = (os.getpid() * 31 + n) % _SLOTS
    for k in range(_SLOTS):
        base = int(SUBNET.network_address) + 4 * ((start + k) % _SLOTS)
        net = ipaddress.IPv4Network((base, 30))
        if net not in used:
            return net
    raise NetnsUnavailable(f"every /30 of {SUBNET} is in use")


def _check_tools() -> None:
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise NetnsUnavailable(f"{', '.join(missing)} not found on PATH; {INSTRUCTIONS}")
    if os.geteuid() != 0:
        raise NetnsUnavailable(f"not running as root (euid {os.geteuid()}); {INSTRUCTIONS}")


def _teardown(link: Netns) -> None:
    """Kill what still runs inside (only the namespace's own processes), delete it all."""
    pids = _run(["ip", "netns", "pids", link.name]).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    # Deleting the namespace destroys its end of the pair, and with it the root end; the
    # explicit delete covers a namespace that was never created or already gone.
    _run(["ip", "netns", "del", link.name])
    _run(["ip", "link", "del", "dev", link.host_veth])


@contextlib.contextmanager
def slow_link(
    rate: str = "1mbit",
    delay: str = "100ms",
    loss: str = "5%",
    *,
    limit: int = 1000,
    require_netem: bool = False,
) -> Iterator[Netns]:
    """A namespace whose link to the root namespace has netem `rate delay loss` each way.

    The defaults (1 Mbit/s, 100 ms each way, 5% loss each way) are a poor rural uplink; the
    issue's 256 kbit/s + 200 ms would take the reference bundle ~50 s per device at best,
    too long for a test. limit: netem's queue in packets.
    """
    _check_tools()
    n = next(_counter)
    tag = f"{os.getpid() % 100000}{n}"
    net = _pick_subnet(n)
    hosts = list(net.hosts())
    name, host_veth, ns_veth = f"edgefleet-{tag}", f"efh{tag}"[:15], f"efn{tag}"[:15]
    link = Netns(name, host_veth, ns_veth, str(hosts[0]), str(hosts[1]), False, "")
    netem = ["netem", "rate", rate, "delay", delay, "loss", loss, "limit", str(limit)]
    # tbf: the same rate, a 32 KB bucket, at most 500 ms of queue (it drops beyond).
    tbf = ["tbf", "rate", rate, "burst", "32kb", "latency", "500ms"]
    try:
        _ip("netns", "add", link.name)
        _ip("link", "add", link.host_veth, "type", "veth", "peer", "name", link.ns_veth)
        _ip("link", "set", link.ns_veth, "netns", link.name)
        _ip("addr", "add", f"{link.host_ip}/30", "dev", link.host_veth)
        _ip("link", "set", "dev", link.host_veth, "up")
        _ip("addr", "add", f"{link.ns_ip}/30", "dev", link.ns_veth, netns=link.name)
        _ip("link", "set", "dev", link.ns_veth, "up", netns=link.name)
        _ip("link", "set", "dev", "lo", "up", netns=link.name)
        shaping = _shape(name, host_veth, ns_veth, netem, [] if require_netem else tbf)
        if "netem" not in shaping:
            shaping += _drop_randomly(link, loss)
        yield Netns(name, host_veth, ns_veth, link.host_ip, link.ns_ip, "netem" in shaping, shaping)
    finally:
        _undrop(link, loss)
        _teardown(link)
