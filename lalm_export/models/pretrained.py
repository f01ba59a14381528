"""Audio LLMs people already have, as Hugging Face checkpoints: one row per architecture says
how to take its audio tower and projector apart from its language model, so that an export
of one is the same three-graph bundle as an export of this package's `LALM` (audio encoder +
projector, token table, decoder on `inputs_embeds`).

Supported: Qwen2-Audio (`model_type` "qwen2_audio"). Its audio tower is a Whisper-style encoder
on a 128-bin log-mel window of 30 s that masks the window's padding, average-pooled by 2; a
clip of n samples takes ceil(n / 160) mel frames, then (m - 1) // 2 + 1 after the strided
convolution and (c - 2) // 2 + 1 positions after the pooling, as the checkpoint's processor
expands its one `<|AUDIO|>` token."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lalm_export.errors import OptionsError
from lalm_export.models.families import FamilySpec, get_family


class Qwen2AudioTowerGraph(nn.Module):
    """Qwen2-Audio's audio tower and projector as the LALM bundle's audio graph: log-mel windows
    `(batch, 128, 3000)` and each clip's length in samples → projected positions and how many
    are each clip's own. The window's padding is masked in the tower's attention, as the
    checkpoint's own forward does from its processor's feature mask."""

    def __init__(self, tower: nn.Module, projector: nn.Module, spec: FamilySpec, hop_length: int) -> None:
        super().__init__()
        self.encoder, self.projector, self.spec, self.hop_length = tower, projector, spec, hop_length

    def lengths(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions after the convolutions, positions after the pooling) of clips of `samples`."""
        window = int(self.encoder.config.max_source_positions) * 2  # mel frames: the tower's input length
        mel = torch.clamp((samples + self.hop_length - 1) // self.hop_length, max=window)
        convolved = (mel - 1) // 2 + 1
        return convolved, (convolved - 2) // 2 + 1

    def forward(self, input_features: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        convolved, pooled = self.lengths(audio_lengths)
        positions = torch.arange(int(self.encoder.config.max_source_positions), device=input_features.device)
        keep = positions[None, :] < convolved[:, None]
        mask = torch.zeros(keep.shape, dtype=input_features.dtype, device=input_features.device)
        mask = mask.masked_fill(~keep, torch.finfo(input_features.dtype).min)[:, None, None, :]
        hidden = self.encoder(input_features, attention_mask=mask).last_hidden_state
        return self.projector(hidden), pooled


@dataclass(frozen=True)
class PretrainedLalm:
    """A checkpoint architecture's registry row."""

    model_type: str
    model_class: str  # the transformers class of the whole checkpoint
    spec: FamilySpec  # the audio input as the export and the runtime see it
    split: Callable[[nn.Module, FamilySpec, dict[str, Any]], tuple[nn.Module, nn.Module]]  # (audio graph, causal LM)
    audio_token: Callable[[Any, Any], tuple[str, int]]  # the placeholder the processor expands and its id, from config and processor


def _qwen2_audio_split(model: nn.Module, spec: FamilySpec, feature_config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    from transformers import Qwen2ForCausalLM

    inner = model.model
    decoder = Qwen2ForCausalLM(model.config.text_config)
    decoder.model.load_state_dict(inner.language_model.state_dict())
    decoder.lm_head.load_state_dict(model.lm_head.state_dict())
    graph = Qwen2AudioTowerGraph(inner.audio_tower, inner.multi_modal_projector, spec, int(feature_config.get("hop_length", 160)))
    return graph.eval(), decoder.eval()


PRETRAINED = {
    "qwen2_audio": PretrainedLalm(
        model_type="qwen2_audio",
        model_class="Qwen2AudioForConditionalGeneration",
        spec=dataclasses.replace(get_family("whisper"), name="qwen2_audio", model_types=("qwen2_audio",)),
        split=_qwen2_audio_split,
        audio_token=lambda config, processor: checked_audio_token(processor.audio_token, int(config.audio_token_id), processor.tokenizer),
    ),
}


def checked_audio_token(token: str, token_id: int, tokenizer: Any) -> tuple[str, int]:
    """The processor's placeholder and the config's id for it, which must be the tokenizer's."""
    if tokenizer.convert_tokens_to_ids(token) != token_id:
        raise OptionsError(
            f"the checkpoint's processor calls the audio placeholder {token!r}, which its tokenizer gives id "
            f"{tokenizer.convert_tokens_to_ids(token)}, but its config says {token_id}: the checkpoint is inconsistent; save it again"
        )
    return token, token_id


def pretrained_row(folder: Path) -> PretrainedLalm | None:
    """The row of the checkpoint in `folder` (a Hugging Face folder with a config.json of a
    supported `model_type`), None for any other folder."""
    import json

    config = folder / "config.json"
    if (folder / "lalm_config.json").exists() or not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None
    if model_type in PRETRAINED:
        return PRETRAINED[model_type]
    raise OptionsError(
        f"{folder} is a {model_type!r} checkpoint; --lalm takes an LALM saved by LALM.save_pretrained() or a checkpoint of {', '.join(sorted(PRETRAINED))}"
    )
