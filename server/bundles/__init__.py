"""Building bundles on the coordinator side."""
