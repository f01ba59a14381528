"""Text generation: one short loop over a backend interface with a KV cache.

The ONNX Runtime backend lives here; lalm_export has an eager PyTorch backend with the
same two methods, so parity checks and benchmarks compare them by swapping one object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnxruntime as ort

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class DecoderBackend(Protocol):
    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run the prompt `(batch, length)`; return the last position's logits `(batch, vocab)`."""

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        """Append one token per row `(batch,)`; return the next logits `(batch, vocab)`."""


def position_ids_for(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding, as Hugging Face's generate computes them."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


class OrtDecoderBackend:
    """Optimum's text-generation-with-past graph: `past_key_values.N.key/value` in, `present.N.*` out."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = sorted(
            (name for name in inputs if name.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.split(".")[2]),
        )
        self.uses_position_ids = "position_ids" in inputs
        first = inputs[self.past_names[0]] if self.past_names else None
        self.kv_shape = tuple(first.shape[1:]) if first is not None else ()  # (heads, past, head_dim)
        self.kv_dtype = _ORT_FLOAT.get(first.type, np.float32) if first is not None else np.float32
        self.output_names = [o.name for o in session.get_outputs()]
        self._past: dict[str, np.ndarray] = {}
        self._mask = np.zeros((0, 0), dtype=np.int64)

    def _run(self, input_ids: np.ndarray) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64), "attention_mask": self._mask}
        if self.uses_position_ids:
            positions = position_ids_for(self._mask)
            feeds["position_ids"] = positions[:, -input_ids.shape[1]:]
        feeds.update(self._past)
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        self._past = {name: outputs[name.replace("past_key_values", "present")] for name in self.past_names}
        return outputs["logits"][:, -1, :]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        batch = input_ids.shape[0]
        heads, _, head_dim = self.kv_shape
        self._past = {name: np.zeros((batch, heads, 0, head_dim), dtype=self.kv_dtype) for name in self.past_names}
        self._mask = attention_mask.astype(np.int64)
        return self._run(input_ids)

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        self._mask = np.concatenate([self._mask, np.ones((self._mask.shape[0], 1), dtype=np.int64)], axis=1)
        return self._run(token_ids.reshape(-1, 1))


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    eos_token_id: int | None = None  # None: never stop early


def greedy_generate(
    backend: DecoderBackend, input_ids: np.ndarray, attention_mask: np.ndarray, options: GenerationOptions
) -> np.ndarray:
    """Greedy tokens `(batch, n)`; rows that hit EOS are padded with EOS until all have."""
    logits = backend.prefill(input_ids, attention_mask)
    batch = input_ids.shape[0]
    finished = np.zeros(batch, dtype=bool)
    tokens: list[np.ndarray] = []
    for step in range(options.max_new_tokens):
        next_ids = logits.argmax(axis=-1).astype(np.int64)
        if options.eos_token_id is not None:
            next_ids = np.where(finished, options.eos_token_id, next_ids)
            finished |= next_ids == options.eos_token_id
        tokens.append(next_ids)
        if finished.all() or step == options.max_new_tokens - 1:
            break
        logits = backend.decode_step(next_ids)
    return np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), dtype=np.int64)
