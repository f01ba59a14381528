"""ONNX Runtime decoder backends: Optimum's and the model builder's graphs with their KV
cache, behind the `DecoderBackend` interface of `runtime.generation`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.errors import RuntimeUserError

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Graph metadata key: "false" when the graph derives positions from the attention mask's row
# sums (fused GroupQueryAttention), so a left-padded row would get wrong positions.
LEFT_PADDING_METADATA = "lalm_export.left_padding"


def position_ids_for(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding, as Hugging Face's generate computes them."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


class KVBuffers:
    """The KV cache in pre-allocated buffers on one device, two per cache tensor.

    Optimum's graph reads `past_key_values.*` (length L) and writes `present.*` (L + n).
    Each step reads the past from one buffer of a pair and writes the present into the
    other; the next step swaps them. No step allocates, and the cache never leaves the
    device. A sequence longer than the capacity moves to a larger pair in one step: the
    present is the whole cache, so nothing needs copying."""

    def __init__(self, names: list[str], batch: int, heads: int, head_dim: int, dtype: type, device: str, capacity: int) -> None:
        self.names, self.batch, self.heads, self.head_dim = names, batch, heads, head_dim
        self.dtype, self.device = dtype, device
        self.length = 0  # cached positions
        self.allocations = 0
        self.capacity = 0
        self._pair = self._allocate(capacity)
        self._current = 0  # index in the pair of the buffer holding the past
        self._outgrown: list[dict[str, ort.OrtValue]] | None = None  # read by the step in flight

    def _allocate(self, capacity: int) -> list[dict[str, ort.OrtValue]]:
        elements = self.batch * self.heads * capacity * self.head_dim
        self.capacity = capacity
        self.allocations += 1
        return [{name: ort.OrtValue.ortvalue_from_shape_and_type((elements,), self.dtype, self.device, 0) for name in self.names} for _ in range(2)]

    def shape(self, length: int) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, length, self.head_dim)

    def bind(self, binding: ort.IOBinding, new_positions: int) -> None:
        """Bind the past as inputs and the buffers the present is written to as outputs."""
        needed = self.length + new_positions
        source = self._pair[self._current]
        if needed > self.capacity:
            # The binding holds raw pointers: the outgrown pair must live until the step has run.
            self._outgrown = self._pair
            self._pair, self._current = self._allocate(max(2 * self.capacity, needed)), 1
        target = self._pair[1 - self._current]
        for name in self.names:
            binding.bind_input(name, self.device, 0, self.dtype, self.shape(self.length), source[name].data_ptr())
            present = name.replace("past_key_values", "present")
            binding.bind_output(present, self.device, 0, self.dtype, self.shape(needed), target[name].data_ptr())

    def advance(self, new_positions: int) -> None:
        """After the step has run: the buffer just written holds the past."""
        self._current = 1 - self._current
        self.length += new_positions
        self._outgrown = None

    def buffer_pointers(self) -> set[int]:
        return {value.data_ptr() for buffers in self._pair for value in buffers.values()}


class OrtDecoderBackend:
    """Optimum's text-generation-with-past graph: `past_key_values.N.key/value` in, `present.N.*` out.

    With `binding_device` ("cuda", or "cpu" to exercise the same path without a GPU) the
    session runs through IO binding with the KV cache in pre-allocated `KVBuffers` on that
    device; only the logits come back to the host. `reserve(total_length)` sizes the buffers
    for a whole generation before it starts."""

    DEFAULT_CAPACITY = 256

    def __init__(self, session: ort.InferenceSession, binding_device: str | None = None, embed: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.session = session
        # A decoder exported without its embedding (an LALM's) takes `inputs_embeds`: decode
        # steps look their tokens up with `embed`, and prompts come as embeddings.
        self.embed = embed
        self.binding_device = binding_device
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = sorted(
            (name for name in inputs if name.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.split(".")[2]),
        )
        self.uses_position_ids = "position_ids" in inputs
        self.takes_embeds = "inputs_embeds" in inputs
        # float16 in an fp16 graph (only the logits keep float32 there)
        self.embeds_dtype = _ORT_FLOAT.get(inputs["inputs_embeds"].type, np.float32) if self.takes_embeds else np.float32
        if self.takes_embeds and embed is None:
            raise RuntimeUserError("this decoder graph takes inputs_embeds: it needs the bundle's token table (load it through runtime.api)")
        first = inputs[self.past_names[0]] if self.past_names else None
        self.kv_shape = tuple(first.shape[1:]) if first is not None else ()  # (heads, past, head_dim)
        self.kv_dtype = _ORT_FLOAT.get(first.type, np.float32) if first is not None else np.float32
        self.output_names = [o.name for o in session.get_outputs()]
        self.kv: KVBuffers | None = None
        self._capacity = self.DEFAULT_CAPACITY
        self._past: dict[str, Any] = {}
        self._mask = np.zeros((0, 0), dtype=np.int64)

    def reserve(self, total_length: int) -> None:
        """Size the KV buffers of the next generation for `total_length` positions."""
        self._capacity = max(1, int(total_length))

    def _feeds(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.step_feeds(input_ids, self._mask)

    def step_feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs other than the cache: `input_ids` `(batch, new)` (looked up in the
        token table where the graph takes embeddings), or embeddings `(batch, new, hidden)` for a
        prompt; `attention_mask` covers the cache and the new positions."""
        if self.takes_embeds:
            embeds = input_ids if input_ids.ndim == 3 else self.embed(input_ids)
            feeds = {"inputs_embeds": embeds.astype(self.embeds_dtype), "attention_mask": attention_mask}
        else:
            feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask}
        if self.uses_position_ids:
            feeds["position_ids"] = position_ids_for(attention_mask)[:, -input_ids.shape[1] :]
        return feeds

    def past(self) -> dict[str, np.ndarray]:
        """The KV cache after the last call, `(batch, heads, length, head_dim)` per past input (host arrays: no IO binding)."""
        if self.kv is not None:
            raise ValueError("this backend keeps its cache in bound device buffers; create it without binding_device to read the cache")
        return dict(self._past)

    def _run(self, input_ids: np.ndarray) -> np.ndarray:
        if self.kv is not None:
            return self._run_bound(input_ids)
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, {**self._feeds(input_ids), **self._past})))
        self._past = {name: outputs[name.replace("past_key_values", "present")] for name in self.past_names}
        return outputs["logits"][:, -1, :]

    def _run_bound(self, input_ids: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        for name, value in self._feeds(input_ids).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits", "cpu")  # bound first: get_outputs() follows the binding order
        self.kv.bind(binding, input_ids.shape[1])
        self.session.run_with_iobinding(binding)
        self.kv.advance(input_ids.shape[1])
        return binding.get_outputs()[0].numpy()[:, -1, :]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        batch = input_ids.shape[0]
        heads, _, head_dim = self.kv_shape
        self._mask = attention_mask.astype(np.int64)
        if self.binding_device is not None:
            capacity = max(self._capacity, input_ids.shape[1])
            self.kv = KVBuffers(self.past_names, batch, heads, head_dim, self.kv_dtype, self.binding_device, capacity)
        else:
            self.kv = None
            self._past = {name: np.zeros((batch, heads, 0, head_dim), dtype=self.kv_dtype) for name in self.past_names}
        return self._run(input_ids)

    def continue_prefill(self, values: np.ndarray, past: dict[str, np.ndarray]) -> np.ndarray:
        """A prompt's next chunk: `values` (ids, or embeddings where the graph takes them) run
        after `past`, the host cache its earlier chunks left (`past()`); the last position's logits."""
        length = next(iter(past.values())).shape[2]
        self.kv, self._past = None, dict(past)
        self._mask = np.ones((values.shape[0], length + values.shape[1]), dtype=np.int64)
        return self._run(values)

    def prefill_embeds(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """`prefill` for a prompt given as embeddings `(batch, length, hidden)`."""
        if not self.takes_embeds:
            raise RuntimeUserError("this decoder graph takes input_ids, not embeddings")
        return self.prefill(inputs_embeds, attention_mask)

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        self._mask = np.concatenate([self._mask, np.ones((self._mask.shape[0], 1), dtype=np.int64)], axis=1)
        return self._run(token_ids.reshape(-1, 1))


class RowByRowBackend:
    """For graphs that take no left padding: an unpadded batch runs as one; a batch with
    left padding runs each row alone, without its padding, and the logits are stacked."""

    def __init__(self, make: Callable[[], OrtDecoderBackend]) -> None:
        self._make = make
        self._whole = make()
        self._rows: list[OrtDecoderBackend] = []
        self._capacity: int | None = None

    def reserve(self, total_length: int) -> None:
        self._capacity = total_length
        self._whole.reserve(total_length)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        mask = attention_mask.astype(bool)
        if mask.all():
            self._rows = []
            return self._whole.prefill(input_ids, attention_mask)
        starts = mask.argmax(axis=1)
        if not all(mask[row, start:].all() and mask[row].any() for row, start in enumerate(starts)):
            raise RuntimeUserError("the attention mask must be left padding only (zeros, then ones, at least one one per row)")
        self._rows = [self._make() for _ in starts]
        logits = []
        for row, (backend, start) in enumerate(zip(self._rows, starts)):
            if self._capacity is not None:
                backend.reserve(self._capacity)
            ids = input_ids[row : row + 1, start:]
            logits.append(backend.prefill(ids, np.ones_like(ids)))
        return np.concatenate(logits)

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        if not self._rows:
            return self._whole.decode_step(token_ids)
        return np.concatenate([backend.decode_step(token_ids[row : row + 1]) for row, backend in enumerate(self._rows)])


def decoder_backend(session: ort.InferenceSession, binding_device: str | None = None) -> OrtDecoderBackend | RowByRowBackend:
    """The backend a decoder graph needs: row by row when its metadata says it takes no left padding."""

    def make() -> OrtDecoderBackend:
        return OrtDecoderBackend(session, binding_device)

    if session.get_modelmeta().custom_metadata_map.get(LEFT_PADDING_METADATA) == "false":
        return RowByRowBackend(make)
    return make()
