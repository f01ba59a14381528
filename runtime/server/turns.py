"""Decode-step scheduling: generations running side by side take one model call each in
turn (first come, first served tickets), so a short request admitted while a long generation
runs finishes after its own tokens plus one step of each other active generation per token,
instead of waiting for the long one to end."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


class Turns:
    """A fair lock: callers get it in the order they asked for it."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._condition.wait()
        try:
            yield
        finally:
            with self._condition:
                self._serving += 1
                self._condition.notify_all()


class TakingTurns:
    """A decoder backend whose model calls (prefill, each decode step) wait for their turn."""

    def __init__(self, backend: object, turns: Turns) -> None:
        self.backend, self.turns = backend, turns

    def reserve(self, total_length: int) -> None:
        self.backend.reserve(total_length)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self.turns.turn():
            return self.backend.prefill(input_ids, attention_mask)

    def prefill_embeds(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self.turns.turn():
            return self.backend.prefill_embeds(inputs_embeds, attention_mask)

    def decode_step(self, token_ids: np.ndarray) -> np.ndarray:
        with self.turns.turn():
            return self.backend.decode_step(token_ids)
