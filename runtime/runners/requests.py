"""The generating requests, one type per task (an encoder's features take an `Audio` and
nothing else), checked when built. The HTTP app and the Ray deployment translate their input to
these; a runner's `prepare` turns one into a `Generation` checked against its bundle (the prompt
rule, EOS, the context), the one path of `transcribe` and `complete` too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.audio import Audio
from runtime.errors import RuntimeUserError
from runtime.generation import DecoderBackend, GenerationOptions, check_prompt_text


def check_stop_strings(stop: Sequence[str]) -> None:
    if any(not isinstance(s, str) or not s for s in stop):
        raise RuntimeUserError("an empty stop string would stop every generation at once; pass the text to stop at")


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first stop string in it (all of it when none is)."""
    cuts = [text.index(s) for s in stop_strings if s and s in text]
    return text[: min(cuts)] if cuts else text


@dataclass(frozen=True)
class CompletionRequest:
    """A decoder bundle's continuation of a text prompt."""

    prompt: str
    options: GenerationOptions = field(default_factory=GenerationOptions)
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_prompt_text(self.prompt)
        self.options.validate()
        check_stop_strings(self.stop)


@dataclass(frozen=True)
class TranscriptionRequest:
    """An audio LLM bundle's text for one clip. `prompt`: None runs the bundle's own; text
    holding the audio placeholder is the whole prompt; other text is the instruction after the
    audio (`LalmRunner.resolve`, the same rule through every door)."""

    audio: Audio
    prompt: str | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prompt is not None:
            check_prompt_text(self.prompt)
        self.options.validate()
        check_stop_strings(self.stop)


class GenerationRun(Protocol):
    def __call__(self, backend: DecoderBackend, on_text: Callable[[str], None] | None = None, cancelled: Callable[[], bool] | None = None) -> Any: ...


@dataclass(frozen=True)
class Generation:
    """A generating request checked against its bundle: the positions its prompt takes, the
    options it runs with (the bundle's EOS, the token budget), and `run(backend, on_text,
    cancelled)`, which generates on a backend (a scheduler's member) and returns the runner's
    result (`Completion` or `Transcription`)."""

    positions: int
    options: GenerationOptions
    run: GenerationRun


Budget = Callable[[int], int]  # the tokens a generation may make, given its prompt's positions
