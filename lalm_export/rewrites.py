"""Module rewrites applied before export: same math, a graph the fast kernels can take."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MatMulConv1d(nn.Module):
    """`nn.Conv1d` (groups 1, dilation 1) as its k strided taps concatenated and one MatMul.

    ONNX Runtime's int8 convolution (ConvInteger) is slower than its fp32 Conv, while an
    S8S8 MatMul runs on AMX: written this way, the convolutions of a Wav2Vec2/HuBERT
    feature encoder (a third of its FLOPs) are quantized with the linear layers."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        out_channels, in_channels, kernel = conv.weight.shape
        # Conv1d's attributes, as callers read them (Whisper checks its input length with the strides).
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        # (out, in, k) -> (k * in, out), matching the order the taps are concatenated in.
        self.weight = nn.Parameter(conv.weight.detach().permute(2, 1, 0).reshape(kernel * in_channels, out_channels).clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kernel,), (stride,), (padding,) = self.kernel_size, self.stride, self.padding
        if padding:
            x = F.pad(x, (padding, padding))
        frames = x.transpose(1, 2)  # (batch, time, in)
        last = frames[:, kernel - 1 :: stride]  # the shortest tap sets the output length
        taps = [frames[:, j::stride][:, : last.shape[1]] for j in range(kernel - 1)] + [last]
        y = torch.cat(taps, dim=-1) @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(1, 2)


def can_be_matmul(conv: nn.Module, min_in_channels: int) -> bool:
    return (
        isinstance(conv, nn.Conv1d)
        and conv.groups == 1
        and conv.dilation == (1,)
        and isinstance(conv.padding, tuple)
        and conv.padding_mode == "zeros"
        and conv.in_channels >= min_in_channels
    )


def convolutions_as_matmuls(model: nn.Module, min_in_channels: int = 64) -> int:
    """Swap every eligible Conv1d for a `MatMulConv1d`, in place; returns how many.

    Convolutions with few input channels (Wav2Vec2's first, on raw samples) stay: a MatMul
    with an inner dimension of 10 gains nothing from int8."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if can_be_matmul(child, min_in_channels)]
    for parent, name, child in swaps:
        setattr(parent, name, MatMulConv1d(child))
    return len(swaps)
