"""On-device inference: preprocessing and staged early-exit execution."""
