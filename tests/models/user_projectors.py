"""Projectors a user might write, importable as `tests.models.user_projectors` (a saved LALM
names its projector's class by import path)."""

from __future__ import annotations

import torch
from torch import nn


class ConvDownsampler(nn.Module):
    """Two strided convolutions: `stride**2` encoder frames per decoder position."""

    def __init__(self, encoder_hidden: int, decoder_hidden: int, stride: int = 2) -> None:
        super().__init__()
        self.encoder_hidden, self.decoder_hidden, self.stride = encoder_hidden, decoder_hidden, stride
        self.first = nn.Conv1d(encoder_hidden, decoder_hidden, kernel_size=stride, stride=stride)
        self.second = nn.Conv1d(decoder_hidden, decoder_hidden, kernel_size=stride, stride=stride)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(hidden.transpose(1, 2), (0, self.stride - 1))
        x = nn.functional.gelu(self.first(x))
        return self.second(nn.functional.pad(x, (0, self.stride - 1))).transpose(1, 2)

    def frames(self, encoder_frames):
        once = (encoder_frames + self.stride - 1) // self.stride
        return (once + self.stride - 1) // self.stride


class ConfiguredLinear(nn.Module):
    """Saved through its `config` dict instead of attributes; keeps the frame count."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.config = {"sizes": sizes}
        self.linear = nn.Linear(sizes[0], sizes[1])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)


class HalvingWithoutRule(nn.Module):
    """Halves the frames but does not say so (no `frames` method)."""

    def __init__(self, encoder_hidden: int, decoder_hidden: int) -> None:
        super().__init__()
        self.encoder_hidden, self.decoder_hidden = encoder_hidden, decoder_hidden
        self.conv = nn.Conv1d(encoder_hidden, decoder_hidden, kernel_size=2, stride=2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden.transpose(1, 2)).transpose(1, 2)


class ForgetsItsArguments(nn.Module):
    def __init__(self, encoder_hidden: int, decoder_hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(encoder_hidden, decoder_hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)
