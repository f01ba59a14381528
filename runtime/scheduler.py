"""Continuous batching: the generations a server runs at once share one decoder call per
decode step.

A decode step reads every weight of the decoder whether it serves one sequence or sixteen,
so the scheduler runs the next token of every active generation in one batch. Each
generation keeps its own loop (`runtime.generation.generate`: sampling, seed, stop strings,
cancellation stay per request) over a `ScheduledBackend`: its prefill runs alone, row by row,
and its rows then join the shared batch; each `decode_step` hands in its tokens and returns
when the step that includes them has run; `leave()` takes its rows out (at EOS, a stop
string, the token limit, cancellation or an error, whichever ends the loop).

The batch's KV cache belongs to the scheduler. Rows of different lengths share it through
the attention mask, padded the way the graph reads positions:
- Optimum's graph takes `position_ids`: rows are left-padded (mask zeros first).
- The fused graph (GroupQueryAttention) derives each row's position from its mask's row sum:
  rows are right-padded, each row's cache at positions 0..length-1.
A joining row is padded to the batch's width (or the batch to the row's); a leaving row is
cut out and the padding no row needs any more is trimmed.

Model calls never overlap: between two decode steps at most one prefill runs, so a new
request waits for at most one step and the running streams for at most one prefill."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.errors import RuntimeUserError
from runtime.ort_backends import LEFT_PADDING_METADATA, OrtDecoderBackend


@dataclass(eq=False)
class _Row:
    """One sequence in the batch: the token it hands in for the next step, the logits it gets back."""

    length: int  # cached positions
    token: int | None = None
    logits: np.ndarray | None = None
    error: BaseException | None = None


@dataclass
class _Cache:
    """The batch's KV cache, `(rows, heads, width, head_dim)` per past input, on the host or (IO binding) a device."""

    values: dict[str, Any] = field(default_factory=dict)
    width: int = 0


class DecodeScheduler:
    """Decode steps of concurrent generations over one decoder session, run as one batch.
    `on_step(rows)` is called with the batch size of every step (a server's histogram)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        embed: Callable[[np.ndarray], np.ndarray] | None = None,
        binding_device: str | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.session, self.embed, self.binding_device, self.on_step = session, embed, binding_device, on_step
        self._layout = OrtDecoderBackend(session, None, embed)  # input names, dtypes and feeds of one step
        self.takes_embeds = self._layout.takes_embeds
        self.right_padded = session.get_modelmeta().custom_metadata_map.get(LEFT_PADDING_METADATA) == "false"
        self._condition = threading.Condition()
        self._rows: list[_Row] = []
        self._cache = _Cache()
        self._prefilled_since_step = 0
        self.steps = 0  # decode steps run (for tests and benchmarks)

    def member(self) -> ScheduledBackend:
        """A backend for one generation; call its `leave()` when the generation ends."""
        return ScheduledBackend(self)

    @property
    def rows(self) -> int:
        with self._condition:
            return len(self._rows)

    # --- prefill and joining -------------------------------------------------------------

    def prefill(self, prompts: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, list[_Row]]:
        """Run each row's prompt alone (ids `(batch, length)` or embeddings `(batch, length, hidden)`,
        left padding cut off) and add its KV cache to the batch: the last position's logits and the new rows."""
        mask = attention_mask.astype(bool)
        starts = mask.argmax(axis=1)
        if not all(mask[row, start:].all() and mask[row].any() for row, start in enumerate(starts)):
            raise RuntimeUserError("the attention mask must be left padding only (zeros, then ones, at least one one per row)")
        with self._condition:
            # At most one prefill between two decode steps while streams are running.
            self._condition.wait_for(lambda: not self._rows or self._prefilled_since_step == 0)
            self._prefilled_since_step += 1
            logits, rows = [], []
            try:
                for row, start in enumerate(starts):
                    alone = OrtDecoderBackend(self.session, None, self.embed)
                    prompt = prompts[row : row + 1, start:]
                    logits.append(alone.prefill(prompt, np.ones(prompt.shape[:2], dtype=np.int64)))
                    rows.append(self._join(alone.past(), prompt.shape[1]))
            except BaseException:
                self._remove(rows)  # rows that joined would wait for a decode step that never comes
                raise
            finally:
                self._condition.notify_all()
        return np.concatenate(logits), rows

    def _join(self, past: dict[str, np.ndarray], length: int) -> _Row:
        """Add one sequence's cache `(1, heads, length, head_dim)` to the batch's."""
        width = max(self._cache.width, length)
        joined = {}
        for name, value in past.items():
            batch = self._host(name) if self._rows else value[:0]
            joined[name] = np.concatenate([self._pad(batch, width), self._pad(value, width)])
        self._store(joined, width)
        row = _Row(length)
        self._rows.append(row)
        return row

    def _pad(self, cache: np.ndarray, width: int) -> np.ndarray:
        """`cache` widened to `width` positions: zeros after (right-padded) or before (left-padded) its own."""
        extra = width - cache.shape[2]
        if extra == 0:
            return cache
        padding = np.zeros((*cache.shape[:2], extra, cache.shape[3]), dtype=cache.dtype)
        return np.concatenate([cache, padding] if self.right_padded else [padding, cache], axis=2)

    def leave(self, rows: list[_Row]) -> None:
        """Take `rows` out of the batch and trim the padding no remaining row needs."""
        with self._condition:
            self._remove(rows)
            self._condition.notify_all()  # the rows left may all be waiting for a step now

    def _remove(self, rows: list[_Row]) -> None:
        keep = [index for index, row in enumerate(self._rows) if row not in rows]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[index] for index in keep]
        width = max((row.length for row in self._rows), default=0)
        positions = slice(0, width) if self.right_padded else slice(self._cache.width - width, self._cache.width)
        self._store({name: self._host(name)[keep][:, :, positions] for name in self._cache.values}, width)

    # --- decode steps -------------------------------------------------------------------

    def decode_step(self, rows: list[_Row], tokens: np.ndarray) -> np.ndarray:
        """Hand in one token per row; the rows' logits `(len(rows), vocab)` once the step holding them has run."""
        with self._condition:
            for row, token in zip(rows, tokens.reshape(-1)):
                row.token, row.logits, row.error = int(token), None, None
            while any(row.logits is None and row.error is None for row in rows):
                if all(row.token is not None for row in self._rows):
                    self._step()  # the last row to hand in its token runs the step for all
                else:
                    self._condition.wait()
            failed = next((row.error for row in rows if row.error is not None), None)
            if failed is not None:
                raise failed
            return np.stack([row.logits for row in rows])

    def _step(self) -> None:
        tokens = np.array([[row.token] for row in self._rows], dtype=np.int64)
        lengths = np.array([row.length for row in self._rows])
        try:
            logits = self._run(tokens, lengths)
        except Exception as err:  # every row of the failed step hears it; their generations end
            for row in self._rows:
                row.token, row.error = None, err
        else:
            for row, row_logits in zip(self._rows, logits):
                row.token, row.logits, row.length = None, row_logits, row.length + 1
            if self.on_step is not None:
                self.on_step(len(self._rows))
        self.steps += 1
        self._prefilled_since_step = 0
        self._condition.notify_all()

    def _run(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One decoder call for every row's next token; the cache grows by one position."""
        width = int(lengths.max()) + 1 if self.right_padded else self._cache.width + 1
        positions = np.arange(width)[None, :]
        mask = positions < (lengths + 1)[:, None] if self.right_padded else positions >= (width - lengths - 1)[:, None]
        feeds = self._layout.step_feeds(tokens, mask.astype(np.int64))
        names = ["logits", *(name.replace("past_key_values", "present") for name in self._cache.values)]
        if self.binding_device is None:
            outputs = self.session.run(names, {**feeds, **self._cache.values})
        else:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name, value in self._cache.values.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits", "cpu")
            for name in names[1:]:
                binding.bind_output(name, self.binding_device)
            self.session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            outputs[0] = outputs[0].numpy()
        self._cache = _Cache(dict(zip(self._cache.values, outputs[1:])), max(width, self._cache.width))
        return outputs[0][:, -1, :]

    # --- where the cache lives ----------------------------------------------------------

    def _host(self, name: str) -> np.ndarray:
        value = self._cache.values[name]
        return value if isinstance(value, np.ndarray) else value.numpy()

    def _store(self, values: dict[str, np.ndarray], width: int) -> None:
        if self.binding_device is not None:
            values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.binding_device, 0) for name, value in values.items()}
        self._cache = _Cache(values, width)


class ScheduledBackend:
    """One generation's view of a `DecodeScheduler`: the `DecoderBackend` interface of
    `runtime.generation`, its decode steps batched with every other generation's."""

    def __init__(self, scheduler: DecodeScheduler) -> None:
        self.scheduler = scheduler
        self._rows: list[_Row] = []

    def reserve(self, total_length: int) -> None:
        """Nothing to reserve: the shared cache grows with the batch."""

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.leave()  # a second generation on this backend starts over
        logits, self._rows = self.scheduler.prefill(input_ids, attention_mask)
        return logits

    def prefill_embeds(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if not self.scheduler.takes_embeds:
            raise RuntimeUserError("this decoder graph takes input_ids, not embeddings")
        return self.prefill(inputs_embeds, attention_mask)

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        return self.scheduler.decode_step(self._rows, token_ids)

    def leave(self) -> None:
        """Take this generation's rows out of the batch (at its end, however it ends)."""
        if self._rows:
            self.scheduler.leave(self._rows)
            self._rows = []
