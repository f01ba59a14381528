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
- Optimum's graph takes `position_ids`: rows are left-padded (mask zeros first); each step's
  graph writes the whole cache again (its `present` is the past and the new position).
- The fused graph (GroupQueryAttention) derives each row's position from its mask's row sum:
  rows are right-padded, each row's cache at positions 0..length-1, in buffers with room to
  grow. The past and present of a step are bound to the same buffer, so GroupQueryAttention
  writes each row's new position in place (no copy of the cache per step); a step past the
  room doubles it.
A joining row is padded to the batch's width (or the batch to the row's); a leaving row is
cut out (and, left-padded, the padding no row needs any more is trimmed).

Model calls never overlap. Between two decode steps, prefills run while their prompts total
at most a budget of positions (`PREFILL_POSITIONS_PER_STEP` unless the scheduler is given
another; one prompt always may), so a burst of short prompts joins at once; the thread that runs
a step first runs the prefills waiting that the budget lets in, so a waiting prompt gets them
before every step whichever thread wins the lock, and no step runs while a prompt that is done
waits for its thread to join its row. While streams are
running, a longer prompt is prefilled in chunks of the budget, one chunk between two steps,
each chunk over the cache of those before it: it delays the running streams by one chunk a
step, not by its whole length. With no stream running it is prefilled whole. Prompts waiting
together with as many positions (one chat prompt sent by many clients; an audio LLM's prompts
over a fixed audio window) are prefilled as one batch.

int8 graphs quantize activations per tensor, a batch's rows with one scale: a row's logits then
depend slightly on the rows beside it (within the int8 gate's bounds, not bit for bit), as in
any batched run of such a graph."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.errors import RuntimeUserError
from runtime.flags import PREFILL_POSITIONS_PER_STEP
from runtime.ort_backends import LEFT_PADDING_METADATA, OrtDecoderBackend


@dataclass(eq=False)
class _Row:
    """One sequence in the batch: the token it hands in for the next step, the logits it gets back."""

    length: int  # cached positions
    token: int | None = None
    logits: np.ndarray | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Prompt:
    """One row's prompt waiting for its prefill, and what the prefill gives it."""

    values: np.ndarray  # ids (1, length) or embeddings (1, length, hidden)
    done: int = 0  # positions prefilled so far (a long prompt goes in chunks)
    past: dict[str, np.ndarray] | None = None  # the cache of the positions done, until the prompt joins
    logits: np.ndarray | None = None  # (1, vocab), once every position is done
    error: BaseException | None = None

    @property
    def positions(self) -> int:
        return self.values.shape[1]

    @property
    def remaining(self) -> int:
        return self.positions - self.done


class DecodeScheduler:
    """Decode steps of concurrent generations over one decoder session, run as one batch.
    `on_step(rows)` is called with the batch size of every step (a server's histogram);
    `prefill_budget`: prompt positions prefilled between two steps (`PREFILL_POSITIONS_PER_STEP`)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        embed: Callable[[np.ndarray], np.ndarray] | None = None,
        binding_device: str | None = None,
        on_step: Callable[[int], None] | None = None,
        prefill_budget: int = PREFILL_POSITIONS_PER_STEP,
    ) -> None:
        if prefill_budget < 1:
            raise RuntimeUserError(f"the prefill budget must be at least 1 position, not {prefill_budget}")
        self.session, self.binding_device, self.on_step = session, binding_device, on_step
        self.prefill_budget = prefill_budget  # prompt positions between two decode steps (a long prompt's chunk)
        # Prefills run one at a time through this backend (its cache on the host, copied into the
        # batch's); it also knows the graph's inputs, dtypes and feeds for the batch's steps.
        self._prefiller = OrtDecoderBackend(session, None, embed)
        self.takes_embeds = self._prefiller.takes_embeds
        self.right_padded = session.get_modelmeta().custom_metadata_map.get(LEFT_PADDING_METADATA) == "false"
        self._condition = threading.Condition()
        self._rows: list[_Row] = []
        # The batch's KV cache, `(rows, heads, width, head_dim)` per past input, on the host or (IO binding) a device.
        self._cache: dict[str, Any] = {}
        self._waiting: list[_Prompt] = []  # prompts waiting for their prefill, in arrival order
        self._callers: list[list[_Prompt]] = []  # each `prefill` call's prompts, until its rows have joined (or it failed)
        # Prompts arrive here without the lock (deque appends are atomic): a stream's thread that
        # takes the lock step after step cannot hold a new prompt out; whoever holds it next takes them in.
        self._arrivals: deque[list[_Prompt]] = deque()
        self._prefilled_since_step = 0  # prompt positions prefilled since the last decode step
        self.steps = 0  # decode steps run (for tests and benchmarks)
        self.prefills = 0  # prefill calls of the graph (a long prompt's chunks one each; prompts of one length waiting together share one)
        self.step_seconds = 0.0  # time in decode steps' graph calls (for benchmarks: where the time goes)
        self.prefill_seconds = 0.0  # time in prefill calls (and their cache hand-over)

    def member(self) -> ScheduledBackend:
        """A backend for one generation; call its `leave()` when the generation ends."""
        return ScheduledBackend(self)

    @property
    def rows(self) -> int:
        with self._condition:
            return len(self._rows)

    # --- prefill and joining -------------------------------------------------------------

    def prefill(self, prompts: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, list[_Row]]:
        """Prefill each row's prompt (ids `(batch, length)` or embeddings `(batch, length, hidden)`,
        left padding cut off) and add its KV cache to the batch: the last position's logits and
        the new rows. Prompts waiting at once with as many positions run as one batch, whoever's
        they are (the decoder graphs take no padding in a prompt). The rows join together once
        every prompt is done: a row in the batch whose caller still waits for another of its
        prompts would hold up the steps that prompt's chunks wait for."""
        mask = attention_mask.astype(bool)
        starts = mask.argmax(axis=1)
        if not all(mask[row, start:].all() and mask[row].any() for row, start in enumerate(starts)):
            raise RuntimeUserError("the attention mask must be left padding only (zeros, then ones, at least one one per row)")
        mine = [_Prompt(prompts[row : row + 1, start:]) for row, start in enumerate(starts)]
        self._arrivals.append(mine)
        with self._condition:
            self._take_arrivals()
            try:
                while any(prompt.logits is None and prompt.error is None for prompt in mine):
                    group = self._next_prefill_group()
                    if group:
                        self._prefill_group(group)
                    else:
                        self._condition.wait()
                failed = next((prompt.error for prompt in mine if prompt.error is not None), None)
                if failed is not None:
                    raise failed
                rows: list[_Row] = []
                try:
                    for prompt in mine:
                        rows.append(self._join(prompt.past, prompt.positions))
                except BaseException:
                    self._remove(rows)  # rows nobody hands tokens for would stall every step
                    raise
            finally:
                self._waiting = [prompt for prompt in self._waiting if prompt not in mine]
                self._callers.remove(mine)
                self._condition.notify_all()  # the steps held for this caller's join (`_joining`) go on
        return np.concatenate([prompt.logits for prompt in mine]), rows

    def _take_arrivals(self) -> None:
        """Move the prompts that arrived since into the queue, in arrival order (under the lock)."""
        while self._arrivals:
            mine = self._arrivals.popleft()
            self._waiting.extend(mine)
            self._callers.append(mine)

    def _joining(self) -> bool:
        """Whether a caller's prompts are all prefilled but its rows have not joined yet. Steps
        wait for it: its thread needs the lock to join, and streams that hand in their tokens
        without pause could otherwise win the lock step after step while the new row waits."""
        return any(all(prompt.logits is not None or prompt.error is not None for prompt in mine) for mine in self._callers)

    def _next_prefill_group(self) -> list[_Prompt]:
        """The prompts to prefill now, taken from the queue: the first waiting one, with those of
        its length and progress behind it while they fit the step's budget; none while the
        budget is spent. A prompt prefilled in part stays first until it is done."""
        self._take_arrivals()
        if not self._waiting or not self._may_prefill(self._chunk(self._waiting[0])):
            return []
        first = self._waiting[0]
        group = [prompt for prompt in self._waiting if prompt.values.shape == first.values.shape and prompt.done == first.done]
        fits = max(1, (self.prefill_budget - self._prefilled_since_step) // self._chunk(first))
        group = group[:fits]
        self._waiting = [prompt for prompt in self._waiting if prompt not in group]
        return group

    def _chunk(self, prompt: _Prompt) -> int:
        """Positions of `prompt` to prefill in one call: all that remain while no stream runs."""
        return min(prompt.remaining, self.prefill_budget) if self._rows else prompt.remaining

    def _prefill_group(self, group: list[_Prompt]) -> None:
        first = group[0]
        start, size = first.done, self._chunk(first)
        values = np.concatenate([prompt.values[:, start : start + size] for prompt in group])
        self._prefilled_since_step += values.shape[0] * size
        self.prefills += 1
        began = time.perf_counter()
        try:
            if start == 0:
                logits = self._prefiller.prefill(values, np.ones(values.shape[:2], dtype=np.int64))
            else:
                before = {name: np.concatenate([prompt.past[name] for prompt in group]) for name in first.past}
                logits = self._prefiller.continue_prefill(values, before)
            past = self._prefiller.past()
            finished = start + size == first.positions
            for index, prompt in enumerate(group):
                prompt.past = {name: value[index : index + 1] for name, value in past.items()}
                prompt.done += size
                if finished:
                    prompt.logits = logits[index : index + 1]
            if not finished:
                self._waiting[:0] = group  # its next chunk comes before any other prompt
        except Exception as err:  # every prompt of the group hears it
            for prompt in group:
                prompt.error = err
        finally:
            self.prefill_seconds += time.perf_counter() - began
            self._condition.notify_all()

    def _may_prefill(self, positions: int) -> bool:
        """Whether a prompt of `positions` may run now: no stream is waiting, or it is the first
        since the last step, or it fits the step's prefill budget with those before it."""
        spent = self._prefilled_since_step
        return not self._rows or spent == 0 or spent + positions <= self.prefill_budget

    def _join(self, past: dict[str, np.ndarray], length: int) -> _Row:
        """Add one sequence's cache `(1, heads, length, head_dim)` to the batch's."""
        width = max(self._width(), length)
        joined = {}
        for name, value in past.items():
            batch = self._host(name) if self._rows else value[:0]
            joined[name] = np.concatenate([self._pad(batch, width), self._pad(value, width)])
        self._store(joined)
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
        if self.right_padded:  # the buffers keep their room
            self._store({name: self._host(name)[keep] for name in self._cache})
            return
        unused = self._width() - max((row.length for row in self._rows), default=0)
        self._store({name: self._host(name)[keep][:, :, unused:] for name in self._cache})

    # --- decode steps -------------------------------------------------------------------

    def decode_step(self, rows: list[_Row], tokens: np.ndarray) -> np.ndarray:
        """Hand in one token per row; the rows' logits `(len(rows), vocab)` once the step holding them has run."""
        with self._condition:
            for row, token in zip(rows, tokens.reshape(-1)):
                row.token, row.logits, row.error = int(token), None, None
            while any(row.logits is None and row.error is None for row in rows):
                if all(row.token is not None for row in self._rows):
                    self._prefill_waiting()
                    if not self._joining():
                        self._step()  # the last row to hand in its token runs the step for all
                        continue
                self._condition.wait()
            failed = next((row.error for row in rows if row.error is not None), None)
            if failed is not None:
                raise failed
            return np.stack([row.logits for row in rows])

    def _prefill_waiting(self) -> None:
        """Run the waiting prompts' prefills the step's budget lets in, before the step, in
        whichever thread is about to run it: their own threads, woken by the last step, may not
        get the lock before the streams' threads hand their tokens in again, and a prompt would
        then wait step after step for a chunk the budget allows."""
        group = self._next_prefill_group()
        while group:
            self._prefill_group(group)
            group = self._next_prefill_group()

    def _step(self) -> None:
        tokens = np.array([[row.token] for row in self._rows], dtype=np.int64)
        lengths = np.array([row.length for row in self._rows])
        began = time.perf_counter()
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
        self.step_seconds += time.perf_counter() - began
        self._prefilled_since_step = 0
        self._condition.notify_all()

    def _run(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One decoder call for every row's next token; the cache grows by one position."""
        if self.right_padded:
            return self._run_in_place(tokens, lengths)
        width = self._width() + 1
        mask = np.arange(width)[None, :] >= (width - lengths - 1)[:, None]
        feeds = self._prefiller.step_feeds(tokens, mask.astype(np.int64))
        names = ["logits", *(name.replace("past_key_values", "present") for name in self._cache)]
        if self.binding_device is None:
            outputs = self.session.run(names, {**feeds, **self._cache})
        else:
            binding = self._bind(feeds)
            for name, value in self._cache.items():
                binding.bind_ortvalue_input(name, value)
            for name in names[1:]:
                binding.bind_output(name, self.binding_device)
            self.session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            outputs[0] = outputs[0].numpy()
        self._cache = dict(zip(self._cache, outputs[1:]))
        return outputs[0][:, -1, :]

    def _run_in_place(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """A step of the fused graph: each row's new position written into the shared buffers."""
        width = int(lengths.max()) + 1
        if width > self._width():
            room = max(2 * self._width(), width)
            self._store({name: self._pad(self._host(name), room) for name in self._cache})
        mask = np.arange(width)[None, :] < (lengths + 1)[:, None]
        binding = self._bind(self._prefiller.step_feeds(tokens, mask.astype(np.int64)))
        for name, value in self._cache.items():
            buffer = value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)  # a host array is shared, not copied
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buffer)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[:, -1, :]

    def _bind(self, feeds: dict[str, np.ndarray]) -> ort.IOBinding:
        """A binding with the step's inputs other than the cache, and its logits on the host (bound first: output 0)."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits", "cpu")
        return binding

    # --- where the cache lives ----------------------------------------------------------

    def _width(self) -> int:
        """Positions the cache's buffers hold (for the fused graph, its room to grow)."""
        value = next(iter(self._cache.values()), None)
        if value is None:
            return 0
        return int((value.shape if isinstance(value, np.ndarray) else value.shape())[2])

    def _host(self, name: str) -> np.ndarray:
        value = self._cache[name]
        return value if isinstance(value, np.ndarray) else value.numpy()

    def _store(self, values: dict[str, np.ndarray]) -> None:
        if self.binding_device is None:
            self._cache = {name: np.ascontiguousarray(value) for name, value in values.items()}
        else:
            self._cache = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.binding_device, 0) for name, value in values.items()}


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
