"""lalm-export: Large Audio Language Models from fine-tuning to fast ONNX inference."""

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
