"""`python -m benchmarks compare BASELINE NEW`: ratios, never absolute times.

Absolute times differ between machines; a speedup over eager PyTorch measured in the same
run does not (much). A speedup that falls by more than the tolerance, a parity figure past
its bound, a variant that no longer runs or an export that failed makes the comparison fail."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from runtime.cpu import isa_label

MIN_TOLERANCE = 0.15
# Speedups over eager PyTorch depend on the CPU (AMX, VNNI, cache sizes): against a baseline
# from another CPU only a large fall counts.
CROSS_MACHINE_TOLERANCE = 0.5
SIGMAS = 3.0  # a fall counts when it exceeds 3 standard errors of the difference of the two runs


@dataclass(frozen=True)
class Finding:
    row: str
    figure: str
    baseline: float | None
    new: float | None
    tolerance: float | None
    verdict: str  # better, same, worse (within tolerance), REGRESSION, PARITY BREACH, MISSING, EXPORT FAILED

    @property
    def fails(self) -> bool:
        return self.verdict.isupper()

    @property
    def change(self) -> float | None:
        if self.baseline in (None, 0) or self.new is None:
            return None
        return self.new / self.baseline - 1


def row_key(row: dict[str, Any]) -> str:
    return f"{row['family']} | {row['case']} | {row['variant']}"


def speed_tolerance(baseline: dict[str, float], new: dict[str, float], fixed: float | None) -> float:
    if fixed is not None:
        return fixed
    combined = (baseline.get("spread", 0.0) ** 2 + new.get("spread", 0.0) ** 2) ** 0.5
    return max(MIN_TOLERANCE, SIGMAS * combined)


def bounds_breached(figures: dict[str, Any], bounds: dict[str, dict[str, float]]) -> list[tuple[str, float | None, dict[str, float]]]:
    """The figures past their bounds ({figure: {"min"|"max": bound}}); a missing or NaN figure counts."""
    found = []
    for name, bound in bounds.items():
        value = figures.get(name)
        if value is None or math.isnan(value) or ("min" in bound and value < bound["min"]) or ("max" in bound and value > bound["max"]):
            found.append((name, value, bound))
    return found


def breaches(row: dict[str, Any]) -> list[tuple[str, float | None, dict[str, float]]]:
    """Parity figures of `row` past their bounds."""
    return bounds_breached(row["parity"]["figures"], row["parity"].get("bounds", {}))


def same_machine(baseline: dict[str, Any], new: dict[str, Any]) -> bool:
    """Same CPU model, instruction set, cores and GPU (the recorded flag list grew over time; the
    instruction set it implies is what counts)."""
    keys = ("cpu", "cores", "gpu")
    same_isa = results_isa(baseline) == results_isa(new)
    return same_isa and all(baseline.get("machine", {}).get(k) == new.get("machine", {}).get(k) for k in keys)


def results_isa(results: dict[str, Any]) -> str:
    """The instruction-set label a result was measured with (runtime/cpu.py's `isa_label`);
    derived from its CPU flags for results written before the label was recorded."""
    machine = results.get("machine", {})
    return machine.get("isa") or isa_label(frozenset(machine.get("cpu_flags", [])))


def baseline_key(results: dict[str, Any]) -> tuple[Any, ...]:
    """What a baseline and the runs compared with it (or made into it) must share: preset,
    provider, instruction set and GPU."""
    return (results["settings"].get("preset"), results["settings"].get("provider"), results_isa(results), results.get("machine", {}).get("gpu"))


def pick_baseline(candidates: list[dict[str, Any]], new: dict[str, Any]) -> dict[str, Any] | None:
    """The baseline of the same preset, provider and instruction set as `new`: ratios of
    eager PyTorch to ONNX Runtime depend on the CPU's kernels (VNNI, AMX, bf16), so a
    baseline of another instruction set says nothing about a regression."""
    return next((c for c in candidates if baseline_key(c) == baseline_key(new)), None)


def lowest_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A baseline from several runs of one preset on one machine: the first run, each ONNX row's
    speedups replaced by their lowest value in any run (a figure a row lacks in some run keeps
    the others'). Some tiny-model ratios move between processes by more than any tolerance would
    pass (the tiny audio LLM's: 1.4x in one process, 2.9x in the next), so the gate compares a
    new run with the slowest seen rather than with whichever run was recorded."""
    keys = {baseline_key(run) for run in runs}
    if len(keys) > 1:
        raise ValueError(f"the runs differ in preset, provider, instruction set or GPU: {sorted(map(str, keys))}")
    baseline = copy.deepcopy(runs[0])
    by_key = [{row_key(r): r for r in run["rows"]} for run in runs]
    for row in baseline["rows"]:
        if row["runtime"] != "onnx" or "failed" in row:
            continue
        same_row = [rows[row_key(row)]["speedups"] for rows in by_key if row_key(row) in rows]
        for figure in row["speedups"]:
            row["speedups"][figure] = min((speedups[figure] for speedups in same_row if figure in speedups), key=lambda s: s["value"])
    baseline["baseline_of"] = {"runs": len(runs), "created": [r.get("created") for r in runs], "rule": "each ONNX speedup the lowest of the runs"}
    return baseline


def compare_results(baseline: dict[str, Any] | None, new: dict[str, Any], tolerance: float | None = None, figures: str | None = None) -> list[Finding]:
    """Findings for every ONNX row of `baseline`; `figures` keeps only the speedups whose
    name contains it (e.g. "vs eager-fp32"). Parity and failed exports are always checked;
    without a baseline (none of this instruction set) only they are."""
    findings = [
        Finding(f"{e['family']} | export | {e['precision']}", "export", None, None, None, "EXPORT FAILED") for e in new.get("exports", []) if "error" in e
    ]
    if baseline is None:
        for row in new["rows"]:
            findings += [Finding(row_key(row), f"parity {name} (bound {bound})", None, value, None, "PARITY BREACH") for name, value, bound in breaches(row)]
        return findings
    floor = 0.0 if same_machine(baseline, new) else CROSS_MACHINE_TOLERANCE
    new_rows = {row_key(r): r for r in new["rows"]}
    for old in baseline["rows"]:
        if old["runtime"] != "onnx" or "failed" in old:
            continue  # eager rows are the yardstick, not the product; a failed variant has no figures
        key = row_key(old)
        row = new_rows.get(key)
        if row is None:
            findings.append(Finding(key, "variant", None, None, None, "MISSING"))
            continue
        if "failed" in row:
            continue  # its export's failure is a finding already
        for figure, before in old["speedups"].items():
            if figures and figures not in figure:
                continue
            after = row["speedups"].get(figure)
            if after is None:
                findings.append(Finding(key, figure, before["value"], None, None, "MISSING"))
                continue
            tol = max(speed_tolerance(before, after, tolerance), floor)
            change = after["value"] / before["value"] - 1
            # `not >=`: a NaN speedup is a regression too
            verdict = "REGRESSION" if not change >= -tol else "better" if change > tol else "worse" if change < 0 else "same"
            findings.append(Finding(key, figure, before["value"], after["value"], tol, verdict))
        old_figures = old["parity"]["figures"]
        for name, value, bound in breaches(row):
            findings.append(Finding(key, f"parity {name} (bound {bound})", old_figures.get(name), value, None, "PARITY BREACH"))
    return findings


def format_findings(findings: list[Finding], show_all: bool = False) -> str:
    shown = [f for f in findings if show_all or f.verdict != "same"]
    lines = [f"{'row':58} {'figure':34} {'baseline':>9} {'new':>9} {'change':>8} {'tolerance':>9}  verdict"]
    for f in shown:

        def num(v: float | None) -> str:
            return "—" if v is None else f"{v:.4g}"

        change = "—" if f.change is None else f"{100 * f.change:+.1f} %"
        tol = "—" if f.tolerance is None else f"±{100 * f.tolerance:.0f} %"
        lines.append(f"{f.row[:58]:58} {f.figure[:34]:34} {num(f.baseline):>9} {num(f.new):>9} {change:>8} {tol:>9}  {f.verdict}")
    counts = {v: sum(f.verdict == v for f in findings) for v in dict.fromkeys(f.verdict for f in findings)}
    failed = [f for f in findings if f.fails]
    lines.append("")
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items()) + f" — {'FAIL' if failed else 'OK'}")
    if not show_all and len(shown) < len(findings):
        lines.append(f"({len(findings) - len(shown)} figures unchanged within tolerance not listed; --all lists them)")
    return "\n".join(lines)
