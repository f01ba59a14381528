"""`python -m benchmarks compare`: a real regression or parity breach fails, noise does not."""

from __future__ import annotations

import copy
import json

import pytest

from benchmarks.__main__ import main as bench_main
from benchmarks.compare import MIN_TOLERANCE, compare_results
from tests.helpers import assert_user_error, run_cli, run_main

MACHINE = {"cpu": "Test CPU", "cpu_flags": ["avx2"], "cores": 2, "gpu": None}


def row(variant: str, speedup: float, spread: float = 0.02, cosine: float = 0.9995) -> dict:
    return {
        "family": "wav2vec2",
        "case": "batch 1, 10 s",
        "variant": variant,
        "runtime": variant.split("-")[0],
        "speedups": {"latency vs eager-fp32": {"value": speedup, "spread": spread}},
        "parity": {"figures": {"cosine": cosine, "row_cosine": cosine}, "bounds": {"cosine": {"min": 0.999}, "row_cosine": {"min": 0.995}}, "passed": True},
    }


def results(speedup: float = 3.0, spread: float = 0.02, cosine: float = 0.9995, machine: dict | None = None) -> dict:
    return {
        "machine": machine or MACHINE,
        "settings": {},
        "exports": [{"family": "wav2vec2", "precision": "int8", "seconds": 1.0}],
        "rows": [row("eager-fp32", 1.0), row("onnx-int8", speedup, spread, cosine)],
    }


def verdicts(findings) -> set[str]:
    return {f.verdict for f in findings}


def test_a_synthetic_regression_is_caught():
    findings = compare_results(results(3.0), results(2.0))
    assert "REGRESSION" in verdicts(findings)
    assert any(f.fails for f in findings)


def test_noise_within_tolerance_is_not_a_regression():
    findings = compare_results(results(3.0), results(3.0 * (1 - MIN_TOLERANCE + 0.03)))
    assert not any(f.fails for f in findings)
    assert verdicts(findings) == {"worse"}


def test_the_tolerance_grows_with_the_measured_spread():
    fall = 3.0 * 0.75  # -25 %: a regression for tight runs, noise for runs with a 10 % standard error
    assert "REGRESSION" in verdicts(compare_results(results(3.0, 0.02), results(fall, 0.02)))
    assert "REGRESSION" not in verdicts(compare_results(results(3.0, 0.10), results(fall, 0.10)))


def test_an_explicit_tolerance_overrides_the_default():
    assert "REGRESSION" not in verdicts(compare_results(results(3.0), results(2.0), tolerance=0.4))


def test_a_parity_breach_is_caught_even_when_faster():
    findings = compare_results(results(3.0), results(4.0, cosine=0.99))
    assert "PARITY BREACH" in verdicts(findings) and "better" in verdicts(findings)


def test_a_missing_variant_and_a_failed_export_fail():
    new = results(3.0)
    new["rows"] = new["rows"][:1]
    new["exports"][0]["error"] = "parity gate failed"
    assert {"MISSING", "EXPORT FAILED"} <= verdicts(compare_results(results(3.0), new))


def test_eager_rows_are_not_gated():
    new = results(3.0)
    new["rows"][0]["speedups"]["latency vs eager-fp32"]["value"] = 0.1
    assert not any(f.fails for f in compare_results(results(3.0), new))


def test_another_cpu_widens_the_tolerance():
    other = results(2.0, machine={**MACHINE, "cpu": "Other CPU"})
    assert "REGRESSION" not in verdicts(compare_results(results(3.0), other))  # -33 % < 50 %
    assert "REGRESSION" in verdicts(compare_results(results(3.0), results(1.2, machine={**MACHINE, "cpu": "Other CPU"})))


def test_figures_filter_keeps_parity_gated():
    new = results(2.0, cosine=0.5)
    findings = compare_results(results(3.0), new, figures="vs eager-bf16")
    assert verdicts(findings) == {"PARITY BREACH"}


def test_cli_exit_codes_and_table(tmp_path):
    base, same, worse = tmp_path / "base.json", tmp_path / "same.json", tmp_path / "worse.json"
    base.write_text(json.dumps(results(3.0)))
    same.write_text(json.dumps(results(3.05)))
    worse.write_text(json.dumps(results(1.5)))
    ok = run_cli("compare", base, same, module="benchmarks")
    assert ok.returncode == 0 and "OK" in ok.stdout
    failed = run_cli("compare", base, worse, module="benchmarks")
    assert failed.returncode == 1 and "REGRESSION" in failed.stdout and "-50.0 %" in failed.stdout


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "does not exist"), ("{not json", "not valid JSON"), ('{"rows": []}', "not a results.json")],
)
def test_cli_bad_results_file_is_a_clear_error(tmp_path, content, fragment, capsys):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(results()))
    new = tmp_path / "new.json"
    if content is not None:
        new.write_text(content)
    assert_user_error(run_main(bench_main, "compare", base, new, capsys=capsys), fragment)


def test_cli_refuses_a_tolerance_that_is_not_a_fraction(tmp_path, capsys):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(results()))
    assert_user_error(run_main(bench_main, "compare", base, base, "--tolerance", "15", capsys=capsys), "fraction")


def test_compare_does_not_modify_its_inputs():
    baseline, new = results(3.0), results(2.0)
    before = copy.deepcopy((baseline, new))
    compare_results(baseline, new)
    assert (baseline, new) == before


AVX512_VNNI = {**MACHINE, "cpu_flags": ["avx2", "avx512_vnni", "avx512f"]}


def test_a_folder_of_baselines_compares_with_the_one_of_the_same_instruction_set(tmp_path, capsys):
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    (baselines / "tiny-avx2.json").write_text(json.dumps(results(3.0)))
    (baselines / "tiny-avx512-vnni.json").write_text(json.dumps(results(6.0, machine=AVX512_VNNI)))
    new = tmp_path / "new.json"
    new.write_text(json.dumps(results(2.9)))  # an AVX2 run: -3 % against its own baseline, -52 % against the VNNI one
    ok = run_main(bench_main, "compare", baselines, new, capsys=capsys)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout
    new.write_text(json.dumps(results(2.9, machine=AVX512_VNNI)))
    assert run_main(bench_main, "compare", baselines, new, capsys=capsys).returncode == 1


def test_without_a_baseline_of_this_instruction_set_speed_is_not_compared_and_it_says_so(tmp_path, capsys):
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    base.write_text(json.dumps(results(6.0, machine=AVX512_VNNI)))
    new.write_text(json.dumps(results(1.2)))
    outcome = run_main(bench_main, "compare", base, new, capsys=capsys)
    assert outcome.returncode == 0 and "speedups are NOT compared" in outcome.stderr and "(None, avx2)" in outcome.stderr
    assert "REGRESSION" not in outcome.stdout
    new.write_text(json.dumps(results(1.2, cosine=0.99)))  # parity is still checked: its bounds are absolute
    breached = run_main(bench_main, "compare", base, new, capsys=capsys)
    assert breached.returncode == 1 and "PARITY BREACH" in breached.stdout


def test_a_variant_that_failed_its_export_is_an_export_failure_not_a_missing_figure():
    new = results(3.0)
    new["exports"][0]["error"] = "parity gate failed: cosine 0.9988 < 0.999"
    new["rows"][1] = {**new["rows"][1], "failed": new["exports"][0]["error"], "speedups": {}, "parity": {"figures": {}, "bounds": {}, "passed": False}}
    assert verdicts(compare_results(results(3.0), new)) == {"EXPORT FAILED"}
    assert verdicts(compare_results(None, new)) == {"EXPORT FAILED"}


def test_a_longer_flag_list_of_the_same_instruction_set_is_the_same_machine():
    """Results record more flags than older ones did (avx_vnni, amx_*): the instruction set they
    imply decides, so the gate keeps its tolerance instead of widening it to another CPU's."""
    older = results(3.0, machine={**AVX512_VNNI, "cpu_flags": ["avx2", "avx512_vnni", "avx512f"]})
    newer = results(2.0, machine={**AVX512_VNNI, "cpu_flags": ["avx2", "avx512_vnni", "avx512f", "avx_vnni"], "isa": "avx512-vnni"})
    assert "REGRESSION" in verdicts(compare_results(older, newer))  # -33 %: beyond the same machine's tolerance


def test_a_baseline_of_several_runs_holds_each_speedup_at_its_lowest(tmp_path, capsys):
    runs = [results(3.0), results(1.5), results(2.5)]
    runs[1]["rows"][0]["speedups"]["latency vs eager-fp32"]["value"] = 0.5  # eager rows are not the product: kept from the first run
    paths = []
    for index, run in enumerate(runs):
        paths.append(tmp_path / f"run{index}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "baseline.json"
    assert run_main(bench_main, "baseline", *paths, "--out", out, capsys=capsys).returncode == 0
    baseline = json.loads(out.read_text())
    speedup = {r["variant"]: r["speedups"]["latency vs eager-fp32"]["value"] for r in baseline["rows"]}
    assert speedup == {"eager-fp32": 1.0, "onnx-int8": 1.5} and baseline["baseline_of"]["runs"] == 3
    # a run as slow as the slowest passes; one well below it does not
    assert not any(f.fails for f in compare_results(baseline, results(1.5)))
    assert "REGRESSION" in verdicts(compare_results(baseline, results(0.7)))


def test_a_baseline_is_not_made_of_runs_of_different_presets(tmp_path, capsys):
    first, second = results(), results()
    second["settings"] = {"preset": "base"}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, run in zip(paths, (first, second)):
        path.write_text(json.dumps(run))
    result = run_main(bench_main, "baseline", *paths, "--out", tmp_path / "baseline.json", capsys=capsys)
    assert_user_error(result, "differ in preset")
    assert not (tmp_path / "baseline.json").exists()
