"""The bundle's facts: its graph record, the companion files the runtime needs (config,
feature extractor or tokenizer), the library versions, and the manifest built from them."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from pathlib import Path
from typing import Any

import onnxruntime as ort
from torch import nn

from lalm_export.export.options import ExportOptions
from lalm_export.precision.specs import SPECS
from runtime.cpu import describe_cpu
from runtime.manifest import GraphFile, Manifest, Source, TensorSpec, sha256_of


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

    data_files = {p.name: sha256_of(p) for p in folder.iterdir() if p.name.startswith(graph.name) and p.name != graph.name and p.is_file()}
    record = GraphFile(path=graph.name, sha256=sha256_of(graph), inputs=specs(proto.graph.input), outputs=specs(proto.graph.output), data_files=data_files)
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
            # positions the graph was exported for (a fused graph's rotary cache ends there): prompt + new tokens
            "context_length": getattr(model.config, "max_position_embeddings", None),
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
    from transformers import AutoFeatureExtractor

    try:
        AutoFeatureExtractor.from_pretrained(opts.model_source).save_pretrained(str(folder))
        return "checkpoint"
    except (OSError, ValueError):
        opts.spec.feature_extractor.build(model.config).save_pretrained(str(folder))
        return "family default"


def int8_record(recipe: dict[str, Any], verified: bool) -> dict[str, Any]:
    """What the manifest keeps of int8 graphs (`extra.int8`): their recipe and the CPU whose
    int8 kernels verified them, which the runtime compares with the CPU it runs on."""
    return {**recipe, "verified_on": describe_cpu() if verified else None}


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


def build_manifest(
    model: nn.Module, opts: ExportOptions, folder: Path, graph: Path, source: Source, parity: dict[str, Any], extra: dict[str, Any], optimizations: list[str]
) -> Manifest:
    """The manifest of the bundle being written in `folder`, whose graph is `graph`."""
    spec = opts.spec
    record, opset = graph_facts(folder, graph)
    return Manifest(
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
