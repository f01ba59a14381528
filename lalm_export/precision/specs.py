"""What each `--precision` means: one row per precision, with its graph transform (the
bounds its graphs are gated on are in `lalm_export/parity/bounds.py`).

Every precision starts from the fp32 export and rewrites its ONNX graph:

- fp32: unchanged.
- int8 (CPU): dynamic quantization of the MatMuls with constant weights, signed int8
  weights and uint8 activations (U8S8): ONNX Runtime runs them on VNNI/AMX at several times
  its fp32 rate, while unsigned weights (QUInt8) run no faster than fp32. The weights' range
  depends on the CPU the graph is made for (`--target-cpu`, default this machine's): 7-bit per
  output channel where the int8 kernels saturate (AVX2, AVX-512 without VNNI), 8-bit elsewhere
  (`lalm_export/precision/transforms.py`, `runtime/cpu.py`). Convolutions, norms
  and attention stay fp32: ORT's int8 Conv is slower than its fp32 Conv, and a convolution
  rewritten as an int8 MatMul loses the quiet frames of real audio to the per-tensor
  activation scale (docs/performance-notes.md).
- int4 (decoders): weight-only MatMulNBits (`lalm_export/precision/int4.py`): symmetric blocks, the
  lm_head in 8-bit blocks by default, weights rounded to nearest or GPTQ's.
- fp16 (CUDA): float16 weights and compute with float32 inputs and outputs; the RMS/layer
  norm reductions stay float32, where float16 would overflow on large activations.
- bf16: refused. ONNX Runtime's CPU provider has no bf16 MatMul kernel, and a graph that
  casts to bf16 and back would only be slower.

Adding a precision is one row here, one transform function and, where it is not exact, one
row of bounds in `lalm_export/parity/bounds.py`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lalm_export.errors import OptionsError
from lalm_export.precision.int4 import Int4Options, quantize_int4
from lalm_export.precision.mixed_int8 import Calibration, quantize_int8_within
from lalm_export.precision.transforms import convert_fp16, int8_recipe

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class TransformJob:
    """What a transform may need beyond its input and output graph."""

    role: str
    int4: Int4Options = Int4Options()
    target_cpu: str = "auto"  # int8: the class of int8 kernels the graph is made for (runtime/cpu.py); auto: this machine's
    calibration: Calibration | None = None  # int8: the gate's inputs and bound the graph is made to meet (encoders)


# A transform writes the precision's graph for an fp32 graph and returns facts for the manifest.
Transform = Callable[[Path, Path, TransformJob], Mapping[str, object]]


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    weights: str  # what the manifest records as the weights' type
    roles: tuple[str, ...]
    devices: tuple[str, ...]
    summary: str
    transform: Transform | None  # None: the fp32 export itself
    other_role: str = ""  # what to use for a role this precision is not for
    other_device: str = ""  # what to use on a device it is not for
    refused: str = ""  # why this precision is never exported, and what to use instead


def _int8(source: Path, target: Path, job: TransformJob) -> Mapping[str, object]:
    return quantize_int8_within(source, target, int8_recipe(job.target_cpu), job.calibration)


def _int4(source: Path, target: Path, job: TransformJob) -> Mapping[str, object]:
    return quantize_int4(source, target, job.int4)


def _fp16(source: Path, target: Path, job: TransformJob) -> Mapping[str, object]:
    convert_fp16(source, target, job.role)
    return {}


SPECS: dict[str, PrecisionSpec] = {
    spec.name: spec
    for spec in (
        PrecisionSpec("fp32", "float32", ("encoder", "decoder"), DEVICES, "float32 throughout: the exact graph", None),
        PrecisionSpec("fp16", "float16", ("encoder", "decoder"), DEVICES, "float16 weights and compute, float32 I/O and norms (for CUDA)", _fp16),
        PrecisionSpec(
            "bf16",
            "bfloat16",
            (),
            (),
            "",
            None,
            refused="--precision bf16: ONNX Runtime has no bf16 MatMul kernel on the CPU provider, so a bf16 graph would run slower "
            "than fp32; use --precision int8 on CPU (faster than eager bf16) or --precision fp16 with --device cuda",
        ),
        PrecisionSpec(
            "int8",
            "int8",
            ("encoder", "decoder"),
            ("cpu",),
            "dynamic int8 MatMuls (CPU)",
            _int8,
            other_device="--precision int8 is a CPU scheme (AMX/VNNI int8 kernels); with --device cuda use --precision fp16",
        ),
        PrecisionSpec(
            "int4",
            "int4",
            ("decoder",),
            DEVICES,
            "int4 weight-only MatMulNBits",
            _int4,
            other_role="--precision int4 is for decoders (weight-only int4 pays off where weights dominate); for an encoder use --precision int8",
        ),
    )
}
PRECISIONS = tuple(SPECS)


def check_precision(precision: str, role: str, device: str) -> PrecisionSpec:
    """The spec for `precision`, or an `OptionsError` that says what to use instead."""
    spec = SPECS.get(precision)
    if spec is None:
        raise OptionsError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if spec.refused:
        raise OptionsError(spec.refused)
    if device not in DEVICES:
        raise OptionsError(f"unknown --device {device!r}; choose cpu or cuda")
    if role not in spec.roles:
        raise OptionsError(spec.other_role or f"--precision {precision} is not for {role}s")
    if device not in spec.devices:
        raise OptionsError(spec.other_device or f"--precision {precision} does not run on {device}")
    return spec


def apply_precision(source: Path, target: Path, precision: str, job: TransformJob) -> dict[str, object]:
    """Write the `precision` graph for the fp32 graph `source` to `target`; returns facts for the manifest."""
    transform = SPECS[precision].transform
    if transform is None:
        raise OptionsError(f"--precision {precision} has no graph transform: the fp32 export is its graph")
    return dict(transform(source, target, job))
