"""Merging adapters into weights. The merge itself is a pure function over tensors; the
rest reads a peft adapter folder, resolves its tensors to the model's Linear layers and
checks every shape, and turns a 4-bit base back into the fp32 weights it stands for.

QLoRA: an adapter trained on a 4-bit base learned a correction to `dequant(W4)`, not to
the original `W`. Merging it into `W` (what `merge_and_unload` on a freshly loaded base
does; peft#2105, #2321) changes the model. So the base is loaded with the adapter's NF4
settings, every 4-bit layer is dequantized, and the adapter is merged into that."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lalm_export.errors import AdapterMismatchError
from lalm_export.io import read_json, read_safetensors
from lalm_export.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, check_adapter_folder, read_lora_scaling, relative_to_part

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted Linear: `W' = W + scale * B @ A`, with A `(r, in)` and B `(out, r)`."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def lora_delta(pair: LoraPair) -> torch.Tensor:
    """`scale * B @ A`, computed in float64 so the merge adds no rounding of its own."""
    return (pair.b.double() @ pair.a.double()) * pair.scale


def merge_lora(weights: dict[str, torch.Tensor], pairs: dict[str, LoraPair]) -> dict[str, torch.Tensor]:
    """New weights `{name: W + delta}` for every pair; `weights` is left untouched."""
    merged = dict(weights)
    for name, pair in pairs.items():
        base = weights[name]
        merged[name] = (base.double() + lora_delta(pair)).to(base.dtype)
    return merged


def dequantize_4bit_linears(model: nn.Module) -> int:
    """Replace every bitsandbytes `Linear4bit` by an fp32 `nn.Linear` holding `dequant(W4)`."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.reshape(module.out_features, module.in_features))
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    _forget_quantization(model)
    return replaced


def _forget_quantization(model: nn.Module) -> None:
    """The model is plain fp32 now: drop transformers' 4-bit flags so it exports (and its config saves) as such."""
    for attr, value in (("hf_quantizer", None), ("is_loaded_in_4bit", False), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)
    config = getattr(model, "config", None)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if config is not None and hasattr(config, attr):
            delattr(config, attr)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module-name suffix."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _check_supported(config: dict[str, Any], folder: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatchError(f"adapter {folder} is a {config['peft_type']} adapter; only LoRA is supported")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    if config.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if unsupported:
        raise AdapterMismatchError(f"adapter {folder} uses {', '.join(unsupported)}, which the merge does not support")


def _resolve_prefix(modules: list[str], linears: dict[str, nn.Linear]) -> str:
    """The leading part of the adapter's module names that the model lacks.

    An adapter trained on a full model (`model.encoder.layers.0...`) still fits the encoder
    that is exported (`layers.0...`); every module must resolve with the same prefix."""
    first = modules[0].split(".")
    for cut in range(len(first)):
        prefix = ".".join(first[:cut]) + ("." if cut else "")
        if all(m.startswith(prefix) and m[len(prefix) :] in linears for m in modules):
            return prefix
    missing = next(m for m in modules if m not in linears)
    raise AdapterMismatchError(f"adapter targets module {missing!r}, which the model has no Linear layer for: it was trained for another model or family")


@dataclass(frozen=True)
class AdapterForPart:
    """An adapter read for the part of a model that is exported: its pairs, and the adapted
    modules outside that part (a whole-Whisper adapter's text decoder) that were left out."""

    pairs: dict[str, LoraPair]
    left_out: tuple[str, ...] = ()


def read_adapter_for_part(folder: str | Path, model: nn.Module, part: str) -> AdapterForPart:
    """`read_lora_pairs` for `model`, the `part` submodule of a larger model (Whisper's
    encoder): an adapter trained on the whole model (peft on WhisperForConditionalGeneration
    with q_proj/v_proj, the usual recipe) also adapts the rest, which is not exported; those
    modules are left out and named. An adapter with nothing in `part` is still refused."""
    return _read_pairs(folder, model, part)


def read_lora_pairs(folder: str | Path, model: nn.Module) -> dict[str, LoraPair]:
    """The adapter's LoRA pairs keyed by the model's `<module>.weight`, every shape checked."""
    return _read_pairs(folder, model, None).pairs


def _split_by_part(parts: dict[str, dict[str, torch.Tensor]], part: str, linears: dict[str, nn.Linear]) -> tuple[dict, tuple[str, ...]]:
    """The adapter's modules inside `part`, renamed relative to it (a module named as in the
    part itself also counts), and the names of those outside it."""
    inside, outside = {}, []
    for name in sorted(parts):
        relative = relative_to_part(name, part)
        if relative is not None:
            inside[relative] = parts[name]
        elif name in linears:
            inside[name] = parts[name]
        else:
            outside.append(name)
    if not inside:
        raise AdapterMismatchError(f"the adapter adapts nothing in the model's {part} (e.g. {outside[0]!r}): it was trained for another part or model")
    return inside, tuple(outside)


def _read_pairs(folder: str | Path, model: nn.Module, part: str | None) -> AdapterForPart:
    folder = check_adapter_folder(folder)
    config = read_json(folder / ADAPTER_CONFIG, "adapter config")
    _check_supported(config, folder)
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise AdapterMismatchError(f"adapter tensor {key} is not a LoRA A/B weight; the merge supports LoRA on Linear layers")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise AdapterMismatchError(f"adapter {folder} holds no LoRA weights")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    left_out: tuple[str, ...] = ()
    if part is not None:
        parts, left_out = _split_by_part(parts, part, linears)
    prefix = _resolve_prefix(sorted(parts), linears)
    scaling = read_lora_scaling(folder, config)
    pairs: dict[str, LoraPair] = {}
    for adapter_module, ab in sorted(parts.items()):
        module = adapter_module[len(prefix) :]
        if set(ab) != {"A", "B"}:
            raise AdapterMismatchError(f"adapter module {adapter_module} lacks its lora_{'A' if 'B' in ab else 'B'} tensor")
        out_features, in_features = linears[module].weight.shape
        r = int(_pattern_value(config.get("rank_pattern") or {}, module, scaling.r))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, scaling.alpha))
        for part, expected in (("A", (r, in_features)), ("B", (out_features, r))):
            if tuple(ab[part].shape) != expected:
                raise AdapterMismatchError(
                    f"adapter tensor {adapter_module}.lora_{part}.weight has shape {tuple(ab[part].shape)}, "
                    f"the model expects {expected}: it was trained for another base model"
                )
        scale = alpha / math.sqrt(r) if scaling.rslora else alpha / r
        pairs[f"{module}.weight"] = LoraPair(a=ab["A"].float(), b=ab["B"].float(), scale=scale)
    return AdapterForPart(pairs, left_out)


def merge_adapter_into(model: nn.Module, pairs: dict[str, LoraPair]) -> None:
    """Write `merge_lora` of the model's own weights back into the model."""
    params = dict(model.named_parameters())
    merged = merge_lora({name: params[name].detach() for name in pairs}, pairs)
    with torch.no_grad():
        for name, value in merged.items():
            params[name].copy_(value)
