"""`results.json` -> `report.md` and PNG plots people can read."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

CEILING_NAMES = {
    "fp32_gemm_gflops": "fp32 GEMM (best of PyTorch, ONNX Runtime)",
    "bf16_gemm_gflops": "bf16 GEMM (PyTorch)",
    "fp16_gemm_gflops": "fp16 GEMM (PyTorch)",
    "int8_gemm_gops": "int8 MatMul (ONNX Runtime, this CPU's int8 recipe)",
    "memory_bandwidth_gbs": "memory read bandwidth",
}


def _ceiling(key: str, value: float) -> str:
    unit = "GB/s" if key.endswith("gbs") else "GOP/s" if key.endswith("gops") else "GFLOP/s"
    return f"{value:,.0f} {unit}" if unit != "GB/s" else f"{value:,.1f} {unit}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds < 10 else f"{seconds * 1000:.0f}"


def _x(speedup: dict[str, float] | None) -> str:
    return "—" if not speedup else f"{speedup['value']:.2f}× (±{100 * speedup['spread']:.0f} %)"


def _table(headers: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _failed(row: dict[str, Any], width: int) -> list[Any] | None:
    """The cells of a variant whose export failed: the cells that name it (family, input and
    variant for encoders; the variant elsewhere), the reason, dashes."""
    if "failed" not in row:
        return None
    lead = [row["family"], row["case"], row["variant"]] if row["role"] == "encoder" else [row["variant"]]
    reason = row["failed"].splitlines()[0].replace("|", "/")
    return [*lead, f"**FAILED**: {reason[:160]}", *["—"] * (width - len(lead) - 1)]


def _fastest(row: dict[str, Any], figure: str) -> str:
    """The speedup against the fastest eager variant on this machine, naming it."""
    speedup = row["speedups"].get(f"{figure} vs fastest eager")
    return "—" if not speedup else f"{_x(speedup)} ({speedup['reference'].removeprefix('eager-')})"


def _parity_text(row: dict[str, Any]) -> str:
    passed = row["parity"]["passed"]
    return "reference" if row["variant"] == "eager-fp32" else ("—" if passed is None else ("pass" if passed else "**FAIL**"))


def encoder_table(rows: list[dict[str, Any]], references: list[str]) -> list[str]:
    headers = ["family", "input", "variant", "median ms", "p90 ms", "min ms", "audio s/s"]
    headers += [f"vs eager {r}" for r in references] + ["vs fastest eager"]
    headers += ["GFLOP/s (% of ceiling)", "cosine", "min frame cosine", "max-abs / relative", "peak RSS GiB", "parity"]
    body = []
    for row in rows:
        failed = _failed(row, len(headers))
        if failed:
            body.append(failed)
            continue
        lat, fig = row["latency_s"], row["parity"]["figures"]
        ach = row["achieved"]
        pct = f" ({ach['ceiling_pct']:.0f} % {ach['ceiling'].split('_')[0]})" if ach.get("ceiling_pct") is not None else ""
        body.append(
            [
                row["family"],
                row["case"],
                row["variant"],
                _ms(lat["median"]),
                _ms(lat["p90"]),
                _ms(lat["min"]),
                f"{row['throughput']['audio_seconds_per_s']:.1f}",
                *[_x(row["speedups"].get(f"latency vs eager-{r}")) for r in references],
                _fastest(row, "latency"),
                f"{ach['gflops_per_s']:.0f}{pct}",
                f"{fig['cosine']:.6f}",
                f"{fig['row_cosine']:.6f}",
                f"{fig['max_abs']:.2e} / {fig['relative']:.2e}",
                f"{row['peak_rss_gib']:.2f}",
                _parity_text(row),
            ]
        )
    return _table(headers, body)


def decoder_table(rows: list[dict[str, Any]], references: list[str]) -> list[str]:
    headers = ["variant", "TTFT ms", "decode tok/s (median, min–max)"]
    headers += [f"decode vs eager {r}" for r in references] + ["decode vs fastest eager"] + [f"TTFT vs eager {r}" for r in references]
    headers += ["weights MB/token", "bandwidth floor tok/s (reached)", "greedy agreement (first divergence)", "top-1 agreement", "logits cosine", "parity"]
    body = []
    for row in rows:
        failed = _failed(row, len(headers))
        if failed:
            body.append(failed)
            continue
        tps, fig = row["decode_tokens_per_s"], row["parity"]["figures"]
        divergence = "none" if fig["first_divergence"] is None else f"step {fig['first_divergence']}"
        body.append(
            [
                row["variant"],
                _ms(row["ttft_s"]["median"]),
                f"{tps['median']:.1f} ({min(tps['runs']):.1f}–{max(tps['runs']):.1f})",
                *[_x(row["speedups"].get(f"decode tok/s vs eager-{r}")) for r in references],
                _fastest(row, "decode tok/s"),
                *[_x(row["speedups"].get(f"TTFT vs eager-{r}")) for r in references],
                f"{row['weight_bytes_per_token'] / 1e6:.3g}",
                f"{row['bandwidth_floor']['tokens_per_s']:.1f} ({row['bandwidth_floor']['reached_pct']:.0f} %)",
                f"{fig['greedy_agreement']:.0%} ({divergence})",
                f"{fig['top1_agreement']:.0%}",
                f"{fig['cosine']:.6f}",
                _parity_text(row),
            ]
        )
    return _table(headers, body)


def lalm_table(rows: list[dict[str, Any]], references: list[str]) -> list[str]:
    headers = ["variant", "parts (encoder, decoder)", "end to end ms", "encoder ms", "prefill ms", "decode ms"]
    headers += [f"vs eager {r}" for r in references] + ["vs fastest eager", "greedy agreement (first divergence)", "parity"]
    body = []
    for row in rows:
        failed = _failed(row, len(headers))
        if failed:
            body.append(failed)
            continue
        fig, split = row["parity"]["figures"], row["split_s"]
        divergence = "none" if fig["first_divergence"] is None else f"step {fig['first_divergence']}"
        body.append(
            [
                row["variant"],
                f"{row['parts']['encoder']}, {row['parts']['decoder']}",
                _ms(row["latency_s"]["median"]),
                *[_ms(split[part]) for part in ("encoder_s", "prefill_s", "decode_s")],
                *[_x(row["speedups"].get(f"end to end vs eager-{r}")) for r in references],
                _fastest(row, "end to end"),
                f"{fig['greedy_agreement']:.0%} ({divergence})",
                _parity_text(row),
            ]
        )
    return _table(headers, body)


def render_markdown(results: dict[str, Any], plots: list[str]) -> str:
    settings, machine, ceilings = results["settings"], results["machine"], results["ceilings"]
    references = settings["eager_references"]
    lines = [
        f"# lalm-export benchmark: {settings['preset']} preset",
        "",
        f"Made by `{results['command']}` on {results['created']}.",
        "",
        f"- **Machine**: {machine['cpu']} ({', '.join(machine['cpu_flags']) or 'no AVX2 or later flags read'}; instruction set "
        f"{machine.get('isa', '?')}, int8 kernels {machine.get('int8_kernels', '?')}"
        + (f"; flags from {machine['cpu_flags_from']}: CPUID masked or emulated" if machine.get("cpu_flags_from") else "")
        + f"), {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB" + (f", GPU {machine['gpu']}" if machine.get("gpu") else "") + f"; Python {machine['python']}.",
        *(
            [
                "- **No bf16 instructions** on this CPU: PyTorch would emulate bf16 at a few percent of its fp32 speed, so neither an eager "
                "bf16 reference nor a bf16 ceiling is measured; eager fp32 is the fastest eager variant here."
            ]
            if settings["provider"] == "cpu" and "bf16" not in references
            else []
        ),
        "- **Libraries**: " + ", ".join(f"{k} {v}" for k, v in results["libraries"].items()) + ".",
        f"- **Models**: {settings['preset_description']}.",
        f"- **Settings**: provider {settings['provider']}; encoders: {settings['audio_seconds']:g} s of speech-like audio "
        f"at batch {', '.join(map(str, settings['encoder_batches']))} (Whisper: its 30 s window); decoder: prompt "
        f"{settings['prompt_tokens']} tokens + {settings['new_tokens']} new, greedy, batch 1, --decoder-graph {settings.get('decoder_graph', 'auto')}; {settings['warmup_rounds']} warm-up round(s), "
        f"{settings['timed_rounds']['encoder']} (encoders) / {settings['timed_rounds']['decoder']} (decoder) timed rounds, {settings['order']}; "
        f"torch threads {settings['torch_threads']}, ONNX Runtime threads {settings['ort_threads']}"
        + (
            "; CUDA provider options " + ", ".join(f"{k}={v}" for k, v in settings["cuda_provider_options"].items()) + "; eager fp32 without TF32"
            if settings.get("cuda_provider_options")
            else ""
        )
        + ".",
        "- Speedups are ratios of medians measured in this run; ± is the relative standard error of the median per-round ratio; "
        '"vs fastest eager" is against the eager variant with the best median on this machine (named). '
        "Parity is against eager fp32 on the same inputs; a variant's bounds are those of the export's parity gate.",
        "",
        "## Ceilings of this machine (measured in this run)",
        "",
        *_table(list(CEILING_NAMES[k] for k in ceilings), [[_ceiling(k, v) for k, v in ceilings.items()]]),
        "",
    ]
    encoders = [r for r in results["rows"] if r["role"] == "encoder"]
    decoders = [r for r in results["rows"] if r["role"] == "decoder"]
    if encoders:
        lines += ["## Encoders", "", *encoder_table(encoders, references), ""]
        lines += [
            "GFLOP/s counts the eager model's FLOPs (torch.utils.flop_counter) over the variant's median; an int8 variant is held against the int8 ceiling.",
            "",
        ]
    if decoders:
        lines += ["## Decoder", "", f"{decoders[0]['case']}.", "", *decoder_table(decoders, references), ""]
        lines += [
            "The bandwidth floor is memory bandwidth / weight bytes read per token (the embedding table, gathered one row at a time, excluded; "
            "the KV cache, under 10 MB here, excluded). Top-1 agreement feeds the eager fp32 tokens and compares each next-token choice.",
            "",
        ]
    lalms = [r for r in results["rows"] if r["role"] == "lalm"]
    if lalms:
        lines += ["## Audio LLM", "", f"{lalms[0]['case']}: Whisper encoder + projector + decoder, end to end.", "", *lalm_table(lalms, references), ""]
    lines += [
        "## Exports",
        "",
        *_table(
            ["family", "precision", "seconds", "graph MiB", "parity gate", "rewrites"],
            [
                [
                    e["family"],
                    e["precision"],
                    e["seconds"],
                    e.get("graph_mib", "—"),
                    e.get("parity_gate", "error: " + e.get("error", "")),
                    ", ".join(e.get("optimizations", [])) or "—",
                ]
                for e in results["exports"]
            ],
        ),
        "",
    ]
    if plots:
        lines += ["## Plots", "", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    return "\n".join(lines)


def render_plots(results: dict[str, Any], folder: Path) -> list[str]:
    """latency.png (median with min–p90 range), speedup.png, parity.png; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    groups = list(dict.fromkeys((r["family"], r["case"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    width = 0.8 / max(len(variants), 1)
    names = []

    def grouped(ax, value, lower=None, upper=None) -> None:
        failed_xs = []
        for i, variant in enumerate(variants):
            xs, ys, lo, hi = [], [], [], []
            for g, group in enumerate(groups):
                row = next((r for r in rows if (r["family"], r["case"]) == group and r["variant"] == variant), None)
                if row is not None and "failed" in row:
                    failed_xs.append(g + (i - len(variants) / 2 + 0.5) * width)
                    continue
                if row is None or value(row) is None:
                    continue
                xs.append(g + (i - len(variants) / 2 + 0.5) * width)
                ys.append(value(row))
                lo.append(ys[-1] - lower(row) if lower else 0)
                hi.append(upper(row) - ys[-1] if upper else 0)
            if xs:
                ax.bar(xs, ys, width, label=variant, color=colors[variant], yerr=[lo, hi] if lower else None, capsize=2)
        if failed_xs:  # at the foot of the axes, whatever its scale: a variant that failed has no bar
            ax.scatter(
                failed_xs, [0.03] * len(failed_xs), marker="X", s=60, color="red", transform=ax.get_xaxis_transform(), label="failed (see report)", zorder=3
            )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{f}\n{c}" for f, c in groups], fontsize=7)
        if ax.containers:  # an audio-LLM-only run has no per-frame cosine to plot
            ax.legend(fontsize=7)

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 4.5))
    grouped(ax, lambda r: r["latency_s"]["median"] * 1000, lambda r: r["latency_s"]["min"] * 1000, lambda r: r["latency_s"]["p90"] * 1000)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median; bar: min to p90)")
    ax.set_title("Latency per variant (decoder: prompt + all new tokens)")
    names.append(_save(fig, folder / "latency.png"))

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 4.5))
    key = {"encoder": "latency vs eager-fp32", "decoder": "decode tok/s vs eager-fp32", "lalm": "end to end vs eager-fp32"}
    grouped(ax, lambda r: r["speedups"][key[r["role"]]]["value"])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("speedup vs eager fp32 (same run)")
    ax.set_title("Speedup over eager PyTorch fp32\n(encoders: latency; decoder: decode tokens/s; audio LLM: end to end)", fontsize=10)
    names.append(_save(fig, folder / "speedup.png"))

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 4.5))
    grouped(
        ax,
        lambda r: None if r["variant"] == "eager-fp32" or "row_cosine" not in r["parity"]["figures"] else max(1.0 - r["parity"]["figures"]["row_cosine"], 1e-9),
    )
    ax.set_yscale("log")
    ax.axhline(0.005, color="red", linewidth=0.8, linestyle="--", label="encoder bound (min frame cosine 0.995)")
    ax.set_ylabel("1 − minimum per-frame / per-position cosine")
    ax.set_title("Parity against eager fp32 (lower is closer)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    names.append(_save(fig, folder / "parity.png"))
    return names


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
