"""Rollouts: a signed bundle published once, installed on canaries, soaked, then waves.

rules.py (halt rules, pure), plan.py (canaries and waves, pure), publisher.py (the archive as
retained MQTT chunks), archives.py (the coordinator's verified bundle archives on disk).
"""
