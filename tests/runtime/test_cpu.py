"""runtime/cpu.py: which int8 kernels a CPU's flags give, and the one-line warning when a
bundle's int8 graphs run on other kernels than those that verified them."""

from __future__ import annotations

import json
import logging

import pytest

from lalm_export.export.component import ExportOptions, export_bundle
from runtime.api import load
from runtime.cpu import cpu_flags, describe_cpu, has_bf16, int8_kernel_mismatch, int8_kernels, isa_label, saturates

AVX2 = "fpu sse2 avx avx2 fma"  # AMD Zen 2/3, many Intel laptops and cloud instances


@pytest.mark.parametrize(
    ("flags", "kernels", "isa"),
    [
        (AVX2, "avx2", "avx2"),
        (AVX2 + " avx512f avx512bw", "avx2", "avx512"),  # AVX-512 without VNNI: vpmaddubsw, it saturates too
        (AVX2 + " avx_vnni", "avx-vnni", "avx-vnni"),
        (AVX2 + " avx512f avx512_vnni avx512_bf16 avx_vnni", "avx512-vnni", "avx512-vnni-bf16"),
        (AVX2 + " avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile", "amx", "amx"),
    ],
)
def test_flags_give_the_int8_kernel_class_and_the_instruction_set(flags, kernels, isa, monkeypatch):
    monkeypatch.setenv("LALM_CPU_FLAGS", flags)
    assert cpu_flags() == frozenset(flags.split())
    assert int8_kernels() == kernels and isa_label() == isa
    assert saturates(kernels) == (kernels == "avx2")
    assert has_bf16() == ("bf16" in flags)
    described = describe_cpu()
    assert described["int8_kernels"] == kernels and described["flags_from"] == "LALM_CPU_FLAGS" and "fpu" not in described["flags"]


def test_this_machines_flags_come_from_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv("LALM_CPU_FLAGS", raising=False)
    flags = set(open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].lstrip(" \t:").split())
    assert cpu_flags() == flags and "flags_from" not in describe_cpu()


@pytest.fixture(scope="module")
def int8_bundle(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8") / "bundle"
    export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=folder, precision="int8", target_cpu="avx512-vnni"), quiet=True)
    return folder


def rewrite_int8_record(bundle, **changes) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["extra"]["int8"].update(changes)
    path.write_text(json.dumps(data))


def test_a_bundle_verified_on_other_int8_kernels_warns_in_one_line(int8_bundle, monkeypatch, caplog):
    rewrite_int8_record(int8_bundle, verified_on={"int8_kernels": "avx512-vnni"})
    monkeypatch.setenv("LALM_CPU_FLAGS", AVX2)
    with caplog.at_level(logging.WARNING, logger="runtime.cpu"):
        load(int8_bundle)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "was verified on avx512-vnni int8 kernels; this CPU has avx2 kernels" in message
    assert "full-range int8 weights can saturate the int16 sums of these kernels" in message and "--target-cpu avx2" in message and "\n" not in message
    caplog.clear()
    monkeypatch.setenv("LALM_CPU_FLAGS", AVX2 + " avx512f avx512_vnni")
    with caplog.at_level(logging.WARNING, logger="runtime.cpu"):
        load(int8_bundle)
    assert caplog.records == [], "the kernels that verified it"


def test_no_warning_where_the_bundle_was_made_for_these_kernels_or_has_no_int8_graph(int8_bundle, checkpoints, tmp_path, monkeypatch, caplog):
    rewrite_int8_record(int8_bundle, verified_on={"int8_kernels": "avx512-vnni"}, target_cpu="avx-vnni")
    monkeypatch.setenv("LALM_CPU_FLAGS", AVX2 + " avx_vnni")
    export_bundle(ExportOptions(family="hubert", model=str(checkpoints["hubert"]), output=tmp_path / "fp32"), quiet=True)
    with caplog.at_level(logging.WARNING, logger="runtime.cpu"):
        load(int8_bundle)
        load(tmp_path / "fp32")
    assert caplog.records == []


def test_the_warning_names_what_is_at_stake(monkeypatch):
    monkeypatch.setenv("LALM_CPU_FLAGS", AVX2 + " avx512f avx512_vnni")
    seven_bit = {"target_cpu": "avx2", "weight_range": "7-bit", "verified_on": {"int8_kernels": "avx2"}}
    assert int8_kernel_mismatch(None, "b") is None
    assert int8_kernel_mismatch({**seven_bit, "verified_on": {"int8_kernels": "avx512-vnni"}}, "b") is None
    assert "records no CPU that verified its int8 graphs" in int8_kernel_mismatch({}, "b")  # written before the CPU was recorded
    assert "outputs may differ slightly" in int8_kernel_mismatch(seven_bit, "b")
    monkeypatch.setenv("LALM_CPU_FLAGS", AVX2)
    assert "saturate" not in int8_kernel_mismatch({**seven_bit, "target_cpu": "avx512-vnni", "verified_on": {"int8_kernels": "amx"}}, "b")
    assert "can saturate the int16 sums" in int8_kernel_mismatch({"weight_range": "8-bit", "verified_on": {"int8_kernels": "amx"}}, "b")
