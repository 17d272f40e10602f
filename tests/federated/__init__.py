"""Tests of the device-side numerics of federated rounds (edgefleet.agent.federated)."""
