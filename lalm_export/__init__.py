"""lalm-export: Large Audio Language Models from fine-tuning to fast ONNX inference.

The rooms, in the order an export passes through them: `models/` (wrappers, registry, LALM,
adapters), `export/` (the pipeline and its manifest), `graphs/` (ONNX graphs and rewrites),
`precision/` (int8, fp16, int4), `parity/` (the gate); `demo/` is the built-in example and
`cli.py` the `lalm-export` command. docs/layout.md has the map."""

import logging

__version__ = "0.1.0"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes warns on every import, on CPUs with AVX512-BF16, that it could not fetch an
# optional kernel from the Hugging Face hub (the `kernels` package); its own CPU kernel runs
# instead, and nothing a user does offline changes that.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
