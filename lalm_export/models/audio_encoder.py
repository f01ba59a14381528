"""Audio encoders (Whisper encoder, HuBERT, Wav2Vec2, WavLM, Data2VecAudio: every encoder row of
the family registry), each frozen, fully fine-tuned,
LoRA or QLoRA. `forward` returns every layer's hidden states, the final layer last."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lalm_export.errors import OptionsError
from lalm_export.models.adapters import (
    AdapterCheckpoints,
    TrainingMode,
    attach_lora,
    set_trainable,
)
from lalm_export.models.families import ENCODER_FAMILIES, get_family
from lalm_export.models.loading import load_family_model, model_device


class BaseAudioEncoder(AdapterCheckpoints, nn.Module):
    """Shared behaviour of the audio encoders; use a subclass, which names its family
    (`encoder_class(family)` gives the one for any encoder row of the registry)."""

    family: ClassVar[str] = ""
    adapted_module: ClassVar[str] = "encoder"
    _by_family: ClassVar[dict[str, type[BaseAudioEncoder]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.family:
            BaseAudioEncoder._by_family.setdefault(cls.family, cls)

    def __init__(
        self,
        model_name: str,
        finetune: bool = False,
        use_lora: bool = False,
        use_qlora: bool = False,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        load_in_4bit: bool = True,
        bnb_4bit_use_double_quant: bool = True,
        bnb_4bit_quant_type: str = "nf4",
        trust_remote_code: bool = False,
        lora_target_modules: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        if not self.family:
            named = ", ".join(encoder_class(f).__name__ for f in ENCODER_FAMILIES)
            raise TypeError(f"BaseAudioEncoder is abstract: use one of {named}")
        self.spec = get_family(self.family)
        self.model_name = str(model_name)
        self.mode = TrainingMode(
            finetune=finetune,
            use_lora=use_lora,
            use_qlora=use_qlora,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            load_in_4bit=load_in_4bit,
            bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
            bnb_4bit_quant_type=bnb_4bit_quant_type,
        )
        self.mode.validate()
        encoder = load_family_model(self.spec, self.model_name, self.mode.quantization(), trust_remote_code)
        if self.mode.uses_adapter:
            targets = lora_target_modules or self.spec.default_lora_targets
            inert = sorted(set(targets or ()) & set(self.spec.read_by_weight))
            if inert:
                raise OptionsError(
                    f"{self.family} reads {', '.join(inert)} by weight instead of calling them, so LoRA there would train nothing; "
                    f"target other layers (default: {', '.join(self.spec.default_lora_targets or ())})"
                )
            encoder = attach_lora(encoder, self.mode, targets)
        self.encoder = encoder
        set_trainable(self.encoder, self.mode)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All hidden states `(batch, frames, hidden)`: embedding output first, final layer last."""
        x = x.to(model_device(self.encoder))
        outputs = self.encoder(**{self.spec.input_name: x}, output_hidden_states=True, return_dict=True)
        return tuple(outputs.hidden_states)

    def get_hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    def set_training_mode(self) -> None:
        """train(); LoRA/QLoRA: only adapter parameters trainable; finetune: all; frozen: none."""
        self.train()
        set_trainable(self.encoder, self.mode)

    def set_inference_mode(self) -> None:
        """eval() and nothing trainable."""
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    @torch.no_grad()
    def inference(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.forward(x)


class WhisperAudioEncoder(BaseAudioEncoder):
    """The encoder of a Whisper checkpoint; input log-mel `(batch, n_mels, 3000)`."""

    family = "whisper"


class HubertAudioEncoder(BaseAudioEncoder):
    """HuBERT; input raw 16 kHz audio `(batch, samples)`."""

    family = "hubert"


class Wav2Vec2AudioEncoder(BaseAudioEncoder):
    """Wav2Vec2; input raw 16 kHz audio `(batch, samples)`."""

    family = "wav2vec2"


class WavLMAudioEncoder(BaseAudioEncoder):
    """WavLM; input raw 16 kHz audio `(batch, samples)`."""

    family = "wavlm"


class Data2VecAudioEncoder(BaseAudioEncoder):
    """Data2VecAudio; input raw 16 kHz audio `(batch, samples)`."""

    family = "data2vec-audio"


def encoder_class(family: str) -> type[BaseAudioEncoder]:
    """The wrapper class of an encoder family: its named subclass, or one made from the
    registry row for a family that has none."""
    spec = get_family(family)
    if spec.role != "encoder":
        raise OptionsError(f"{family!r} is a {spec.role} family, not an audio encoder")
    if family not in BaseAudioEncoder._by_family:
        name = "".join(part.capitalize() for part in family.replace("-", "_").split("_")) + "AudioEncoder"
        type(name, (BaseAudioEncoder,), {"family": family, "__doc__": f"{family}; input {spec.input_kind}."})
    return BaseAudioEncoder._by_family[family]
