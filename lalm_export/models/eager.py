"""Eager PyTorch implementations of the runtime's interfaces, for parity checks and benchmarks."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.ort_backends import position_ids_for


@contextmanager
def full_fp32() -> Iterator[None]:
    """No TF32 inside: PyTorch lets cuDNN convolutions use TF32 (10 mantissa bits) by default,
    which puts eager "fp32" 1e-3 away from real fp32 (measured on wav2vec2's 128-tap positional
    convolution on an H100). ONNX Runtime runs with use_tf32=0, so the reference does too."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class EagerDecoderBackend:
    """The Hugging Face causal LM behind the runtime's `DecoderBackend` interface."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        # Only the last position's logits are used: skip the lm_head for the others where the model allows.
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self._past: Any = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)

    @torch.no_grad()
    def _run(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> np.ndarray:
        new = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        positions = torch.from_numpy(position_ids_for(self._mask.numpy()))[:, -new:]
        inputs = {"input_ids": input_ids.to(self.device)} if input_ids is not None else {"inputs_embeds": inputs_embeds.to(self.device)}
        out = self.model(
            **inputs,
            attention_mask=self._mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=self._past,
            use_cache=True,
            **self._keep,
        )
        self._past = out.past_key_values
        return out.logits[:, -1, :].float().cpu().numpy()

    def reserve(self, total_length: int) -> None:
        """Nothing to size: transformers' cache grows as it goes."""

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self._past = None
        self._mask = torch.from_numpy(attention_mask.astype(np.int64))
        return self._run(torch.from_numpy(input_ids.astype(np.int64)))

    def prefill_embeds(self, inputs_embeds: torch.Tensor, attention_mask: np.ndarray) -> np.ndarray:
        """`prefill` for a prompt given as embeddings `(batch, length, hidden)` (an LALM's audio in place)."""
        self._past = None
        self._mask = torch.from_numpy(attention_mask.astype(np.int64))
        return self._run(None, inputs_embeds)

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        self._mask = torch.cat([self._mask, torch.ones(self._mask.shape[0], 1, dtype=torch.long)], dim=1)
        return self._run(torch.from_numpy(token_ids.astype(np.int64)).reshape(-1, 1))


@torch.no_grad()
def eager_encoder_outputs(model: nn.Module, input_name: str, x: np.ndarray, all_hidden_states: bool) -> dict[str, np.ndarray]:
    """The encoder's outputs under the ONNX output names (`last_hidden_state`, `hidden_states.N`),
    as float32 numpy arrays whatever the model's device and dtype."""
    weight = next(model.parameters())
    features = torch.from_numpy(x).to(device=weight.device, dtype=weight.dtype)
    out = model(**{input_name: features}, output_hidden_states=all_hidden_states, return_dict=True)
    result = {"last_hidden_state": out.last_hidden_state.float().cpu().numpy()}
    if all_hidden_states:
        result.update({f"hidden_states.{i}": h.float().cpu().numpy() for i, h in enumerate(out.hidden_states)})
    return result
