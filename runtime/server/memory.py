"""Giving a server's memory back to the system after its busy moments (glibc on Linux; elsewhere
these do nothing). ONNX Runtime's arenas are handled where the runs are (`shrink_arena`)."""

from __future__ import annotations

import ctypes
import ctypes.util

M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


LIBC = _libc()


def limit_malloc_arenas(count: int = 2) -> None:
    """At most `count` malloc arenas for the process: glibc otherwise gives each of a server's
    generation threads one of its own, and each keeps the memory its thread freed."""
    if LIBC is not None:
        LIBC.mallopt(M_ARENA_MAX, count)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)
