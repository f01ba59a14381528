"""Text generation: one short loop over a backend interface with a KV cache.

The ONNX Runtime backends live in `runtime.ort_backends`; lalm_export has an eager PyTorch
backend with the same methods, so parity checks and benchmarks compare them by swapping
one object."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from runtime.errors import RuntimeUserError


class DecoderBackend(Protocol):
    def reserve(self, total_length: int) -> None:
        """Size caches for a generation of `total_length` positions (prompt + new tokens), before it starts."""

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run the prompt `(batch, length)`; return the last position's logits `(batch, vocab)`."""

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        """Append one token per row `(batch,)`; return the next logits `(batch, vocab)`."""


class PromptEmbeds:
    """A backend whose prefill runs a prompt given as embeddings (an LALM's prompt with the
    audio in place; the ids `generate` passes are placeholders of the same length), around a
    backend with `prefill_embeds`; decode steps run token ids as usual."""

    def __init__(self, backend: object, inputs_embeds: object) -> None:
        self.backend, self.inputs_embeds = backend, inputs_embeds

    def reserve(self, total_length: int) -> None:
        self.backend.reserve(total_length)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.backend.prefill_embeds(self.inputs_embeds, attention_mask)

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        return self.backend.decode_step(token_ids)


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    eos_token_id: int | None = None  # the end-of-sequence token; None: the model has none
    stop_at_eos: bool = True  # a row ends at its first EOS (when the model has one)
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise RuntimeUserError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # `not >=`: NaN too
            raise RuntimeUserError(f"temperature must be 0 (greedy) or a positive number, not {self.temperature}")
        if self.top_k < 0:
            raise RuntimeUserError(f"top_k must be 0 (off) or positive, not {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise RuntimeUserError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RuntimeUserError(f"seed must be a whole number from 0 to 2**63 - 1, not {self.seed}")


def choose_tokens(logits: np.ndarray, options: GenerationOptions, rng: np.random.Generator) -> np.ndarray:
    """Greedy at temperature 0; else sample after temperature, top-k and top-p filtering."""
    if options.temperature == 0.0:
        return logits.argmax(axis=-1).astype(np.int64)
    scores = logits.astype(np.float64) / options.temperature
    if options.top_k:
        kth = np.sort(scores, axis=-1)[:, -min(options.top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if options.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the best token)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= options.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def until_eos(tokens: Sequence[int], options: GenerationOptions) -> list[int]:
    """One row's tokens up to and including its first EOS when generation stops there (the
    rest pads a finished row); all of them otherwise."""
    kept = [int(t) for t in tokens]
    if options.stop_at_eos and options.eos_token_id in kept:
        return kept[: kept.index(options.eos_token_id) + 1]
    return kept


# KV positions a generation reserves past its prompt before it starts; longer ones grow their
# buffers by doubling. A budget of the rest of a long context (a server request that does not
# say max_tokens) would otherwise hold that context's whole KV cache while most end at EOS early.
RESERVED_AHEAD = 512


def generate(
    backend: DecoderBackend,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    options: GenerationOptions,
    stop: Callable[[np.ndarray], np.ndarray] | None = None,
    on_step: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Generated tokens `(batch, n)`. A row ends at EOS (`options.stop_at_eos`) or when
    `stop(tokens_so_far)` marks it; finished rows are padded with EOS (or their last token)
    until every row has ended. `on_step(tokens_so_far)` is called after each step, for
    streaming and timing."""
    options.validate()
    rng = np.random.default_rng(options.seed)
    backend.reserve(input_ids.shape[1] + min(options.max_new_tokens, RESERVED_AHEAD))
    logits = backend.prefill(input_ids, attention_mask)
    batch = input_ids.shape[0]
    finished = np.zeros(batch, dtype=bool)
    tokens = np.zeros((batch, 0), dtype=np.int64)
    ends_at_eos = options.stop_at_eos and options.eos_token_id is not None
    for _ in range(options.max_new_tokens):
        next_ids = choose_tokens(logits, options, rng)
        if tokens.shape[1]:
            filler = options.eos_token_id if options.eos_token_id is not None else tokens[:, -1]
            next_ids = np.where(finished, filler, next_ids)
        tokens = np.concatenate([tokens, next_ids[:, None]], axis=1)
        if on_step is not None:
            on_step(tokens)
        if ends_at_eos:
            finished |= next_ids == options.eos_token_id
        if stop is not None:
            finished |= stop(tokens)
        if finished.all() or tokens.shape[1] == options.max_new_tokens:
            break
        logits = backend.decode_step(next_ids)
    return tokens


class StepClock:
    """The `on_step` of one generation: marks the time of each step, streams the first row's
    new text to `on_text` (text from `to_text(tokens)`, which may cut at stop strings), and
    ends the generation early when `cancelled()` says so (a server's timeout or a client gone)."""

    def __init__(
        self,
        to_text: Callable[[Sequence[int]], str],
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.to_text, self.on_text, self.cancelled = to_text, on_text, cancelled
        self.marks: list[float] = []
        self.streamed = ""

    def __call__(self, tokens: np.ndarray) -> None:
        self.marks.append(time.perf_counter())
        if self.cancelled is not None and self.cancelled():
            raise GenerationCancelled("the generation was cancelled")
        if self.on_text is not None:
            # A character split over byte-level tokens decodes as U+FFFD until its last byte comes: hold it back.
            text = self.to_text(tokens[0]).rstrip("\ufffd")
            if len(text) > len(self.streamed) and text.startswith(self.streamed):
                self.on_text(text[len(self.streamed) :])
                self.streamed = text

    def finish(self, text: str) -> None:
        """Stream what the final `text` adds to what was streamed (a character held back at the end)."""
        if self.on_text is not None and len(text) > len(self.streamed) and text.startswith(self.streamed):
            self.on_text(text[len(self.streamed) :])
            self.streamed = text

    def first(self, default: float) -> float:
        """When the first token came (`default` when none did)."""
        return self.marks[0] if self.marks else default

    def tokens_per_s(self, end: float) -> float:
        """Decode rate after the first token."""
        first = self.first(end)
        return (len(self.marks) - 1) / (end - first) if len(self.marks) > 1 and end > first else 0.0


class GenerationCancelled(Exception):
    """Raised inside a generation loop to end it (not a user error: the caller asked for it)."""


def check_prompt_text(prompt: object) -> None:
    """Prompts are text: refuse other types and strings that are not valid UTF-8 (the bytes of
    a command-line argument in another encoding arrive as lone surrogates)."""
    if not isinstance(prompt, str):
        raise RuntimeUserError(f"a prompt must be text (str), not {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RuntimeUserError(f"a prompt is not valid UTF-8 text (character {err.start}); pass it in UTF-8 (e.g. convert with iconv)") from None
