"""Scripts that retrain the reference models and rewrite the shipped reference assets.

Not part of the installed package: run them from a checkout's root, e.g.
`python -m training.train` (see server/reference/DATACARD.md). They write into
server/reference/, whose files the product and the tests read at run time.
"""
