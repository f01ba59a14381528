"""Loading a family's Hugging Face model: full precision or on the 4-bit base QLoRA uses."""

from __future__ import annotations

import torch
from torch import nn

from lalm_export.errors import OptionsError
from lalm_export.families import FamilySpec
from lalm_export.io import load_hf_model
from lalm_export.models.adapters import QuantizationSettings


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise OptionsError("QLoRA needs bitsandbytes (pip install 'bitsandbytes>=0.50'); it was not found") from err


def load_family_model(
    spec: FamilySpec,
    model_name: str,
    quantization: QuantizationSettings | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The family's HF model (its kept submodule for Whisper), in fp32 or on a 4-bit base."""
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": torch.float32}
    if quantization is not None:
        require_bitsandbytes()
        kwargs["quantization_config"] = quantization.bnb_config(spec.qlora_full_precision)
        kwargs["dtype"] = getattr(torch, quantization.base_dtype)
    model = load_hf_model(spec.model_cls(), model_name, **kwargs)
    if spec.submodule:
        model = getattr(model, spec.submodule)
    return model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
