"""The optimizer: fp32 ONNX classifier in, INT8 early-exit bundle out (pure numerics live here)."""
