"""Loading a family's Hugging Face model: full precision or on the 4-bit base QLoRA uses."""

from __future__ import annotations

import torch
from torch import nn

from lalm_export.errors import ModelLoadError, OptionsError
from lalm_export.io import load_hf_config, load_hf_model
from lalm_export.models.adapters import QuantizationSettings
from lalm_export.models.families import FAMILIES, FamilySpec


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
    """The family's HF model (its kept submodule for Whisper), in fp32 or on a 4-bit base.
    A checkpoint of another family, or one that lacks weights the model needs, is refused:
    transformers would otherwise fill them with random values."""
    check_model_type(spec, model_name, trust_remote_code)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": torch.float32, "output_loading_info": True}
    if quantization is not None:
        require_bitsandbytes()
        kwargs["quantization_config"] = quantization.bnb_config(spec.qlora_keep_full_precision)
        kwargs["dtype"] = getattr(torch, quantization.base_dtype)
    model, info = load_hf_model(spec.model_cls(), model_name, **kwargs)
    if spec.submodule:
        model = getattr(model, spec.submodule)
    refuse_missing_weights(info, model_name, spec.name, f"{spec.submodule}." if spec.submodule else "")
    return model


def refuse_missing_weights(info: dict, model_name: str, what: str, prefix: str = "") -> None:
    """Refuse a checkpoint that lacks weights of the model (under `prefix`, the part kept) or
    holds them in other shapes: transformers' loading info, where it would fill them at random."""
    missing = [k.removeprefix(prefix) for k in info.get("missing_keys", []) if k.startswith(prefix)]
    mismatched = [str(entry[0]) for entry in info.get("mismatched_keys", [])]
    if missing or mismatched:
        names = sorted(missing + mismatched)
        raise ModelLoadError(
            f"{model_name} lacks {len(names)} weight(s) the {what} model needs (e.g. {', '.join(names[:3])}), which would be "
            "random: pass a complete checkpoint saved with save_pretrained()"
        )


def check_model_type(spec: FamilySpec, model_name: str, trust_remote_code: bool = False) -> None:
    """The checkpoint's `model_type` must be one of the family's."""
    if not spec.model_types:
        return
    model_type = load_hf_config(model_name, trust_remote_code).model_type
    if model_type in spec.model_types:
        return
    owner = next((f.name for f in FAMILIES.values() if model_type in f.model_types), None)
    hint = f"--encoder {owner}" if owner else "--decoder auto" if _is_causal_lm(model_type) else f"a {spec.name} checkpoint"
    raise ModelLoadError(f"{model_name} is a {model_type!r} checkpoint, not a {spec.name} one; pass {hint}")


def _is_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
