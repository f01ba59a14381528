"""What an export is asked to do (`ExportOptions`), and every rule those options must
follow, checked before any work in `validate_options`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lalm_export.errors import OptionsError, OutputExistsError, OutputPathError
from lalm_export.graphs.fused import GRAPH_CHOICES
from lalm_export.models.families import FamilySpec, get_family
from lalm_export.parity.bounds import FP32_RELATIVE
from lalm_export.precision.int4 import Int4Options
from lalm_export.precision.specs import check_precision
from runtime.cpu import INT8_KERNELS
from runtime.manifest import path_state

if TYPE_CHECKING:
    from lalm_export.models.adapters import QuantizationSettings

DEFAULT_OPSET = 18
TARGET_CPUS = ("auto", *INT8_KERNELS)
OPSET_RANGE = (14, 23)


@dataclass(frozen=True)
class ExportOptions:
    family: str  # an encoder family, or "llm" for decoders
    output: Path
    model: str | None = None
    decoder_arch: str = "auto"
    adapter: Path | None = None
    weights: Path | None = None
    qlora: bool = False
    bnb_quant_type: str = "nf4"
    bnb_double_quant: bool = True
    opset: int = DEFAULT_OPSET
    all_hidden_states: bool = False
    force: bool = False
    verify: bool = True
    rtol: float = FP32_RELATIVE
    atol: float | None = None
    trust_remote_code: bool = False
    seed: int = 0
    precision: str = "fp32"
    min_cosine: float | None = None  # replaces the reduced-precision cosine bounds
    device: str = "cpu"  # where the parity gate runs: the eager reference and ONNX Runtime's provider
    optimize: bool = True
    decoder_graph: str = "auto"  # decoders: "fused" (ONNX Runtime's model builder), "optimum" (op by op, Optimum's layout), or auto
    int4: Int4Options = Int4Options()
    target_cpu: str = "auto"  # int8: the int8 kernels to make the graph for (runtime/cpu.py); auto: this machine's

    @property
    def spec(self) -> FamilySpec:
        return get_family(self.family)

    @property
    def model_source(self) -> str:
        return self.model or self.spec.default_checkpoint


@dataclass(frozen=True)
class LalmExportOptions:
    """`lalm-export --lalm DIR`: the LALM folder records its components and adapters."""

    lalm: Path
    output: Path
    force: bool = False
    verify: bool = True
    seed: int = 0
    trust_remote_code: bool = False
    encoder_precision: str = "fp32"  # the audio encoder + projector graph
    decoder_precision: str = "fp32"
    decoder_graph: str = "auto"  # auto | fused | optimum, as for --decoder
    device: str = "cpu"  # where the parity gate runs ONNX Runtime (the eager reference: fp32 on the CPU)
    target_cpu: str = "auto"  # as for ExportOptions
    min_cosine: float | None = None  # replaces the reduced-precision cosine bounds of the audio features
    adapter: Path | None = None  # a peft LoRA on a whole Hugging Face audio-LLM checkpoint (an LALM folder records its own)
    qlora: bool = False  # that adapter was trained on the checkpoint loaded in 4 bits: merge into it, dequantized
    bnb_quant_type: str = "nf4"
    bnb_double_quant: bool = True
    split: str = "vad"  # how the runtime cuts recordings longer than the window: vad | energy | fixed (manifest extra.split)
    int4: Int4Options = Int4Options()  # an int4 decoder's weights, as for --decoder
    calibration_audio: Path | None = None  # recordings the gate judges and an int8 audio encoder is calibrated on, beside its own clips

    @property
    def quantization(self) -> QuantizationSettings | None:
        """The 4-bit base a `--qlora` adapter was trained on."""
        from lalm_export.models.adapters import QuantizationSettings

        return QuantizationSettings(quant_type=self.bnb_quant_type, double_quant=self.bnb_double_quant) if self.qlora else None


def supported_decoder_archs() -> list[str]:
    """The model types transformers loads as causal LMs: what `--decoder ARCH` may name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def validate_options(opts: ExportOptions) -> None:
    """Every rule in one place; each error names the broken rule and the fix."""
    spec = opts.spec
    if opts.adapter is not None and opts.weights is not None:
        raise OptionsError("--adapter and --weights together: pass one (an adapter is merged into the base; --weights replaces it)")
    if opts.qlora and opts.adapter is None:
        raise OptionsError("--qlora describes the 4-bit base an adapter was trained on: pass --adapter too")
    if spec.role == "decoder" and opts.all_hidden_states:
        raise OptionsError("--all-hidden-states is for encoders; decoders export logits and the KV cache")
    if spec.role == "decoder" and opts.decoder_arch != "auto":
        known = supported_decoder_archs()
        if opts.decoder_arch not in known:
            raise OptionsError(f"unknown decoder architecture {opts.decoder_arch!r}; known: auto, {', '.join(known)}")
    check_precision(opts.precision, spec.role, opts.device)
    check_target_cpu(opts.target_cpu, (opts.precision,))
    if opts.decoder_graph not in GRAPH_CHOICES:
        raise OptionsError(f"unknown --decoder-graph {opts.decoder_graph!r}; choose one of {', '.join(GRAPH_CHOICES)}")
    if spec.role == "encoder" and opts.decoder_graph != "auto":
        raise OptionsError("--decoder-graph is for decoders; encoders have one graph")
    opts.int4.validate(opts.precision)
    if opts.device == "cuda":
        require_cuda()
    _check_numbers(opts)
    check_output(Path(opts.output), opts.force)
    if opts.adapter is not None:
        from lalm_export.models.adapters import check_adapter_folder

        check_adapter_folder(opts.adapter)
    if opts.qlora:
        from lalm_export.models.loading import require_bitsandbytes

        require_bitsandbytes()


def _check_numbers(opts: ExportOptions) -> None:
    low, high = OPSET_RANGE
    if not low <= opts.opset <= high:
        raise OptionsError(f"--opset must be between {low} and {high}, not {opts.opset}")
    check_min_cosine(opts.min_cosine, opts.precision, "--min-cosine is a bound in (0, 1] for --precision fp16, int8 or int4 (fp32 is gated by --rtol)")
    if not math.isfinite(opts.rtol) or opts.rtol <= 0:
        raise OptionsError(f"--rtol must be a positive number, not {opts.rtol}")
    if opts.atol is not None and (not math.isfinite(opts.atol) or opts.atol < 0):
        raise OptionsError(f"--atol must be a non-negative number, not {opts.atol}")


def check_min_cosine(min_cosine: float | None, precision: str, rule: str) -> None:
    """--min-cosine bounds a reduced precision's cosine: a number in (0, 1], never for fp32; `rule` says so to the user."""
    if min_cosine is not None and (precision == "fp32" or not 0 < min_cosine <= 1):
        raise OptionsError(rule)


def check_target_cpu(target_cpu: str, precisions: tuple[str, ...]) -> None:
    """--target-cpu names a class of int8 kernels, and only an int8 graph has a use for it."""
    if target_cpu not in TARGET_CPUS:
        raise OptionsError(f"unknown --target-cpu {target_cpu!r}; choose one of {', '.join(TARGET_CPUS)}")
    if target_cpu != "auto" and "int8" not in precisions:
        raise OptionsError("--target-cpu chooses the int8 recipe: pass it with --precision int8 (or --encoder-precision / --decoder-precision int8)")


def check_output(output: Path, force: bool) -> None:
    """A bundle's --output: a folder path, not under a file; an existing folder only with
    --force and only when it is a bundle (or empty)."""
    output = output.expanduser()
    state = path_state(output)
    if state == "denied" or (state == "folder" and not os.access(output, os.R_OK | os.X_OK)):
        raise OutputPathError(f"--output {output}: permission denied (it or a folder above it cannot be read by this user); pass a path you can write to")
    if state == "file":
        raise OutputExistsError(f"--output {output} is a file; pass a folder path")
    blocking = next((p for p in output.parents if path_state(p) == "file"), None)
    if blocking is not None:
        raise OutputPathError(f"--output {output}: {blocking} is a file, not a folder; pass a path in a folder")
    if state == "folder" and any(output.iterdir()):
        if not force:
            raise OutputExistsError(f"--output {output} exists and is not empty; pass --force to replace it (only once the new bundle is complete)")
        if not is_bundle(output):
            raise OutputExistsError(
                f"--output {output} holds files that are not a bundle: --force replaces only a bundle written by lalm-export or an "
                "empty folder; choose another --output"
            )
        own = bundle_own_files(output)
        foreign = sorted(name for name in (p.relative_to(output).as_posix() for p in output.rglob("*") if not p.is_dir()) if name not in own)
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise OutputExistsError(
                f"--output {output} also holds {foreign[0]}{more}, which lalm-export did not write: --force replaces only what it "
                "wrote; move that out of the bundle, or choose another --output"
            )


BUNDLE_FILES = ".lalm-export-files.json"  # in a bundle: every file the export wrote there
# What an export wrote beside its graphs before bundles recorded their files.
_COMPANIONS = {
    "manifest.json", "config.json", "generation_config.json", "preprocessor_config.json", "embed_tokens.npy", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
}  # fmt: skip


def bundle_own_files(folder: Path) -> set[str]:
    """The files of the bundle in `folder` that lalm-export wrote: its record of them, or for a
    bundle written before it kept one, its graphs and the companion files exports write."""
    import json

    try:
        recorded = json.loads((folder / BUNDLE_FILES).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        recorded = None
    if isinstance(recorded, list) and all(isinstance(name, str) for name in recorded):
        return set(recorded)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    graphs = manifest.get("graphs") if isinstance(manifest.get("graphs"), dict) else {}
    written = set(_COMPANIONS)
    for graph in graphs.values():
        if isinstance(graph, dict):
            written |= {str(graph.get("path"))} | {str(name) for name in graph.get("data_files") or {}}
    return written


def is_bundle(folder: Path) -> bool:
    """A folder holding a manifest.json this tool wrote (a JSON object with its format version and graphs)."""
    import json

    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "format_version" in data and "graphs" in data


def require_cuda() -> None:
    """--device cuda needs a GPU for both sides of the parity gate."""
    import torch

    from runtime.sessions import resolve_providers

    if not torch.cuda.is_available():
        raise OptionsError("--device cuda: PyTorch sees no CUDA GPU here; run on a machine with one, or use --device cpu")
    resolve_providers("cuda")
