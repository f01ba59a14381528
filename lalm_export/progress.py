"""Stage-by-stage progress on stderr, so that stdout stays clean for `--json`."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stages:
    def __init__(self, names: list[str], quiet: bool = False) -> None:
        self.names = names
        self.quiet = quiet
        self.durations: dict[str, float] = {}

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.say(f"[{self.names.index(name) + 1}/{len(self.names)}] {name}: skipped ({reason})")

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        index = self.names.index(name) + 1
        self.say(f"[{index}/{len(self.names)}] {name}{': ' + detail if detail else ''} ...")
        start = time.perf_counter()
        yield
        self.durations[name] = time.perf_counter() - start
        self.say(f"      {name} done in {self.durations[name]:.1f} s")
