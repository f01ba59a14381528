"""An LALM's parts as the export and its gate see them: the audio encoder and projector as one
module (`AudioEncoderGraph`, exported as `audio_encoder.onnx`), and the merged parts an LALM
export works on (`MergedLalm`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lalm_export.models.families import FamilySpec
from lalm_export.models.lalm import encoder_frames


class AudioEncoderGraph(nn.Module):
    """Encoder + projector as one module: the family's input and the clips' lengths in
    samples → projected frames and how many of them are each clip's own."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, spec: FamilySpec) -> None:
        super().__init__()
        self.encoder, self.projector, self.spec = encoder, projector, spec

    def forward(self, features: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(**{self.spec.input_name: features}, output_hidden_states=True).hidden_states
        frames = encoder_frames(self.encoder.config, audio_lengths, self.spec.frame_samples)
        return self.projector(hidden), self.projector.frames(frames)


@dataclass
class MergedLalm:
    graph: AudioEncoderGraph
    decoder: nn.Module  # the merged causal LM, its vocabulary grown by the audio token
    tokenizer: Any
    config: dict[str, Any]
    feature_config: dict[str, Any]
    components: dict[str, dict[str, Any]]  # the manifest's record of each part: its source, merge and notes
