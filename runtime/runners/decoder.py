"""A decoder bundle's runner: prompts in, text out."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from runtime.errors import ContextLengthError, RuntimeUserError
from runtime.flags import PREFILL_POSITIONS_PER_STEP
from runtime.generation import DecoderBackend, GenerationOptions, StepClock, check_prompt_text, generate, until_eos
from runtime.manifest import read_tokenizer
from runtime.ort_backends import decoder_backend
from runtime.runners.bundle import BundleModel, context_length
from runtime.runners.requests import Budget, CompletionRequest, Generation, check_stop_strings, cut_at_stop
from runtime.scheduler import DecodeScheduler
from runtime.sessions import SessionOptions


@dataclass
class Completion:
    prompt: str
    text: str
    tokens: list[int]
    time_to_first_token_s: float
    tokens_per_s: float
    timings: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0


class TextGenerator(BundleModel):
    """Prompts in, text out: tokenization, left padding, the generation loop, stop strings."""

    role: ClassVar[str] = "decoder"

    def __init__(self, folder: str | Path, options: SessionOptions) -> None:
        super().__init__(folder, options)
        self.tokenizer = read_tokenizer(self.folder)
        extra = self.manifest.extra
        self.context_length = context_length(self.manifest, self.folder)
        self.eos_token_id = extra.get("eos_token_id")
        self.pad_token_id = extra.get("pad_token_id", self.eos_token_id) or 0
        # The KV cache lives in pre-allocated buffers on the provider's device (IO binding): on
        # CUDA it never crosses to the host; on the CPU it saves an allocation per step.
        self.backend = self.new_backend()

    def new_backend(self) -> DecoderBackend:
        """A backend of its own (KV buffers included) over the shared session: one per
        generation running at the same time as others."""
        return decoder_backend(self.session, binding_device=self.provider)

    def new_scheduler(self, on_step: Callable[[int], None] | None = None, prefill_budget: int = PREFILL_POSITIONS_PER_STEP) -> DecodeScheduler:
        """A scheduler whose generations share one decoder call per decode step (a server's)."""
        binding = self.provider if self.provider == "cuda" else None
        return DecodeScheduler(self.session, binding_device=binding, on_step=on_step, prefill_budget=prefill_budget)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, left-padded so that every prompt ends at the last column."""
        if not prompts:
            raise RuntimeUserError("no prompt given; pass at least one prompt")
        for prompt in prompts:
            check_prompt_text(prompt)
        encoded = [self.tokenizer.encode(p).ids for p in prompts]
        if any(not ids for ids in encoded):
            raise RuntimeUserError("a prompt encodes to no tokens; pass non-empty text")
        width = max(map(len, encoded))
        ids = np.full((len(encoded), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens) :] = tokens
            mask[row, width - len(tokens) :] = 1
        return ids, mask

    def check_prompts(self, prompts: Sequence[str], options: GenerationOptions) -> tuple[np.ndarray, np.ndarray]:
        """Valid options, prompts that encode, and room in the context for them and the new tokens: ids and mask."""
        options.validate()
        ids, mask = self.encode_prompts(prompts)
        if ids.shape[1] + options.max_new_tokens > self.context_length:
            raise ContextLengthError(ids.shape[1], options.max_new_tokens, self.context_length)
        return ids, mask

    def prepare(self, request: CompletionRequest, budget: Budget | None = None) -> Generation:
        """`request` made ready to generate: the bundle's EOS, the prompt checked to fit the
        context with the token budget (`budget(positions)` when given, else the options')."""
        ids, _ = self.check_prompts([request.prompt], request.options)
        options = request.options if budget is None else replace(request.options, max_new_tokens=budget(ids.shape[1]))

        def run(backend: DecoderBackend, on_text: Callable[[str], None] | None = None, cancelled: Callable[[], bool] | None = None) -> Completion:
            return self.complete([request.prompt], options, request.stop, on_text, backend, cancelled)[0]

        return Generation(ids.shape[1], options, run)

    def decode(self, tokens: Sequence[int]) -> str:
        kept = [t for t in tokens if t != self.eos_token_id]
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def complete(
        self,
        prompts: Sequence[str],
        options: GenerationOptions,
        stop_strings: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        backend: DecoderBackend | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Completion]:
        """Generate for each prompt; `on_text` streams the first prompt's new text as it comes.
        `backend`: one of `new_backend()`'s, for callers running generations side by side;
        `cancelled()` true ends the generation (`GenerationCancelled`)."""
        ids, mask = self.check_prompts(prompts, options)
        check_stop_strings(stop_strings)
        if options.eos_token_id is None:
            options = replace(options, eos_token_id=self.eos_token_id)
        clock = StepClock(lambda row: self._text(row, options, stop_strings), on_text, cancelled)

        def stop(tokens: np.ndarray) -> np.ndarray:
            return np.array([any(s in self.decode(row) for s in stop_strings) for row in tokens], dtype=bool)

        start = time.perf_counter()
        tokens = generate(backend or self.backend, ids, mask, options, stop=stop if stop_strings else None, on_step=clock)
        end = time.perf_counter()
        ttft, rate = clock.first(end) - start, clock.tokens_per_s(end)
        completions = []
        for prompt, row, prompt_row in zip(prompts, tokens, mask):
            kept = until_eos(row, options)
            text = self._text(kept, options, stop_strings)
            timings = {"total_s": round(end - start, 6)}
            completions.append(Completion(prompt, text, kept, round(ttft, 6), round(rate, 3), timings, int(prompt_row.sum())))
        clock.finish(completions[0].text)
        return completions

    def _text(self, tokens: Sequence[int], options: GenerationOptions, stop_strings: Sequence[str]) -> str:
        """The completion's text: up to its first EOS when generation stops there, cut at a stop string."""
        kept = until_eos(tokens, options)
        return cut_at_stop(self.decode(kept), stop_strings)
