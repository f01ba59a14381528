"""Long model calls that Ctrl-C can stop. Python runs signal handlers in the main thread
between bytecodes, so while the main thread is inside one ONNX Runtime call (a 100 s clip
through an encoder: a minute or more) SIGINT waits for the call to return. The work runs in a
worker thread instead and the main thread waits for it, where KeyboardInterrupt arrives at once."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_abandoned: list[threading.Thread] = []  # workers still inside a call when the main thread was interrupted


def run_interruptibly(work: Callable[[], T]) -> T:
    """`work()`'s result (or its exception), computed in a worker thread; KeyboardInterrupt in
    the main thread is raised here without waiting for the worker, which is left to the process
    exit (`exit_process`)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = err

    worker = threading.Thread(target=target, name="runtime-work", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        _abandoned.append(worker)
        raise
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def exit_process(code: int) -> None:
    """Exit with `code`. A worker abandoned inside ONNX Runtime would keep running while the
    interpreter and ORT's globals are torn down (and may crash there): flush and leave at once."""
    if any(worker.is_alive() for worker in _abandoned):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
