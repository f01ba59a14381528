"""`lalm-export --encoder/--decoder`: one component as a bundle. Its base is loaded (4-bit
where its QLoRA adapter was trained so) and its adapter merged or its weights loaded, then
the skeleton (`pipeline.py`) exports it (torch.onnx, or ONNX Runtime's model builder),
applies the precision, gates it (`lalm_export/parity/component.py`) and writes it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lalm_export.errors import AdapterMismatchError, OptionsError
from lalm_export.export.manifest import Built, BundleKind, build_manifest, save_companions
from lalm_export.export.options import DEFAULT_OPSET, ExportOptions, validate_options
from lalm_export.export.pipeline import STAGES, GraphPart, RunSettings, run_export
from lalm_export.graphs.files import load_graph, save_graph
from lalm_export.graphs.fused import FUSED_OPTIMIZATIONS, build_fused_decoder, choose_decoder_graph
from lalm_export.graphs.rewrites import FUSED_ATTENTION, LAST_POSITION_LOGITS, fuse_attention, keep_last_position_logits
from lalm_export.graphs.traced import export_decoder, export_encoder
from lalm_export.io import sha256_tree
from lalm_export.models.adapters import QuantizationSettings, load_full_weights, read_adapter_metadata
from lalm_export.models.loading import load_family_model
from lalm_export.models.merge import AdapterForPart, dequantize_4bit_linears, merge_adapter_into, read_adapter_for_part, read_lora_pairs
from lalm_export.parity.bounds import cosine_bound
from lalm_export.parity.component import ComponentGate, encoder_cases, verify_graph
from lalm_export.precision.int4 import Int4Options
from lalm_export.precision.mixed_int8 import Calibration
from lalm_export.precision.specs import SPECS
from lalm_export.progress import Stages
from runtime.manifest import Manifest, Source, sha256_of

if TYPE_CHECKING:
    import onnx

GRAPH_NAME = "model.onnx"

__all__ = ["ExportOptions", "export_bundle", "validate_options"]


def adapter_quantization(opts: ExportOptions) -> QuantizationSettings | None:
    """The 4-bit base the adapter was trained on: from its metadata, or `--qlora` for a plain peft folder."""
    if opts.adapter is None:
        return None
    metadata = read_adapter_metadata(opts.adapter)
    if metadata is not None and metadata.family != opts.family:
        raise AdapterMismatchError(f"adapter {opts.adapter} was trained for the {metadata.family!r} family, not {opts.family!r}")
    if metadata is not None and metadata.quantization is not None:
        return metadata.quantization
    if opts.qlora:
        if metadata is not None:
            raise OptionsError(f"--qlora, but adapter {opts.adapter} records that it was trained without 4-bit quantization; drop --qlora")
        return QuantizationSettings(quant_type=opts.bnb_quant_type, double_quant=opts.bnb_double_quant)
    return None


@dataclass(frozen=True)
class Merged:
    """The eager fp32 module the graph must reproduce, how it was made, and what the manifest
    should say about the merge beyond its source."""

    model: nn.Module
    source: Source
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Loaded:
    """A component's base as loaded, before its adapter or weights."""

    model: nn.Module
    quantization: QuantizationSettings | None  # the 4-bit base its adapter was trained on


def load_base(opts: ExportOptions) -> Loaded:
    """The component's base, 4-bit where its adapter was trained on a 4-bit base."""
    quantization = adapter_quantization(opts)
    model = load_family_model(opts.spec, opts.model_source, quantization, opts.trust_remote_code)
    check_decoder_arch(model, opts)
    return Loaded(model, quantization)


def describe_base(opts: ExportOptions, quantization: QuantizationSettings | None) -> str:
    return opts.model_source + (f" (4-bit {quantization.quant_type} base, as the adapter was trained)" if quantization else "")


def merge_into_base(loaded: Loaded, opts: ExportOptions, say: Callable[[str], None], label: str = "") -> Merged:
    """Dequantize a 4-bit base, merge the adapter or load the weights: the fp32 module the graph
    must reproduce. `label` names the part in the progress lines of a bundle with several."""
    spec, model, quantization = opts.spec, loaded.model, loaded.quantization
    prefix = f"      {label}: " if label else "      "
    notes: dict[str, Any] = {}
    source = Source(model=opts.model_source)
    if quantization is not None:
        say(f"{prefix}dequantized {dequantize_4bit_linears(model)} 4-bit Linear layers to fp32")
    if opts.adapter is not None:
        adapter = read_adapter_for_part(opts.adapter, model, spec.submodule) if spec.submodule else AdapterForPart(read_lora_pairs(opts.adapter, model))
        merge_adapter_into(model, adapter.pairs)
        say(f"{prefix}merged LoRA into {len(adapter.pairs)} Linear layers")
        if adapter.left_out:
            say(
                f"{prefix}note: the adapter also adapts {len(adapter.left_out)} modules outside the {spec.name} {spec.submodule} "
                f"(e.g. {adapter.left_out[0]}); they are not part of this bundle and were left out"
            )
            notes = {"adapter_modules_left_out": len(adapter.left_out), "adapter_left_out_example": adapter.left_out[0]}
        source = Source(
            model=opts.model_source,
            adapter=str(Path(opts.adapter).resolve()),
            adapter_sha256=sha256_tree(opts.adapter),
            merge="qlora-dequantized" if quantization else "lora",
        )
    elif opts.weights is not None:
        load_full_weights(model, opts.weights, spec.name)
        source = Source(model=opts.model_source, weights=str(Path(opts.weights).resolve()), weights_sha256=sha256_tree(opts.weights), merge="full-weights")
    return Merged(model.float().eval(), source, notes)


def load_merged_model(opts: ExportOptions, stages: Stages) -> Merged:
    """The load and merge stages of a component export."""
    with stages.stage("load", describe_base(opts, adapter_quantization(opts))):
        loaded = load_base(opts)
    with stages.stage("merge"):
        return merge_into_base(loaded, opts, stages.say)


def check_decoder_arch(model: nn.Module, opts: ExportOptions) -> None:
    if opts.spec.role != "decoder" or opts.decoder_arch == "auto":
        return
    model_type = model.config.model_type
    if model_type != opts.decoder_arch:
        raise OptionsError(f"--decoder {opts.decoder_arch}, but {opts.model_source} is a {model_type!r} model; pass --decoder {model_type} or auto")


def export_graph(model: nn.Module, opts: ExportOptions, folder: Path, graph_kind: str = "optimum") -> Path:
    """Write `folder/model.onnx`: the fused decoder graph (ONNX Runtime's model builder), or the
    op-by-op graph in Optimum's layout (`lalm_export/graphs/traced.py`)."""
    spec = opts.spec
    if graph_kind == "fused":
        from lalm_export.models.llm import load_tokenizer

        return build_fused_decoder(model, load_tokenizer(opts.model_source, opts.trust_remote_code), folder, opts.trust_remote_code)
    if spec.role == "decoder":
        return export_decoder(model, folder / GRAPH_NAME, opts.opset)
    return export_encoder(model, spec, opts.all_hidden_states, folder / GRAPH_NAME, opts.opset)


def optimize_graph(graph: Path, opts: ExportOptions, graph_kind: str) -> list[str]:
    """Graph rewrites on the fp32 export: decoders compute logits for the last position only;
    encoders for the CPU get ONNX Runtime's fused attention."""
    if graph_kind == "fused":
        return list(FUSED_OPTIMIZATIONS)
    if not opts.optimize:
        return []
    if opts.spec.role == "encoder":
        return fused_attention(graph, opts.device, opts.precision)
    return last_position_logits_only(graph)


def fused_attention(graph: Path, device: str, precision: str) -> list[str]:
    """Rewrite an encoder graph file exported for `device` and `precision` in place with its
    unmasked self-attention fused (`rewrites.fuse_attention`); returns the rewrite's name, or
    nothing (file unchanged) when no attention matched or it does not apply. For fp32 and int8
    graphs on the CPU provider: fp16 graphs keep the op-by-op attention their gate was measured
    with on CUDA."""
    if device != "cpu" or precision == "fp16":
        return []
    return rewrite_in_place(graph, fuse_attention, FUSED_ATTENTION)


def last_position_logits_only(graph: Path) -> list[str]:
    """Rewrite an op-by-op decoder graph file in place to compute the last position's logits
    only; returns the rewrite's name, or nothing (file unchanged) when its logits do not come
    from a MatMul."""
    return rewrite_in_place(graph, keep_last_position_logits, LAST_POSITION_LOGITS)


def rewrite_in_place(graph: Path, rewrite: Callable[[onnx.ModelProto], Any], name: str) -> list[str]:
    """Apply `rewrite` (true where it changed the graph) to the graph file and save it back;
    returns `[name]`, or nothing (file unchanged) when it changed nothing."""
    proto = load_graph(graph)
    if not rewrite(proto):
        return []
    for data in graph.parent.glob(graph.name + "_data*"):
        data.unlink()  # loaded into memory above; rewritten by save_graph
    save_graph(proto, graph)
    return [name]


def gptq_model(model: nn.Module, tokenizer: Any, int4: Int4Options, seed: int, stages: Stages) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of the causal LM `model` whose Linear weights are GPTQ's int4 weights, and what was done."""
    from lalm_export.precision.gptq import CALIBRATION_WINDOW, Calibration, calibration_windows, gptq_quantize_decoder, sampled_calibration_windows

    if int4.calibration is None:
        stages.say("      GPTQ: sampling calibration text from the model (no --calibration)")
        windows = sampled_calibration_windows(model, tokenizer, seed, progress=not stages.quiet)
        calibration = Calibration(len(windows), CALIBRATION_WINDOW, seed=seed)
        source = "the model's own samples"
    else:
        windows = calibration_windows(int4.calibration, tokenizer)
        path = Path(int4.calibration)
        calibration = Calibration(len(windows), CALIBRATION_WINDOW, path=str(path.resolve()), sha256=sha256_of(path))
        source = str(int4.calibration)
    quantized = copy.deepcopy(model)
    layers = gptq_quantize_decoder(quantized, windows, int4.block_size, lm_head=int4.lm_head == "int4", progress=not stages.quiet)
    stages.say(f"      GPTQ: {layers} Linear layers quantized from {len(windows)} windows of {CALIBRATION_WINDOW} tokens of {source}")
    return quantized, {**calibration.to_dict(), "layers": layers}


@dataclass
class ComponentSteps:
    """The component's part of the skeleton: one graph, `model.onnx`."""

    opts: ExportOptions
    merged: Merged
    graph_kind: str
    exporter: str
    stages: Stages
    int4_weights: dict[str, Any] = field(default_factory=lambda: {"method": "rtn"})

    @property
    def parts(self) -> tuple[GraphPart, ...]:
        return (GraphPart(GRAPH_NAME, self.opts.spec.role, self.opts.precision, self.int8_calibration()),)

    def int8_calibration(self) -> Calibration | None:
        """An int8 encoder is made to meet its gate on the gate's own inputs (mixed_int8.py)."""
        opts = self.opts
        if opts.precision != "int8" or opts.spec.role != "encoder":
            return None
        bound = cosine_bound("int8", "encoder", opts.min_cosine)
        n_mels = int(getattr(self.merged.model.config, "num_mel_bins", 80))
        feeds = lambda: [{opts.spec.input_name: x} for _, x in encoder_cases(opts.spec, opts.seed, n_mels)]  # noqa: E731 - made when needed
        return Calibration(feeds, bound.cosine, bound.row_cosine)

    @property
    def precision_detail(self) -> str:
        summary = SPECS[self.opts.precision].summary
        return summary + (f", {self.opts.int4.describe()}" if self.opts.precision == "int4" else "")

    @property
    def verify_detail(self) -> str:
        return f"ONNX Runtime ({self.opts.device}) vs eager fp32"

    def export_graphs(self, fp32: Path, bundle: Path) -> list[str]:
        exported = self.merged.model
        if self.opts.int4.method == "gptq":
            from lalm_export.models.llm import load_tokenizer

            tokenizer = load_tokenizer(self.opts.model_source, self.opts.trust_remote_code)
            exported, self.int4_weights = gptq_model(exported, tokenizer, self.opts.int4, self.opts.seed, self.stages)
        graph = export_graph(exported, self.opts, fp32, self.graph_kind)
        return optimize_graph(graph, self.opts, self.graph_kind)

    def verify(self, bundle: Path, stages: Stages) -> dict[str, Any]:
        opts = self.opts
        gate = ComponentGate(opts.spec, opts.precision, opts.device, opts.seed, opts.all_hidden_states, opts.min_cosine, opts.rtol, opts.atol)
        return verify_graph(self.merged.model, bundle / GRAPH_NAME, gate, stages)

    def manifest(self, bundle: Path, built: Built) -> Manifest:
        opts, model = self.opts, self.merged.model
        extra = {**save_companions(model, opts, bundle), **self.merged.notes}
        if opts.spec.role == "decoder":
            extra["decoder_graph"] = self.graph_kind
        if opts.precision == "int4":
            extra["int4"] = {**self.int4_weights, "block_size": opts.int4.block_size, "lm_head": built.transforms[GRAPH_NAME]["lm_head"]}
        spec = opts.spec
        kind = BundleKind(spec.name, spec.role, str(model.config.model_type), spec.input_kind, SPECS[opts.precision].weights, opts.precision)
        return build_manifest(bundle, {"model": GRAPH_NAME}, kind, self.merged.source, built, extra, opts.device)


def export_bundle(opts: ExportOptions, quiet: bool = False) -> Manifest:
    """Export one bundle to `opts.output`; raises a `LalmExportError` on any user error."""
    validate_options(opts)
    stages = Stages(STAGES, quiet=quiet)
    torch.manual_seed(opts.seed)
    merged = load_merged_model(opts, stages)
    custom_opset = opts.opset if opts.opset != DEFAULT_OPSET else None
    if opts.spec.role == "decoder":
        graph_kind, why = choose_decoder_graph(opts.decoder_graph, merged.model, opts.optimize, opts.device, custom_opset)
    else:
        graph_kind, why = "optimum", ""
    exporter = (
        f"ONNX Runtime model builder, fused graph ({why})"
        if graph_kind == "fused"
        else f"torch.onnx, op by op, opset {opts.opset}" + (f" ({why})" if why else "")
    )
    steps = ComponentSteps(opts, merged, graph_kind, exporter, stages)
    # validate_options refused a non-empty output without --force; an empty folder is replaced.
    settings = RunSettings(Path(opts.output), opts.force or Path(opts.output).is_dir(), opts.verify, opts.target_cpu, opts.int4)
    return run_export(steps, settings, stages)
