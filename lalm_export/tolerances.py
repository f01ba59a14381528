"""Every numeric tolerance, with its reason. Relative error is max|a - b| / max|reference|."""

# ONNX Runtime fp32 vs eager PyTorch fp32: same math, different kernels and op order.
FP32_RELATIVE = 1e-4
# An adapter merged into the weights vs applied beside them (W x + s B A x): fp32 rounding.
MERGED_VS_UNMERGED_RELATIVE = 1e-4
# Greedy decoding must agree exactly at fp32; this is the number of steps checked.
GREEDY_STEPS = 24
