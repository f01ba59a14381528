"""ONNX graphs: the op-by-op graphs in Optimum's layout (`traced.py`, torch.onnx), the fused
decoder (`fused.py`, ONNX Runtime's model builder), rewrites that keep the math, and reading
and writing graph files."""
