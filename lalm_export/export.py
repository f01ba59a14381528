"""The export pipeline: load → merge → export (Optimum) → verify → write the bundle.

The bundle is built in a temporary folder beside `--output` and renamed into place only
when complete and verified: a failed or interrupted export leaves no bundle."""

from __future__ import annotations

import copy
import datetime as dt
import importlib.metadata
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from torch import nn

from lalm_export.eager import full_fp32
from lalm_export.errors import AdapterMismatchError, OptionsError, OutputExistsError
from lalm_export.families import FamilySpec, get_family
from lalm_export.fused import GRAPH_CHOICES, build_fused_decoder, choose_decoder_graph
from lalm_export.io import atomic_folder, sha256_tree
from lalm_export.merge import dequantize_4bit_linears, merge_adapter_into, read_lora_pairs
from lalm_export.models.adapters import (
    QuantizationSettings,
    check_adapter_folder,
    load_full_weights,
    read_adapter_metadata,
)
from lalm_export.models.loading import load_family_model
from lalm_export.precision import INT4_BLOCK_SIZE, INT4_BLOCK_SIZES, INT4_LM_HEAD, INT4_LM_HEADS, SPECS, apply_precision, check_precision, keep_last_position_logits, load_graph, save_graph
from lalm_export.progress import Stages
from lalm_export.tolerances import FP32_RELATIVE, reduced_precision_tolerance
from runtime.manifest import GraphFile, Manifest, Source, TensorSpec, sha256_of
from runtime.sessions import SessionOptions, create_session, resolve_providers

GRAPH_NAME = "model.onnx"
DEFAULT_OPSET = 18
STAGES = ["load", "merge", "export", "precision", "verify", "write"]
INT4_METHODS = ("rtn", "gptq")


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
    decoder_graph: str = "auto"  # decoders: "fused" (ONNX Runtime's model builder), "optimum", or auto
    int4_method: str = "rtn"  # int4 weights: round to nearest, or GPTQ on --calibration text (else on the model's samples)
    calibration: Path | None = None
    int4_block_size: int = INT4_BLOCK_SIZE
    int4_lm_head: str = INT4_LM_HEAD  # the lm_head of an int4 decoder: 8-bit or 4-bit blocks

    @property
    def spec(self) -> FamilySpec:
        return get_family(self.family)

    @property
    def model_source(self) -> str:
        return self.model or self.spec.default_checkpoint


def supported_decoder_archs() -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers Optimum's ONNX configs)
    from optimum.exporters.tasks import TasksManager

    return sorted(
        model_type
        for model_type, exporters in TasksManager._SUPPORTED_MODEL_TYPE.items()
        if "text-generation-with-past" in exporters.get("onnx", {})
    )


def validate_options(opts: ExportOptions) -> None:
    """Every rule in one place; each error names the broken rule and the fix."""
    spec = opts.spec
    if opts.adapter is not None and opts.weights is not None:
        raise OptionsError("--adapter and --weights together: pass one (an adapter is merged into the base; --weights replaces it)")
    if opts.qlora and opts.adapter is None:
        raise OptionsError("--qlora describes the 4-bit base an adapter was trained on: pass --adapter too")
    if spec.role == "decoder" and opts.all_hidden_states:
        raise OptionsError("--all-hidden-states is for encoders; decoders export logits and the KV cache")
    if spec.role == "decoder" and opts.weights is not None:
        raise OptionsError("--weights is for encoders saved with save_model_weights(); for a decoder pass --model")
    if spec.role == "decoder" and opts.decoder_arch != "auto":
        known = supported_decoder_archs()
        if opts.decoder_arch not in known:
            raise OptionsError(f"unknown decoder architecture {opts.decoder_arch!r}; known: auto, {', '.join(known)}")
    check_precision(opts.precision, spec.role, opts.device)
    if opts.decoder_graph not in GRAPH_CHOICES:
        raise OptionsError(f"unknown --decoder-graph {opts.decoder_graph!r}; choose one of {', '.join(GRAPH_CHOICES)}")
    if spec.role == "encoder" and opts.decoder_graph != "auto":
        raise OptionsError("--decoder-graph is for decoders; encoders are exported through Optimum")
    if opts.int4_method not in INT4_METHODS:
        raise OptionsError(f"unknown --int4-method {opts.int4_method!r}; choose one of {', '.join(INT4_METHODS)}")
    if opts.int4_method == "gptq" and opts.precision != "int4":
        raise OptionsError("--int4-method gptq chooses int4 weights: pass --precision int4")
    if opts.calibration is not None and opts.int4_method != "gptq":
        raise OptionsError("--calibration is read by --int4-method gptq; add it, or drop --calibration")
    if opts.int4_block_size not in INT4_BLOCK_SIZES:
        raise OptionsError(f"--int4-block-size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, not {opts.int4_block_size}")
    if opts.int4_block_size != INT4_BLOCK_SIZE and opts.precision != "int4":
        raise OptionsError("--int4-block-size is for --precision int4")
    if opts.int4_lm_head not in INT4_LM_HEADS:
        raise OptionsError(f"unknown --int4-lm-head {opts.int4_lm_head!r}; choose one of {', '.join(INT4_LM_HEADS)}")
    if opts.int4_lm_head != INT4_LM_HEAD and opts.precision != "int4":
        raise OptionsError("--int4-lm-head is for --precision int4")
    if opts.calibration is not None and not Path(opts.calibration).is_file():
        raise OptionsError(f"--calibration {opts.calibration} does not exist or is not a file; pass a UTF-8 text file")
    if opts.device == "cuda":
        require_cuda()
    if not 14 <= opts.opset <= 23:
        raise OptionsError(f"--opset must be between 14 and 23, not {opts.opset}")
    if opts.min_cosine is not None and (opts.precision == "fp32" or not 0 < opts.min_cosine <= 1):
        raise OptionsError("--min-cosine is a bound in (0, 1] for --precision fp16, int8 or int4 (fp32 is gated by --rtol)")
    if opts.rtol <= 0 or (opts.atol is not None and opts.atol < 0):
        raise OptionsError("--rtol must be positive and --atol non-negative")
    output = Path(opts.output)
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"--output {output} is a file; pass a folder path")
    if output.is_dir() and any(output.iterdir()) and not opts.force:
        raise OutputExistsError(f"--output {output} exists and is not empty; pass --force to replace it (only once the new bundle is complete)")
    if opts.adapter is not None:
        check_adapter_folder(opts.adapter)
    if opts.qlora:
        from lalm_export.models.loading import require_bitsandbytes

        require_bitsandbytes()


def require_cuda() -> None:
    """--device cuda needs a GPU for both sides of the parity gate."""
    if not torch.cuda.is_available():
        raise OptionsError("--device cuda: PyTorch sees no CUDA GPU here; run on a machine with one, or use --device cpu")
    resolve_providers("cuda")


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


def load_merged_model(opts: ExportOptions, stages: Stages) -> tuple[nn.Module, Source]:
    """The eager fp32 module the graph must reproduce, and how it was made."""
    spec = opts.spec
    quantization = adapter_quantization(opts)
    detail = opts.model_source + (f" (4-bit {quantization.quant_type} base, as the adapter was trained)" if quantization else "")
    with stages.stage("load", detail):
        model = load_family_model(spec, opts.model_source, quantization, opts.trust_remote_code)
        check_decoder_arch(model, opts)
    with stages.stage("merge"):
        source = Source(model=opts.model_source)
        if quantization is not None:
            count = dequantize_4bit_linears(model)
            stages.say(f"      dequantized {count} 4-bit Linear layers to fp32")
        if opts.adapter is not None:
            pairs = read_lora_pairs(opts.adapter, model)
            merge_adapter_into(model, pairs)
            stages.say(f"      merged LoRA into {len(pairs)} Linear layers")
            source = Source(
                model=opts.model_source,
                adapter=str(Path(opts.adapter).resolve()),
                adapter_sha256=sha256_tree(opts.adapter),
                merge="qlora-dequantized" if quantization else "lora",
            )
        elif opts.weights is not None:
            load_full_weights(model, opts.weights, spec.name)
            source = Source(
                model=opts.model_source,
                weights=str(Path(opts.weights).resolve()),
                weights_sha256=sha256_tree(opts.weights),
                merge="full-weights",
            )
    return model.float().eval(), source


def check_decoder_arch(model: nn.Module, opts: ExportOptions) -> None:
    if opts.spec.role != "decoder" or opts.decoder_arch == "auto":
        return
    model_type = model.config.model_type
    if model_type != opts.decoder_arch:
        raise OptionsError(f"--decoder {opts.decoder_arch}, but {opts.model_source} is a {model_type!r} model; pass --decoder {model_type} or auto")


def encoder_onnx_config(model: nn.Module, spec: FamilySpec, all_hidden_states: bool) -> Any:
    """Optimum's registered ONNX config for the family, extended with every layer's hidden states."""
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model_type=spec.optimum_model_type, task=spec.optimum_task, library_name="transformers"
    )
    config = constructor(model.config, task=spec.optimum_task)
    if spec.optimum_behavior:
        config = config.with_behavior(spec.optimum_behavior)
    if all_hidden_states:
        # Optimum exports only last_hidden_state (optimum#2338). Outputs named hidden_states.N
        # make its patcher keep the model's hidden_states tuple, which ONNX flattens in order.
        base = dict(config.outputs)
        axes = base[spec.output_name]
        layers = int(model.config.num_hidden_layers)
        outputs = {**base, **{f"hidden_states.{i}": dict(axes) for i in range(layers + 1)}}
        config.__class__ = type(f"{type(config).__name__}AllHiddenStates", (type(config),), {"outputs": property(lambda self: outputs)})
    return config


def export_graph(model: nn.Module, opts: ExportOptions, folder: Path, graph_kind: str = "optimum") -> Path:
    from optimum.exporters.onnx.convert import export_pytorch, onnx_export_from_model

    spec = opts.spec
    if graph_kind == "fused":
        return build_fused_decoder(model, opts.model_source, folder, opts.trust_remote_code)
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The tracer warns about every Python-level branch; the parity gate checks the
        # graph on other batch sizes and lengths than the ones traced, which is the real test.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(opset|aten::index).*", category=UserWarning)
        if spec.role == "decoder":
            onnx_export_from_model(model, folder, task=spec.optimum_task, opset=opts.opset, do_validation=False)
        else:
            config = encoder_onnx_config(model, spec, opts.all_hidden_states)
            kwargs = {"output_hidden_states": True} if opts.all_hidden_states else None
            export_pytorch(model, config, opset=opts.opset, output=folder / GRAPH_NAME, model_kwargs=kwargs)
    return folder / GRAPH_NAME


def graph_facts(folder: Path, graph: Path) -> tuple[GraphFile, int]:
    """The manifest's record of `graph` and its default-domain opset, from one read of the graph."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    opset = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))

    def specs(values: Any) -> tuple[TensorSpec, ...]:
        result = []
        for value in values:
            tensor = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            result.append(TensorSpec(value.name, dtype, tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)))
        return tuple(result)

    data_files = {
        p.name: sha256_of(p) for p in folder.iterdir() if p.name.startswith(graph.name + "_data") or p.suffix == ".data"
    }
    record = GraphFile(
        path=graph.name, sha256=sha256_of(graph), inputs=specs(proto.graph.input), outputs=specs(proto.graph.output), data_files=data_files
    )
    return record, opset


def save_companions(model: nn.Module, opts: ExportOptions, folder: Path) -> dict[str, Any]:
    """Config plus feature-extractor or tokenizer files; returns the facts the runtime needs."""
    spec = opts.spec
    model.config.save_pretrained(str(folder))
    if spec.role == "decoder":
        from lalm_export.models.llm import load_tokenizer

        tokenizer = load_tokenizer(opts.model_source, opts.trust_remote_code)
        tokenizer.save_pretrained(str(folder))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(folder))
        return {
            "vocab_size": int(model.config.vocab_size),
            "num_hidden_layers": int(model.config.num_hidden_layers),
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    feature_source = save_feature_extractor(model, opts, folder)
    extractor = spec.feature_extractor
    return {
        "hidden_size": int(model.config.hidden_size),
        "num_hidden_layers": int(model.config.num_hidden_layers),
        "all_hidden_states": opts.all_hidden_states,
        "sampling_rate": extractor.sampling_rate if extractor else 16_000,
        "chunk_seconds": extractor.chunk_seconds if extractor else None,
        "feature_extractor": feature_source,
    }


def save_feature_extractor(model: nn.Module, opts: ExportOptions, folder: Path) -> str:
    """The checkpoint's feature extractor, or the family default when the checkpoint has none."""
    from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    try:
        AutoFeatureExtractor.from_pretrained(opts.model_source).save_pretrained(str(folder))
        return "checkpoint"
    except (OSError, ValueError):
        if opts.spec.input_kind == "log_mel":
            WhisperFeatureExtractor(feature_size=int(model.config.num_mel_bins)).save_pretrained(str(folder))
        else:
            Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(str(folder))
        return "family default"


def library_versions() -> dict[str, str]:
    names = ["lalm-export", "torch", "transformers", "optimum", "optimum-onnx", "peft", "bitsandbytes", "onnx", "onnxruntime"]
    versions = {}
    for name in names + ["onnxruntime-gpu"]:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    # onnxruntime-gpu installs the same `onnxruntime` module; the one imported is what ran.
    versions["onnxruntime"] = ort.__version__
    return versions


def parity_tolerance(opts: ExportOptions) -> Any:
    from lalm_export.verify import Tolerance

    if opts.precision == "fp32":
        return Tolerance(relative=opts.rtol, absolute=opts.atol)
    return Tolerance(relative=opts.rtol, absolute=opts.atol, **reduced_precision_tolerance(opts.spec.role, opts.precision, opts.min_cosine))


def check_parity(model: nn.Module, graph: Path, opts: ExportOptions, tolerance: Any, reference: str, progress: bool) -> Any:
    """The graph on `opts.device` against `model` (already on that device, in its dtype)."""
    from lalm_export.verify import check_decoder, check_encoder

    session = create_session(graph, SessionOptions(provider=opts.device))
    if opts.spec.role == "decoder":
        report = check_decoder(model, session, tolerance, int(model.config.vocab_size), seed=opts.seed, progress=progress)
    else:
        report = check_encoder(model, session, opts.spec, opts.all_hidden_states, tolerance, seed=opts.seed, progress=progress)
    report.reference = reference
    return report


def verify_graph(model: nn.Module, graph: Path, opts: ExportOptions, stages: Stages) -> dict[str, Any]:
    """Gate on eager fp32; an fp16 graph is also compared with eager fp16 (recorded, not gated)."""
    model = model.to(opts.device)
    with full_fp32():
        report = check_parity(model, graph, opts, parity_tolerance(opts), f"eager PyTorch fp32 (merged) on {opts.device}", not stages.quiet)
    for line in report.summary_lines():
        stages.say(f"      {line}")
    report.raise_if_failed()
    parity = report.to_dict()
    if opts.precision == "fp16":
        half = copy.deepcopy(model).half()
        against_half = check_parity(half, graph, opts, parity_tolerance(opts), f"eager PyTorch fp16 on {opts.device}", not stages.quiet)
        stages.say("      against eager fp16: " + "; ".join(against_half.summary_lines()))
        parity["against_eager_fp16"] = against_half.to_dict()
    return parity


def optimize_graph(graph: Path, opts: ExportOptions, graph_kind: str) -> list[str]:
    """Graph rewrites on the fp32 export: decoders compute logits for the last position only."""
    if graph_kind == "fused":
        return ["fused attention (GroupQueryAttention, rotary inside) and norms: ONNX Runtime's model builder", "logits for the last position only"]
    if not opts.optimize or opts.spec.role != "decoder":
        return []
    proto = load_graph(graph)
    if not keep_last_position_logits(proto):
        return []
    for data in graph.parent.glob(graph.name + "_data*"):
        data.unlink()  # loaded into memory above; rewritten by save_graph
    save_graph(proto, graph)
    return ["logits for the last position only"]


def gptq_model(model: nn.Module, opts: ExportOptions, stages: Stages) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` whose Linear weights are GPTQ's int4 weights, and what was done."""
    from lalm_export.gptq import CALIBRATION_WINDOW, Calibration, calibration_windows, gptq_quantize_decoder, sampled_calibration_windows
    from lalm_export.models.llm import load_tokenizer

    tokenizer = load_tokenizer(opts.model_source, opts.trust_remote_code)
    if opts.calibration is None:
        stages.say("      GPTQ: sampling calibration text from the model (no --calibration)")
        windows = sampled_calibration_windows(model, tokenizer, opts.seed, progress=not stages.quiet)
        calibration = Calibration(len(windows), CALIBRATION_WINDOW, seed=opts.seed)
        source = "the model's own samples"
    else:
        windows = calibration_windows(opts.calibration, tokenizer)
        path = Path(opts.calibration)
        calibration = Calibration(len(windows), CALIBRATION_WINDOW, path=str(path.resolve()), sha256=sha256_of(path))
        source = str(opts.calibration)
    quantized = copy.deepcopy(model)
    layers = gptq_quantize_decoder(quantized, windows, opts.int4_block_size, lm_head=opts.int4_lm_head == "int4", progress=not stages.quiet)
    stages.say(f"      GPTQ: {layers} Linear layers quantized from {len(windows)} windows of {CALIBRATION_WINDOW} tokens of {source}")
    return quantized, {**calibration.to_dict(), "layers": layers}


def export_bundle(opts: ExportOptions, quiet: bool = False) -> Manifest:
    """Export one bundle to `opts.output`; raises a `LalmExportError` on any user error."""
    validate_options(opts)
    stages = Stages(STAGES, quiet=quiet)
    torch.manual_seed(opts.seed)
    model, source = load_merged_model(opts, stages)
    spec = opts.spec
    # validate_options refused a non-empty output without --force; an empty folder is replaced.
    custom_opset = opts.opset if opts.opset != DEFAULT_OPSET else None
    graph_kind, why = choose_decoder_graph(opts.decoder_graph, model, opts.optimize, opts.device, custom_opset) if spec.role == "decoder" else ("optimum", "")
    exporter = f"ONNX Runtime model builder, fused graph ({why})" if graph_kind == "fused" else f"Optimum, opset {opts.opset}" + (f" ({why})" if why else "")
    with atomic_folder(opts.output, replace=opts.force or Path(opts.output).is_dir()) as tmp:
        fp32_folder = tmp if opts.precision == "fp32" else tmp / "fp32"
        with stages.stage("export", exporter):
            exported, int4_weights = gptq_model(model, opts, stages) if opts.int4_method == "gptq" else (model, {"method": "rtn"})
            fp32_graph = export_graph(exported, opts, fp32_folder, graph_kind)
            optimizations = optimize_graph(fp32_graph, opts, graph_kind)
        if opts.precision == "fp32":
            stages.skip("precision", "fp32")
            graph = fp32_graph
        else:
            detail = SPECS[opts.precision].summary + (f", blocks of {opts.int4_block_size}, lm_head {opts.int4_lm_head}" if opts.precision == "int4" else "")
            with stages.stage("precision", detail):
                graph = tmp / GRAPH_NAME
                facts = apply_precision(fp32_graph, graph, opts.precision, spec.role, opts.int4_method == "gptq", opts.int4_block_size, opts.int4_lm_head)
                shutil.rmtree(fp32_folder)
        if opts.verify:
            with stages.stage("verify", f"ONNX Runtime ({opts.device}) vs eager fp32"):
                parity = verify_graph(model, graph, opts, stages)
        else:
            stages.skip("verify", "--no-verify")
            parity = {"verified": False, "reason": "--no-verify"}
        with stages.stage("write", str(opts.output)):
            extra = save_companions(model, opts, tmp)
            record, opset = graph_facts(tmp, graph)
            if spec.role == "decoder":
                extra["decoder_graph"] = graph_kind
            if opts.precision == "int4":
                extra["int4"] = {**int4_weights, "block_size": opts.int4_block_size, "lm_head": facts["lm_head"]}
            manifest = Manifest(
                family=spec.name,
                role=spec.role,
                model_type=str(model.config.model_type),
                input_kind=spec.input_kind,
                graphs={"model": record},
                dtype=SPECS[opts.precision].weights,
                opset=opset,
                source=source,
                libraries=library_versions(),
                parity=parity,
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                extra=extra,
                precision=opts.precision,
                optimizations=optimizations,
                device=opts.device,
            )
            manifest.write(tmp)
    return manifest
