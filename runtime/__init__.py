"""Serve lalm-export bundles with ONNX Runtime; no torch, transformers or lalm_export."""
