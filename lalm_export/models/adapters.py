"""What every wrapper shares: the training mode (frozen / finetune / LoRA / QLoRA), the
4-bit settings, and adapter checkpoints (a peft folder plus `lalm_adapter.json`)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lalm_export.errors import AdapterMismatchError, OptionsError
from lalm_export.io import atomic_folder, read_json, read_safetensors, write_json, write_safetensors
from lalm_export.models.families import get_family

ADAPTER_METADATA = "lalm_adapter.json"
PEFT_PREFIX = "base_model.model."  # what peft puts before the model's module names in an adapter's keys
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = "model.safetensors"
FULL_WEIGHTS_METADATA = "lalm_weights.json"


@dataclass(frozen=True)
class QuantizationSettings:
    """The 4-bit base a QLoRA adapter is trained against; the export reproduces it."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"
    base_dtype: str = "float32"  # dtype of the layers bitsandbytes leaves unquantized

    def bnb_config(self, keep_full_precision: tuple[str, ...] = ()) -> Any:
        """bitsandbytes' settings; `keep_full_precision`: module names left unquantized (the
        family's layers its 4-bit kernels cannot run), besides transformers' own choice."""
        from transformers import BitsAndBytesConfig

        extra = {"llm_int8_skip_modules": list(keep_full_precision)} if keep_full_precision else {}
        return BitsAndBytesConfig(
            **extra,
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
        )


@dataclass(frozen=True)
class TrainingMode:
    finetune: bool = False
    use_lora: bool = False
    use_qlora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    load_in_4bit: bool = True
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_quant_type: str = "nf4"

    @property
    def uses_adapter(self) -> bool:
        return self.use_lora or self.use_qlora

    @property
    def name(self) -> str:
        if self.use_qlora:
            return "qlora"
        if self.use_lora:
            return "lora"
        return "finetune" if self.finetune else "frozen"

    def quantization(self) -> QuantizationSettings | None:
        if not self.use_qlora:
            return None
        return QuantizationSettings(quant_type=self.bnb_4bit_quant_type, double_quant=self.bnb_4bit_use_double_quant)

    def validate(self) -> None:
        """Every rule in one place; each error names the rule and the fix."""
        if self.use_lora and self.use_qlora:
            raise OptionsError("use_lora=True and use_qlora=True: choose one (QLoRA is LoRA on a 4-bit base)")
        if self.finetune and self.uses_adapter:
            flag = "use_qlora" if self.use_qlora else "use_lora"
            raise OptionsError(f"finetune=True and {flag}=True: choose full fine-tuning (finetune=True) or an adapter ({flag}=True)")
        if self.use_qlora and not self.load_in_4bit:
            raise OptionsError("use_qlora=True needs load_in_4bit=True (QLoRA trains LoRA on a 4-bit base); or use use_lora=True")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise OptionsError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', not {self.bnb_4bit_quant_type!r}")
        if self.uses_adapter and self.lora_r < 1:
            raise OptionsError(f"lora_r must be a positive rank, not {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise OptionsError(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")


@dataclass(frozen=True)
class AdapterMetadata:
    """Written beside a peft adapter so that the export can merge it faithfully."""

    family: str
    base_model: str
    model_type: str
    lora_r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    quantization: QuantizationSettings | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterMetadata:
        quant = data.get("quantization")
        return cls(
            family=data["family"],
            base_model=data["base_model"],
            model_type=data["model_type"],
            lora_r=int(data["lora_r"]),
            lora_alpha=int(data["lora_alpha"]),
            target_modules=tuple(data["target_modules"]),
            quantization=QuantizationSettings(**quant) if quant else None,
        )


def read_adapter_metadata(folder: str | Path) -> AdapterMetadata | None:
    """The wrapper's metadata, or None for a plain peft adapter folder."""
    path = Path(folder) / ADAPTER_METADATA
    if not path.exists():
        return None
    data = read_json(path, "adapter metadata")
    try:
        return AdapterMetadata.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterMismatchError(f"adapter metadata {path} is incomplete ({err}); save the adapter again") from err


def check_adapter_folder(folder: str | Path) -> Path:
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise AdapterMismatchError(f"adapter {folder} is a file; pass the adapter folder (adapter_config.json + adapter_model.safetensors)")
    if not folder.is_dir():
        raise AdapterMismatchError(f"adapter folder {folder} does not exist")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise AdapterMismatchError(f"{folder} is not a peft adapter folder (no {name}); pass a folder written by save_lora_weights()")
    return folder


@dataclass(frozen=True)
class LoraScaling:
    """The rank and alpha an adapter was trained with: its scale is `alpha / r` (`alpha / √r` with rsLoRA)."""

    r: int
    alpha: float
    rslora: bool = False


def read_lora_scaling(folder: Path, config: dict[str, Any]) -> LoraScaling:
    """Rank and alpha from the adapter's own `adapter_config.json`, checked against
    `lalm_adapter.json` where both exist. A config without them is refused: peft's defaults
    would merge the adapter at another scale than it was trained with."""
    missing = [key for key in ("r", "lora_alpha") if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool)]
    if missing:
        raise AdapterMismatchError(
            f"adapter {folder}/{ADAPTER_CONFIG} lacks {' and '.join(missing)} (numbers): the adapter's scale alpha / r cannot be "
            "known; save the adapter again with peft or save_lora_weights()"
        )
    scaling = LoraScaling(r=int(config["r"]), alpha=float(config["lora_alpha"]), rslora=bool(config.get("use_rslora")))
    if scaling.r < 1:
        raise AdapterMismatchError(f"adapter {folder}/{ADAPTER_CONFIG} has rank r={scaling.r}; a LoRA rank is at least 1")
    metadata = read_adapter_metadata(folder)
    if metadata is not None and (metadata.lora_r, float(metadata.lora_alpha)) != (scaling.r, scaling.alpha):
        raise AdapterMismatchError(
            f"adapter {folder}: {ADAPTER_CONFIG} says r={scaling.r}, lora_alpha={scaling.alpha:g} but {ADAPTER_METADATA} says "
            f"r={metadata.lora_r}, lora_alpha={metadata.lora_alpha}; the folder was edited or mixed from two adapters: save it again"
        )
    return scaling


def first_mismatch(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], what: str) -> str | None:
    """A one-line description of the first key or shape that differs, else None."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if extra:
        return f"{what} has tensor {extra[0]} that the model does not have ({len(extra)} such)"
    if missing:
        return f"{what} lacks tensor {missing[0]} that the model has ({len(missing)} such)"
    for key in sorted(expected):
        if tuple(found[key].shape) != tuple(expected[key]):
            return f"{what} tensor {key} has shape {tuple(found[key].shape)}, the model expects {tuple(expected[key])}"
    return None


def save_adapter(peft_model: nn.Module, folder: str | Path, metadata: AdapterMetadata) -> None:
    """Write the peft adapter (safetensors) and its metadata; replaces `folder` only once complete."""
    with atomic_folder(folder, replace=True) as tmp:
        # Embedding rows an LALM adds for its audio token are zeros, made again on load: LoRA only.
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        write_json(metadata.to_dict(), tmp / ADAPTER_METADATA)


def tensors_for_part(tensors: dict[str, torch.Tensor], part: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An adapter trained on a whole model (peft on WhisperForConditionalGeneration:
    `base_model.model.model.encoder.layers...`) named as one trained on its `part` alone
    (`base_model.model.layers...`), and the adapted modules outside the part (its text decoder's)."""
    inside, outside = {}, set()
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        relative = relative_to_part(name, part)
        if relative is not None:
            inside[PEFT_PREFIX + relative] = tensor
        else:
            outside.add(name.rsplit(".lora_", 1)[0])
    return inside, sorted(outside)


def relative_to_part(name: str, part: str) -> str | None:
    """`name` relative to the `part` submodule it lies in (`model.encoder.layers.0` → `layers.0`), or None outside it."""
    segments = name.split(".")
    return ".".join(segments[segments.index(part) + 1 :]) if part in segments else None


def load_adapter(peft_model: nn.Module, folder: str | Path, family: str, part: str | None = None) -> list[str]:
    """Load adapter weights into a peft model after checking family, keys and shapes. The
    model is the `part` submodule of a larger one (Whisper's encoder): an adapter trained on
    the whole model loads its part; returns the adapted modules left out (the text decoder's)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    folder = check_adapter_folder(folder)
    metadata = read_adapter_metadata(folder)
    if metadata is not None and metadata.family != family:
        raise AdapterMismatchError(f"adapter {folder} was trained for the {metadata.family!r} family, not {family!r}")
    scaling = read_lora_scaling(folder, read_json(folder / ADAPTER_CONFIG, "adapter config"))
    ours = peft_model.peft_config["default"]
    if (int(ours.r), float(ours.lora_alpha)) != (scaling.r, scaling.alpha):
        raise AdapterMismatchError(
            f"adapter {folder} was trained with lora_r={scaling.r}, lora_alpha={scaling.alpha:g}, but this model was built with "
            f"lora_r={ours.r}, lora_alpha={ours.lora_alpha}: its scale would be wrong; construct it with lora_r={scaling.r}, "
            f"lora_alpha={scaling.alpha:g}"
        )
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS)
    expected = {k: v.shape for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    left_out: list[str] = []
    if part is not None and not set(tensors) <= set(expected):
        tensors, left_out = tensors_for_part(tensors, part)
    problem = first_mismatch(expected, tensors, f"adapter {folder}")
    if problem:
        raise AdapterMismatchError(f"{problem}: it was trained for another base model or LoRA rank")
    set_peft_model_state_dict(peft_model, tensors)
    return left_out


def save_full_weights(model: nn.Module, folder: str | Path, family: str, base_model: str) -> None:
    with atomic_folder(folder, replace=True) as tmp:
        write_safetensors(model.state_dict(), tmp / FULL_WEIGHTS)
        write_json({"family": family, "base_model": base_model}, tmp / FULL_WEIGHTS_METADATA)


def read_full_weights(folder: str | Path, family: str) -> dict[str, torch.Tensor]:
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise AdapterMismatchError(f"weights {folder} is a file; pass the folder written by save_model_weights()")
    if not (folder / FULL_WEIGHTS).is_file():
        raise AdapterMismatchError(f"{folder} holds no {FULL_WEIGHTS}; pass a folder written by save_model_weights()")
    meta_path = folder / FULL_WEIGHTS_METADATA
    if meta_path.exists():
        saved_family = read_json(meta_path, "weights metadata").get("family")
        if saved_family != family:
            raise AdapterMismatchError(f"weights {folder} are for the {saved_family!r} family, not {family!r}")
    return read_safetensors(folder / FULL_WEIGHTS)


def load_full_weights(model: nn.Module, folder: str | Path, family: str) -> None:
    tensors = read_full_weights(folder, family)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problem = first_mismatch(expected, tensors, f"weights {folder}")
    if problem:
        raise AdapterMismatchError(f"{problem}: they were saved from another model")
    model.load_state_dict(tensors, strict=True)


def build_lora_config(mode: TrainingMode, target_modules: tuple[str, ...] | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=mode.lora_r,
        lora_alpha=mode.lora_alpha,
        lora_dropout=mode.lora_dropout,
        target_modules=list(target_modules) if target_modules else None,
        bias="none",
    )


def attach_lora(model: nn.Module, mode: TrainingMode, target_modules: tuple[str, ...] | None) -> nn.Module:
    """Wrap `model` with LoRA (after preparing a 4-bit base for k-bit training)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if mode.use_qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        return get_peft_model(model, build_lora_config(mode, target_modules))
    except ValueError as err:
        raise AdapterMismatchError(f"cannot attach LoRA: {str(err).splitlines()[0]}") from err


def lora_target_names(peft_model: nn.Module) -> tuple[str, ...]:
    config = peft_model.peft_config["default"]
    return tuple(sorted(config.target_modules))


class AdapterCheckpoints:
    """Adapter save/load shared by the encoder and decoder wrappers. A wrapper sets `family`,
    `model_name`, `mode` and names the peft-wrapped module in `adapted_module`."""

    family: str
    model_name: str
    mode: TrainingMode
    adapted_module: str

    @property
    def _adapted(self) -> nn.Module:
        return getattr(self, self.adapted_module)

    def save_lora_weights(self, path: str | Path) -> None:
        """The adapter (peft folder, safetensors) and `lalm_adapter.json`, which the export reads to merge it."""
        self._require_adapter("save_lora_weights")
        save_adapter(self._adapted, path, self.adapter_metadata())

    def load_lora_weights(self, path: str | Path) -> None:
        """Weights of a saved adapter, checked against this model's family, keys and shapes.
        Whisper's encoder also loads the encoder's part of an adapter trained on the whole
        Whisper model, with a warning that names what was left out."""
        self._require_adapter("load_lora_weights")
        part = get_family(self.family).submodule
        left_out = load_adapter(self._adapted, path, self.family, part)
        if left_out:
            warnings.warn(
                f"adapter {path} also adapts {len(left_out)} modules outside the {self.family} {part} (e.g. {left_out[0]}); "
                "they are not part of this model and were left out",
                stacklevel=2,
            )

    def adapter_metadata(self) -> AdapterMetadata:
        return AdapterMetadata(
            family=self.family,
            base_model=self.model_name,
            model_type=self._adapted.config.model_type,
            lora_r=self.mode.lora_r,
            lora_alpha=self.mode.lora_alpha,
            target_modules=lora_target_names(self._adapted),
            quantization=self.mode.quantization(),
        )

    def save_model_weights(self, path: str | Path) -> None:
        """Full weights as safetensors (frozen or fine-tuned models)."""
        self._forbid_adapter("save_model_weights")
        save_full_weights(self._adapted, path, self.family, self.model_name)

    def load_model_weights(self, path: str | Path) -> None:
        self._forbid_adapter("load_model_weights")
        load_full_weights(self._adapted, path, self.family)

    def _require_adapter(self, method: str) -> None:
        if not self.mode.uses_adapter:
            raise OptionsError(f"{method}() needs an adapter: construct {type(self).__name__} with use_lora=True or use_qlora=True")

    def _forbid_adapter(self, method: str) -> None:
        if self.mode.uses_adapter:
            raise OptionsError(
                f"{method}() is for frozen or fine-tuned models; with LoRA use save_lora_weights()/load_lora_weights() (lalm-export merges the adapter)"
            )


def set_trainable(model: nn.Module, mode: TrainingMode) -> None:
    """LoRA/QLoRA: only adapter parameters; finetune: everything; frozen: nothing."""
    for name, param in model.named_parameters():
        if mode.uses_adapter:
            param.requires_grad = "lora_" in name
        else:
            param.requires_grad = mode.finetune
