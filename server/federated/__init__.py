"""Federated rounds on the coordinator: devices fine-tune the exit heads, the fleet aggregates.

aggregate.py (FedAvg and the robust aggregators over weight deltas, pure) and validate.py
(shape, finiteness and norm checks on one device's update, pure). The round lifecycle, the MQTT
side and the store join this package later and only orchestrate these functions.
"""
