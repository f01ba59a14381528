"""LLM decoder: any Hugging Face causal LM, frozen, LoRA or QLoRA, with its tokenizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lalm_export.errors import ModelLoadError
from lalm_export.io import check_model_source
from lalm_export.models.adapters import AdapterCheckpoints, TrainingMode, attach_lora, set_trainable
from lalm_export.models.families import get_family
from lalm_export.models.loading import load_family_model, model_device


def load_tokenizer(model_name: str, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer, with a pad token (EOS, else UNK) when it has none."""
    from transformers import AutoTokenizer

    check_model_source(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {model_name!r}: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


class LLMDecoder(AdapterCheckpoints, nn.Module):
    family = "llm"
    adapted_module = "model"

    def __init__(
        self,
        model_name: str,
        use_qlora: bool = False,
        use_lora: bool = False,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        load_in_4bit: bool = True,
        bnb_4bit_use_double_quant: bool = True,
        bnb_4bit_quant_type: str = "nf4",
        trust_remote_code: bool = False,
        lora_target_modules: tuple[str, ...] | None = None,
        finetune: bool = False,
    ) -> None:
        super().__init__()
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
        self.tokenizer = load_tokenizer(self.model_name, trust_remote_code)
        model = load_family_model(self.spec, self.model_name, self.mode.quantization(), trust_remote_code)
        if self.mode.uses_adapter:
            model = attach_lora(model, self.mode, lora_target_modules or self.spec.default_lora_targets)
        self.model = model
        set_trainable(self.model, self.mode)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The HF causal-LM output: `.logits`, and `.loss` when `labels` are given."""
        device = model_device(self.model)
        moved = {
            name: value.to(device) for name, value in {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}.items() if value is not None
        }
        return self.model(**moved, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The HF model's generate(), with the tokenizer's pad token and inputs on the model's device."""
        device = model_device(self.model)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"].to(device)
        return self.model.generate(input_ids=input_ids.to(device), **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_hidden_size(self) -> int:
        return int(self.model.config.hidden_size)
