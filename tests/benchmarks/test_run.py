"""`python -m benchmarks run` end to end on tiny models: every figure the report promises is
in results.json, the report and plots are written, and earlier results are never overwritten."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest

from benchmarks.presets import eager_precisions
from benchmarks.run import weight_bytes_per_token
from runtime.cpu import has_bf16
from tests.helpers import assert_user_error, run_cli, run_main

# eager bf16 where this CPU has bf16 instructions; fp32 alone where PyTorch would emulate it
EAGER = tuple(f"eager-{p}" for p in eager_precisions("cpu"))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "not-yet" / "tiny"  # --out's parent is created too
    result = run_cli("run", "--preset", "tiny", "--families", "wav2vec2", "llm", "--repeats", "2", "--out", out, module="benchmarks")
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "results.json").read_text())


def test_results_hold_every_variant_with_timings_speedups_and_parity(bench):
    _, results = bench
    variants = {(r["family"], r["case"], r["variant"]) for r in results["rows"]}
    for batch in (1, 4):
        for variant in (*EAGER, "onnx-fp32", "onnx-int8"):
            assert ("wav2vec2", f"batch {batch}, 1 s", variant) in variants
    assert {r["variant"] for r in results["rows"] if r["family"] == "llm"} == {*EAGER, "onnx-fp32", "onnx-int8", "onnx-int4", "onnx-int4-b128"}
    for row in results["rows"]:
        assert row["latency_s"]["min"] <= row["latency_s"]["median"] <= row["latency_s"]["p90"]
        assert len(row["latency_s"]["runs"]) == 2
        for reference in EAGER:  # every row is measured against every eager precision
            figures = {k: v["value"] for k, v in row["speedups"].items() if k.endswith(f"vs {reference}")}
            assert figures and all(value > 0 for value in figures.values()), (row["variant"], row["speedups"])
            if row["variant"] == reference:
                assert all(value == 1.0 for value in figures.values())
        fastest = {k: v for k, v in row["speedups"].items() if k.endswith("vs fastest eager")}
        assert fastest and all(v["reference"] in EAGER for v in fastest.values()), row["speedups"]
        for name, figure in fastest.items():  # the same ratio as against the eager variant it names
            assert figure["value"] == row["speedups"][name.replace("fastest eager", figure["reference"])]["value"]
        assert row["peak_rss_gib"] > 0 and row["flops"] > 0
        if row["runtime"] == "onnx":
            assert row["parity"]["passed"] is True, row["parity"]
    encoder = next(r for r in results["rows"] if r["variant"] == "onnx-int8" and r["role"] == "encoder")
    assert {"max_abs", "relative", "cosine", "row_cosine"} <= set(encoder["parity"]["figures"])
    assert encoder["throughput"]["audio_seconds_per_s"] > 0 and encoder["achieved"]["ceiling"] == "int8_gemm_gops"
    decoder = next(r for r in results["rows"] if r["variant"] == "onnx-int4")
    assert {"greedy_agreement", "first_divergence", "top1_agreement"} <= set(decoder["parity"]["figures"])
    assert decoder["weight_bytes_per_token"] > 0 and decoder["bandwidth_floor"]["tokens_per_s"] > 0
    assert decoder["ttft_s"]["median"] > 0 and decoder["decode_tokens_per_s"]["median"] > 0
    fp32 = next(r for r in results["rows"] if r["variant"] == "onnx-fp32" and r["role"] == "decoder")
    assert decoder["weight_bytes_per_token"] < fp32["weight_bytes_per_token"] / 3, "int4 reads far fewer weight bytes"


def test_results_describe_machine_ceilings_settings_and_exports(bench):
    _, results = bench
    assert results["machine"]["cores"] >= 1 and results["libraries"]["onnxruntime"]
    assert all(results["ceilings"][k] > 0 for k in ("fp32_gemm_gflops", "int8_gemm_gops", "memory_bandwidth_gbs"))
    assert ("bf16_gemm_gflops" in results["ceilings"]) == has_bf16(), "no bf16 ceiling where bf16 is emulated"
    machine = results["machine"]
    assert machine["isa"] and machine["int8_kernels"] in ("amx", "avx512-vnni", "avx-vnni", "avx2") and machine["cpu"]
    assert results["settings"]["preset"] == "tiny" and results["command"].startswith("python -m benchmarks run")
    assert {(e["family"], e["precision"]) for e in results["exports"]} == {
        ("wav2vec2", "fp32"),
        ("wav2vec2", "int8"),
        ("llm", "fp32"),
        ("llm", "int8"),
        ("llm", "int4"),
        ("llm", "int4-b128"),
    }
    assert all(e["parity_gate"] == "passed" for e in results["exports"])


def test_report_and_plots_are_written(bench):
    out, _ = bench
    report = (out / "report.md").read_text()
    for heading in ("## Ceilings", "## Encoders", "## Decoder", "## Exports", "![speedup](speedup.png)"):
        assert heading in report
    for name in ("latency.png", "speedup.png", "parity.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_a_run_compared_with_itself_passes(bench):
    out, _ = bench
    result = run_cli("compare", out / "results.json", out / "results.json", module="benchmarks")
    assert result.returncode == 0, result.stdout


def test_existing_results_are_not_overwritten(bench):
    out, _ = bench
    before = (out / "results.json").read_bytes()
    result = run_cli("run", "--preset", "tiny", "--families", "whisper", "--out", out, module="benchmarks")
    assert_user_error(result, "--force")
    assert (out / "results.json").read_bytes() == before


def test_a_complete_run_leaves_no_partial_results(bench):
    out, _ = bench
    assert not (out.parent / f"{out.name}.partial.json").exists()


def test_gpu_preset_needs_the_cuda_provider(tmp_path):
    result = run_cli("run", "--preset", "gpu", "--out", tmp_path / "gpu", module="benchmarks")
    assert_user_error(result, "--provider cuda")
    assert not (tmp_path / "gpu").exists()


def test_a_family_that_fails_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    from benchmarks import run as bench_run

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_run, "bench_encoder", crash)
    monkeypatch.setattr(bench_run.torch, "set_num_threads", lambda n: None)  # the preset's thread count would outlive the test
    settings = bench_run.make_settings("tiny", ["whisper", "llm"], ["fp32"], "cpu", tmp_path, repeats=1)
    snapshots = []
    results = bench_run.run_benchmarks(settings, "test", quiet=True, on_family_done=lambda so_far: snapshots.append(len(so_far["rows"])))
    failures = [e for e in results["exports"] if "error" in e]
    assert [(e["family"], e["precision"]) for e in failures] == [("whisper", "timing")]
    assert "illegal memory access" in failures[0]["error"]
    assert {r["family"] for r in results["rows"]} == {"llm"}
    assert snapshots == [0, len(results["rows"])]  # called after each family with the rows so far


def test_report_command_rewrites_the_report_from_results(bench):
    out, _ = bench
    (out / "report.md").unlink()
    result = run_cli("report", out / "results.json", module="benchmarks")
    assert result.returncode == 0, result.stderr
    assert "## Encoders" in (out / "report.md").read_text()


@pytest.mark.slow
def test_accuracy_command_trains_exports_and_measures(tmp_path):
    out = tmp_path / "accuracy"
    result = run_cli("accuracy", "--seconds", "4", "--prompts", "1", "--out", out, "-q", module="benchmarks")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "accuracy.json").read_text())
    rows = {r["precision"]: r for r in results["rows"]}
    assert set(rows) == {"eager-bf16", "fp32", "int8", "int4", "int4-h4", "int4-gptq", "int4-gptq-self", "int4-gptq-h4", "int4-b128", "int4-gptq-b128"}
    assert rows["eager-bf16"]["logits_cosine"] < 1.0, "bf16 rounds: it is not the fp32 reference"
    assert all(export["parity_gate"] for export in results["exports"])
    assert rows["fp32"]["top1_agreement"] == 1.0 and rows["fp32"]["greedy_agreement"] == 1.0, "fp32 is exact"
    assert rows["fp32"]["greedy_diverged_prompts"] == 0 and rows["fp32"]["divergence_margin_median"] is None
    evaluation = results["evaluation"]
    assert 0.0 < evaluation["held_out_loss"] < 8.0 and 0.0 <= evaluation["decided_share"] <= 1.0
    for row in rows.values():  # a model trained for seconds may be decided nowhere
        decided = row["top1_agreement_decided"]
        assert decided is None if evaluation["decided_share"] == 0 else 0.0 <= decided <= 1.0
    assert results["corpus"]["held_out_tokens"] > 0 and results["corpus"]["files"] > 1
    assert results["model"]["steps"] > 0 and results["corpus"]["tokens"] > 10_000
    assert "| int4 |" in (out / "accuracy.md").read_text() and "| int4-gptq |" in (out / "accuracy.md").read_text()
    encoder = {r["precision"]: r for r in results["real_encoder"]["rows"]}
    assert set(encoder) == {"fp32", "int8"}, "int4 is for decoders only"
    assert encoder["fp32"]["parity_gate"] == "passed" and encoder["fp32"]["relative"] < 1e-4
    # The mixed int8 scheme keeps the MatMuls that break the gate in fp32: real Whisper's int8 passes the default gate.
    assert 0.9 < encoder["int8"]["cosine"] < 1.0 and encoder["int8"]["parity_gate"] == "passed"
    assert "## Encoder on real weights" in (out / "accuracy.md").read_text()


def test_decode_floor_holds_each_bundle_and_its_weight_kernels_against_the_bandwidth_of_its_round(checkpoints, tmp_path):
    from lalm_export.export.component import ExportOptions, export_bundle

    for graph in ("fused", "optimum"):
        export_bundle(ExportOptions(family="llm", model=str(checkpoints["llm"]), output=tmp_path / graph, precision="int4", decoder_graph=graph), quiet=True)
    result = run_cli(tmp_path / "fused", tmp_path / "optimum", "--rounds", "1", "--steps", "4", "--prompt", "8", "--json", module="benchmarks.decode_floor")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout[result.stdout.index("{") :])
    assert figures["bandwidth_gbs_median"] > 0
    for graph in ("fused", "optimum"):
        bundle = figures["bundles"][str(tmp_path / graph)]
        assert bundle["step_ms_median"] > 0 and bundle["weights_mb_per_token"] > 0 and 0 < bundle["floor_fraction_median"]
        kernels = bundle["weight_kernels"]  # an int4 graph's weights are all MatMulNBits: measured alone
        assert kernels["gbs_median"] > 0 and 0 < kernels["bandwidth_fraction_median"] and 0 < kernels["step_fraction_median"]
    assert "its weight kernels alone stream" in result.stdout
    fused = onnx.load(str(tmp_path / "fused" / "model.onnx"))
    tables = {"model.embed_tokens.weight", "cos_cache", "sin_cache"}  # read one row per step
    assert tables <= {t.name for t in fused.graph.initializer}
    read = sum(onnx.numpy_helper.to_array(t).nbytes for t in fused.graph.initializer if t.name not in tables)
    assert weight_bytes_per_token(tmp_path / "fused" / "model.onnx") == read
    export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=tmp_path / "encoder"), quiet=True)
    assert_user_error(run_cli(tmp_path / "encoder", module="benchmarks.decode_floor"), "pass decoder bundles")


@pytest.mark.slow
def test_the_audio_llm_is_timed_end_to_end_against_eager(tmp_path):
    out = tmp_path / "lalm"
    result = run_cli("run", "--preset", "tiny", "--families", "lalm", "--repeats", "2", "--out", out, module="benchmarks")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == {*EAGER, "onnx-fp32", "onnx-int8", "onnx-int4"}
    assert rows["onnx-int4"]["parts"] == {"encoder": "int8", "decoder": "int4"}
    assert rows["onnx-fp32"]["parity"]["passed"] is True and rows["onnx-fp32"]["parity"]["figures"]["greedy_agreement"] == 1.0
    for row in rows.values():
        assert all(row["split_s"][part] > 0 for part in ("encoder_s", "prefill_s", "decode_s"))
        assert {f"end to end vs {reference}" for reference in EAGER} | {"end to end vs fastest eager"} <= set(row["speedups"])
    exports = {e["precision"]: e for e in results["exports"]}  # what the bundles' graphs were rewritten with, as for components
    assert all("self-attention fused into MultiHeadAttention" in exports[p]["optimizations"] for p in ("fp32", "int8", "int4"))
    assert "## Audio LLM" in (out / "report.md").read_text()


def with_int8_refused(results: dict) -> dict:
    """`results` as if the wav2vec2 int8 export had been refused by its parity gate."""
    from benchmarks.run import failed_rows

    refused = copy.deepcopy(results)
    refused["rows"] = [r for r in refused["rows"] if (r["family"], r["variant"]) != ("wav2vec2", "onnx-int8")]
    export = next(e for e in refused["exports"] if (e["family"], e["precision"]) == ("wav2vec2", "int8"))
    export.clear()
    export.update({"family": "wav2vec2", "precision": "int8", "error": "parity gate failed: last_hidden_state cosine 0.998857 < 0.999", "seconds": 1.0})
    refused["rows"] += failed_rows("wav2vec2", refused["rows"], refused["exports"])
    return refused


def test_a_variant_that_fails_stays_in_the_tables_and_plots_and_fails_the_run(bench, tmp_path, monkeypatch, capsys):
    from benchmarks import run as bench_run
    from benchmarks.__main__ import main as bench_main

    _, results = bench
    refused = with_int8_refused(results)
    failed = [r for r in refused["rows"] if "failed" in r]
    assert {(r["case"], r["variant"]) for r in failed} == {("batch 1, 1 s", "onnx-int8"), ("batch 4, 1 s", "onnx-int8")}
    assert bench_run.failed_variants(refused) == ["wav2vec2 onnx-int8"]
    monkeypatch.setattr(bench_run, "run_benchmarks", lambda *args, **kwargs: refused)
    outcome = run_main(bench_main, "run", "--preset", "tiny", "--families", "wav2vec2", "--out", tmp_path / "refused", capsys=capsys)
    assert outcome.returncode == 1 and "FAILED (export, parity or timing): wav2vec2 onnx-int8" in outcome.stderr
    report = (tmp_path / "refused" / "report.md").read_text()
    assert report.count("| wav2vec2 | batch 1, 1 s | onnx-int8 | **FAILED**: parity gate failed: last_hidden_state cosine 0.998857") == 1
    assert all((tmp_path / "refused" / name).read_bytes()[:8] == PNG_MAGIC for name in ("latency.png", "speedup.png", "parity.png"))
    allowed = run_main(bench_main, "run", "--preset", "tiny", "--allow-failures", "--out", tmp_path / "allowed", capsys=capsys)
    assert allowed.returncode == 0 and "FAILED" in allowed.stderr


def test_without_bf16_instructions_there_is_no_eager_bf16_reference(monkeypatch):
    from benchmarks.report import render_markdown

    monkeypatch.setenv("LALM_CPU_FLAGS", "avx avx2 fma avx512f")  # AVX-512 without BF16: PyTorch emulates bf16
    assert eager_precisions("cpu") == ("fp32",) and eager_precisions("cuda") == ("fp32", "fp16")
    monkeypatch.setenv("LALM_CPU_FLAGS", "avx2 avx512f avx512_vnni avx512_bf16")
    assert eager_precisions("cpu") == ("fp32", "bf16")
    results = {
        "command": "test",
        "created": "now",
        "machine": {
            **{"cpu": "AVX2 CPU", "cpu_flags": ["avx2"], "isa": "avx2", "int8_kernels": "avx2", "cores": 2, "memory_gib": 8, "python": "3"},
            "cpu_flags_from": "LALM_CPU_FLAGS",
        },
        "libraries": {},
        "settings": {**bench_settings(), "eager_references": ["fp32"]},
        "ceilings": {"fp32_gemm_gflops": 100.0},
        "exports": [],
        "rows": [],
    }
    report = render_markdown(results, [])
    assert "No bf16 instructions" in report and "flags from LALM_CPU_FLAGS: CPUID masked or emulated" in report


def bench_settings() -> dict:
    from benchmarks.run import make_settings

    return make_settings("tiny", ["wav2vec2"], None, "cpu", Path("."), None).to_dict()
