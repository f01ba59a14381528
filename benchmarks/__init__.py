"""Benchmarks of exported graphs against their eager modules."""

# `python -m benchmarks accuracy --variants`: a precision, then -gptq (--int4-method gptq on the
# training text; -gptq-self: on the model's own samples), -bN (--int4-block-size N) and/or -h4
# (--int4-lm-head int4). Here so the command line needs no torch.
ACCURACY_VARIANTS = ("fp32", "int8", "int4", "int4-h4", "int4-gptq", "int4-gptq-self", "int4-gptq-h4", "int4-b128", "int4-gptq-b128")
# `python -m benchmarks run --variants`: the precisions, and these (-bN: --int4-block-size N).
RUN_EXTRA_VARIANTS = ("int4-b128",)
