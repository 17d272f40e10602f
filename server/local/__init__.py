"""A local fleet on one machine: a private broker, real agent processes, waiting on conditions.

The one harness the tests, the benchmarks and the demo share; import its modules directly:
`broker` (mosquitto on a free loopback port), `agents` (an agent config for a local run and
the agent as a child process), `waiting` (wait on a condition, fail naming it).
"""
