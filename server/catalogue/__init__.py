"""The model catalogue (issue 15): source models with their labelled data, build jobs that run
the optimizer on the coordinator, and the variants they produce, each with its figures.

files.py (the catalogue directory), options.py (BuildOptions -> `edgefleet optimize`
arguments), models.py (adding a model), upload.py (the `models add` upload), jobs.py
(submit, JobRunner), variants.py (variant figures, register_bundle), api.py (the routes),
views.py (what they answer), client.py (the CLI's side).
"""
