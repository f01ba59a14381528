"""lalm-export: Large Audio Language Models from fine-tuning to fast ONNX inference."""

__version__ = "0.1.0"
