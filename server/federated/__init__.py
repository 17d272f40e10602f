"""Federated rounds on the coordinator: devices fine-tune the exit heads, the fleet aggregates.

Pure numerics: aggregate.py (FedAvg and the robust aggregators over weight deltas) and
validate.py (shape, finiteness and norm checks on one device's update). Orchestration around
them: spec.py (what an operator asks), rounds.py (the restart-safe round engine over the
store), updates.py (judging one stored update), base.py (the base bundle the devices run),
evaluate.py (held-out data or the devices' figures), candidate.py (version + 1 with the new
heads, signed or left to sign), mqtt.py (the retained task), api.py, views.py and client.py
(the HTTP routes and the CLI's side of them).
"""
