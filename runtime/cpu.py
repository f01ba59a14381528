"""What this CPU is, as far as ONNX Runtime's int8 kernels and PyTorch's bf16 care.

ONNX Runtime (MLAS) picks its int8 MatMul kernel by instruction set. Dynamic quantization
multiplies uint8 activations by int8 weights (U8S8):

- `amx`, `avx512-vnni`, `avx-vnni`: the products are summed into int32 (AMX tiles,
  `vpdpbusd`): exact for any weight range.
- `avx2` (no VNNI: AVX2, or AVX-512 without VNNI): `vpmaddubsw` adds two u8 x s8 products
  into an int16 that saturates at 32767. Two products of 255 x 127 reach 64770, so full-range
  int8 weights lose large sums; 7-bit weights (-64..64) cannot overflow (2 x 255 x 64 = 32640).

The features come from /proc/cpuinfo. `LALM_CPU_FLAGS` (space-separated flags) replaces them:
for an emulator whose /proc/cpuinfo shows the host's flags while its CPUID shows others
(`qemu-x86_64 -cpu Haswell` runs ONNX Runtime's AVX2 kernels on any x86 host)."""

from __future__ import annotations

import logging
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

FLAGS_ENV = "LALM_CPU_FLAGS"
# Flags that decide a kernel here; the results and the manifest record these.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# int8 kernel classes, fastest first; `--target-cpu` takes these names.
INT8_KERNELS = ("amx", "avx512-vnni", "avx-vnni", "avx2")
SATURATING_KERNELS = ("avx2",)

log = logging.getLogger("runtime.cpu")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = frozenset(value.split())
            break
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo's names), or `LALM_CPU_FLAGS` where set."""
    override = os.environ.get(FLAGS_ENV)
    return frozenset(override.split()) if override is not None else _cpuinfo()[1]


def int8_kernels(flags: frozenset[str] | None = None) -> str:
    """The class of ONNX Runtime's U8S8 kernels on a CPU with `flags` (default: this one)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    return "avx2"


def saturates(kernels: str) -> bool:
    """Whether u8 x s8 pair sums saturate at int16 in this kernel class."""
    return kernels in SATURATING_KERNELS


def has_bf16(flags: frozenset[str] | None = None) -> bool:
    """bf16 instructions (AVX-512 BF16 or AMX): without them PyTorch emulates bf16, tens of times slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def isa_label(flags: frozenset[str] | None = None) -> str:
    """A short name of what decides speed ratios here: the int8 kernels and bf16 support."""
    flags = cpu_flags() if flags is None else flags
    label = int8_kernels(flags)
    if label == "avx2" and "avx512f" in flags:
        label = "avx512"
    return label + ("-bf16" if has_bf16(flags) and label != "amx" else "")


def describe_cpu() -> dict[str, Any]:
    """What a manifest or a result records of the CPU that verified or measured it."""
    flags = cpu_flags()
    return {
        "model": cpu_model(),
        "flags": sorted(f for f in RELEVANT_FLAGS if f in flags),
        "int8_kernels": int8_kernels(flags),
        **({"flags_from": FLAGS_ENV} if FLAGS_ENV in os.environ else {}),
    }


def int8_kernel_mismatch(int8: dict[str, Any] | None, folder: str | Path) -> str | None:
    """One line when a bundle's int8 graphs run on other int8 kernels than those that verified
    them. `int8` is the manifest's `extra.int8` record ({} for a bundle written before it
    existed), None for a bundle without int8 graphs."""
    if int8 is None:
        return None
    here = int8_kernels()
    verified = (int8.get("verified_on") or {}).get("int8_kernels")
    if here in (verified, int8.get("target_cpu")):
        return None  # verified on these kernels, or made for them on purpose (--target-cpu)
    if verified is None:
        what = "records no CPU that verified its int8 graphs"
    else:
        what = f"was verified on {verified} int8 kernels; this CPU has {here} kernels"
    if saturates(here) and int8.get("weight_range") != "7-bit":
        consequence = "its full-range int8 weights can saturate the int16 sums of these kernels, so outputs may be far from the verified ones"
    else:
        consequence = "outputs may differ slightly from the verified ones"
    return f"bundle {folder} {what}: {consequence}; re-export it here, or with --target-cpu {here}"


def warn_on_int8_kernel_mismatch(int8: dict[str, Any] | None, folder: str | Path) -> None:
    message = int8_kernel_mismatch(int8, folder)
    if message is not None:
        log.warning(message)
