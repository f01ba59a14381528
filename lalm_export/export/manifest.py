"""The bundle's manifest, one builder for both kinds of export: the graphs' records, the
facts the runtime needs (a decoder's, an encoder's), the library versions, and what the
pipeline learned while building (`Built`); the companion files of a component bundle
(config, feature extractor or tokenizer)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
from torch import nn

from lalm_export.export.options import ExportOptions
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
        return decoder_facts(model, tokenizer)
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


def decoder_facts(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """What the runtime needs of a decoder: its vocabulary (the embedding's rows, which an LALM
    grows by its audio token), the positions the graph was exported for (a fused graph's
    rotary cache ends there: prompt + new tokens), its size and the tokenizer's special ids."""
    return {
        "vocab_size": int(model.get_input_embeddings().num_embeddings),
        "context_length": getattr(model.config, "max_position_embeddings", None),
        "num_hidden_layers": int(model.config.num_hidden_layers),
        "hidden_size": int(model.config.hidden_size),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
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
    names = ["lalm-export", "torch", "transformers", "peft", "bitsandbytes", "onnx", "onnxruntime", "onnxruntime-genai"]
    versions = {}
    for name in names + ["onnxruntime-gpu"]:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    # onnxruntime-gpu installs the same `onnxruntime` module; the one imported is what ran.
    versions["onnxruntime"] = ort.__version__
    return versions


@dataclass(frozen=True)
class BundleKind:
    """What a bundle is: the manifest's identifying fields."""

    family: str
    role: str
    model_type: str
    input_kind: str
    dtype: str  # the weights' type (precision/specs.py)
    precision: str  # fp32, int8, ... or mixed (an LALM whose parts differ)


@dataclass(frozen=True)
class Built:
    """What the pipeline learned while building the bundle."""

    parity: dict[str, Any]
    transforms: dict[str, dict[str, Any]]  # graph file -> the facts of its precision transform
    optimizations: list[str]
    int8: dict[str, Any] | None = None  # extra.int8, where a graph is int8


def build_manifest(folder: Path, graphs: dict[str, str], kind: BundleKind, source: Source, built: Built, extra: dict[str, Any], device: str) -> Manifest:
    """The manifest of the bundle being written in `folder`; `graphs`: its name -> graph file
    (the first one's opset is the bundle's)."""
    records = {name: graph_facts(folder, folder / file) for name, file in graphs.items()}
    return Manifest(
        family=kind.family,
        role=kind.role,
        model_type=kind.model_type,
        input_kind=kind.input_kind,
        graphs={name: record for name, (record, _) in records.items()},
        dtype=kind.dtype,
        opset=next(iter(records.values()))[1],
        source=source,
        libraries=library_versions(),
        parity=built.parity,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        extra={**extra, **({"int8": built.int8} if built.int8 is not None else {})},
        precision=kind.precision,
        optimizations=built.optimizations,
        device=device,
    )
