"""`edgefleet demo`: the main job on one machine, told in numbered steps and checked.

`story` runs the steps (reference data, signed bundles, the optimizer, the device runtime,
the video), `fleet` the local fleet over MQTT, `checks` turns every claim into a pass or a
failure that decides the exit code, and `console` keeps library logs off the story.
"""
