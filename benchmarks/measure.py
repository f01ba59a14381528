"""Timing that can be trusted on a busy 2-core machine: variants run interleaved
(A B C, A B C, ...) after warm-up, so drift hits all of them alike; ratios come from
runs of the same round."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def summary(values: list[float]) -> dict[str, Any]:
    data = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(data)),
        "p90": float(np.percentile(data, 90)),
        "min": float(data.min()),
        "runs": [round(float(v), 6) for v in data],
    }


def ratio_summary(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """A speedup (numerator / denominator) from the medians, and its spread: the relative
    standard error of the median of the per-round ratios (0.93 x IQR / sqrt(rounds) / median,
    the normal-theory estimate), which shrinks as rounds are added."""
    pairs = np.asarray(numerators, dtype=np.float64) / np.asarray(denominators, dtype=np.float64)
    middle = float(np.median(pairs))
    iqr = float(np.percentile(pairs, 75) - np.percentile(pairs, 25))
    spread = 0.93 * iqr / np.sqrt(len(pairs)) / middle if middle else 0.0
    return {"value": float(np.median(numerators) / np.median(denominators)), "spread": round(float(spread), 4)}


FASTEST_EAGER = "fastest eager"


def speedups_vs_eager(figure: str, eager: dict[str, list[float]], runs: list[float], higher_is_better: bool = False) -> dict[str, dict[str, Any]]:
    """`{figure} vs eager-P` for each eager reference P (`eager`: P -> its per-round values),
    and `{figure} vs fastest eager`: against the reference with the best median on this
    machine (fp32 where bf16 is emulated), named in the figure's `reference`."""

    def ratio(reference: list[float]) -> dict[str, Any]:
        return ratio_summary(runs, reference) if higher_is_better else ratio_summary(reference, runs)

    speedups: dict[str, dict[str, Any]] = {f"{figure} vs eager-{precision}": ratio(values) for precision, values in eager.items()}
    pick = max if higher_is_better else min
    fastest = pick(eager, key=lambda precision: float(np.median(eager[precision])))
    speedups[f"{figure} vs {FASTEST_EAGER}"] = {**ratio(eager[fastest]), "reference": f"eager-{fastest}"}
    return speedups


# Between two timed runs: ONNX Runtime's and OpenMP's worker threads spin-wait after a
# run; without a pause they take the cores from whichever variant runs next.
SETTLE_S = 0.03


def interleaved(runners: dict[str, Callable[[], Any]], warmup: int, repeats: int, on_run: Callable[[], None] | None = None) -> dict[str, list[Any]]:
    """Each runner's results over `repeats` rounds; a runner returns its own timing figures
    (seconds, or a dict for decoders) so that setup outside the timed part is not counted."""
    results: dict[str, list[Any]] = {name: [] for name in runners}
    for round_index in range(warmup + repeats):
        for name, run in runners.items():
            time.sleep(SETTLE_S)
            result = run()
            if round_index >= warmup:
                results[name].append(result)
            if on_run is not None:
                on_run()
    return results


def timed(fn: Callable[[], Any], min_sample_s: float = 0.0) -> Callable[[], float]:
    """Seconds per call of `fn`. With `min_sample_s`, one sample repeats the call enough
    times to last that long (measured once, after a first call), so that millisecond
    calls are not timed at the resolution of the machine's noise."""
    calls = 1
    if min_sample_s > 0:
        fn()
        start = time.perf_counter()
        fn()
        calls = max(1, math.ceil(min_sample_s / max(time.perf_counter() - start, 1e-6)))

    def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    return run


def current_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""
    figures = {"peak_rss_gib": 0.0}
    stop = threading.Event()
    peak = [current_rss_bytes()]

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], current_rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield figures
    finally:
        stop.set()
        thread.join()
        figures["peak_rss_gib"] = round(max(peak[0], current_rss_bytes()) / 2**30, 3)
