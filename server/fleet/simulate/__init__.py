"""Fleet simulator: many simulated agents, each with its own MQTT connection, in one thread.

Every simulated device behaves on the wire like `agent/link.py`: its own paho client, a
retained birth `Status` on every (re)connect, the retained offline `Status` as Last Will, QoS 1
`Telemetry` windows with per-device sequence numbers and occasional `Event`s, and `Reply`s to
the `Command`s on its cmd topic (and its group's). While a device is disconnected it keeps
producing windows into a bounded in-memory backlog that mirrors the agent's outbox.

With `SimConfig.variants`, devices run model variants: their latency follows the variant, the
operating point, the device class and a slowdown a test sets, and they install and roll back
bundles with the agent's events, so the coordinator's rollouts and closed loop can drive them.

The modules, from the outside in:

* `runner`     -- `run_simulation`: a measured run over one or several processes (the CLI's);
* `engine`     -- `Simulator`: the devices of one process and the loop thread that drives them;
* `sessions`   -- each device's MQTT connection: connect, birth and will, acks, graceful stop;
* `scheduling` -- when connections are attempted (paced, backed off) and windows are due;
* `selector`   -- one selector over every paho client's socket (paho's external-loop API);
* `device`     -- one simulated agent: identity, payloads, the commands it obeys, its governor;
* `installs`   -- its variants: install and rollback, reported as agent/update/manager.py does;
* `variants`   -- what a variant costs per operating point and device class (and from a bundle);
* `timers`     -- steps due later on the loop thread (the stages of an install);
* `backlog`    -- the agent's outbox, mirrored: replayed in order, oldest window dropped when full;
* `workload`   -- boards, operating points (accurate to fast, as in a bundle) and window figures;
* `config`, `stats` -- what to simulate, and the counters and report that come back.
"""

from __future__ import annotations

from .config import SimConfig, device_id
from .engine import Simulator
from .runner import run_simulation
from .sessions import MAX_INFLIGHT
from .stats import DeviceStats, Progress, SimReport, SimStats
from .variants import CLASS_SPEED, SimVariant, sim_variant_from_manifest

__all__ = [
    "CLASS_SPEED",
    "MAX_INFLIGHT",
    "DeviceStats",
    "Progress",
    "SimConfig",
    "SimReport",
    "SimStats",
    "SimVariant",
    "Simulator",
    "device_id",
    "run_simulation",
    "sim_variant_from_manifest",
]
