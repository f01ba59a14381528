"""Decoder graphs with fused attention, built by ONNX Runtime's model builder.

An op-by-op decoder graph (Optimum's, or ours in its layout) is mostly shape arithmetic:
for a 24-layer decoder about 2,400 of the 2,536 nodes of Optimum's optimized graph (attention reshapes, rotary positions, masks),
a large share of an int4 decode step (measured in docs/performance-notes.md). The model
builder of `onnxruntime-genai` writes the same math as ~11 fused nodes per layer:
GroupQueryAttention with the rotary embedding inside, SkipSimplifiedLayerNormalization, one
packed q/k/v MatMul, and logits for the last position only.

The builder reads a checkpoint folder, so the merged model is saved first (safetensors).
It is asked for fp32; `--precision` transforms the result like any other fp32 graph.

GroupQueryAttention derives positions and key lengths from the attention mask's row sums,
which assumes no left padding: the graph says so in its metadata, and the runtime runs
left-padded rows of a batch one at a time (runtime.ort_backends.decoder_backend)."""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from lalm_export.errors import ExportError, OptionsError
from lalm_export.graphs.rewrites import LAST_POSITION_LOGITS
from runtime.ort_backends import LEFT_PADDING_METADATA

if TYPE_CHECKING:  # torch stays out of the CLI's start-up, which reads GRAPH_CHOICES
    from torch import nn

GRAPH_CHOICES = ("auto", "fused", "optimum")
BUILDER_REQUIREMENT = "onnxruntime-genai>=0.15"  # the first builder tested against transformers 5
# The builder's causal-LM architectures whose fused graphs this project tests for parity.
FUSED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# What a fused graph does beyond the op-by-op graph (the manifest's `optimizations`).
FUSED_OPTIMIZATIONS = ["fused attention (GroupQueryAttention, rotary inside) and norms: ONNX Runtime's model builder", LAST_POSITION_LOGITS]


def builder_available() -> bool:
    try:
        import onnxruntime_genai.models.builder  # noqa: F401
    except ImportError:
        return False
    return True


def scaled_rotary(config: Any) -> bool:
    """Whether the rotary embedding is scaled (linear, dynamic, yarn, llama3, ...). transformers
    5 names every rotary's parameters, plain ones too (`rope_type` "default")."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    layers = parameters.values() if all(isinstance(v, dict) for v in parameters.values()) and parameters else [parameters]
    return any(layer.get("rope_type", layer.get("type", "default")) != "default" for layer in layers)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot get a fused graph, or None when it can."""
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    if architectures[0] not in FUSED_ARCHITECTURES:
        return f"{architectures[0]} is not one of the fused-graph architectures ({', '.join(FUSED_ARCHITECTURES)})"
    if scaled_rotary(model.config):
        return "rotary scaling (rope_scaling) is not covered by the fused graph's tests"
    if not builder_available():
        return f"ONNX Runtime's model builder is not installed (pip install '{BUILDER_REQUIREMENT}')"
    return None


def choose_decoder_graph(requested: str, model: nn.Module, optimize: bool, device: str, opset: int | None = None) -> tuple[str, str]:
    """The graph to build ("fused" or "optimum") and a short reason for the progress line.
    `opset`: an opset the user asked for explicitly (the builder picks its own)."""
    if requested == "optimum":
        return "optimum", "--decoder-graph optimum"
    if requested == "fused":
        if opset is not None:
            raise OptionsError(
                f"--opset {opset} applies to the op-by-op graphs; the fused graph's builder chooses its opset: drop --opset or use --decoder-graph optimum"
            )
        if device != "cpu":
            raise OptionsError("--decoder-graph fused is built and verified for the CPU provider; with --device cuda use --decoder-graph optimum")
        reason = unsupported_reason(model)
        if reason is not None:
            raise OptionsError(f"--decoder-graph fused: {reason}; use --decoder-graph optimum")
        return "fused", "--decoder-graph fused"
    if not optimize:
        return "optimum", "--no-optimize"
    if opset is not None:
        return "optimum", f"--opset {opset}"
    if device != "cpu":
        return "optimum", "fused graphs are for the CPU provider"
    reason = unsupported_reason(model)
    return ("optimum", reason) if reason else ("fused", "fused attention (GroupQueryAttention)")


def build_fused_decoder(
    model: nn.Module, tokenizer: Any, folder: Path, trust_remote_code: bool, exclude_embeds: bool = False, filename: str = "model.onnx"
) -> Path:
    """Write `folder/<filename>` (+ `<filename>.data`): the fp32 fused graph of `model`;
    `exclude_embeds`: without the embedding, taking `inputs_embeds` (an LALM's decoder)."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    from lalm_export.graphs.traced import decoder_cache_shape

    folder.mkdir(parents=True, exist_ok=True)
    work = folder / "builder"
    checkpoint, built, cache = work / "checkpoint", work / "built", work / "cache"
    model.save_pretrained(str(checkpoint), safe_serialization=True)
    tokenizer.save_pretrained(str(checkpoint))
    options = {
        "hf_remote": str(trust_remote_code).lower(),  # the builder's default is true: run checkpoint code only when asked
        "hf_token": "false",
        "prune_lm_head": "true",
        "filename": filename,
        **({"exclude_embeds": "true"} if exclude_embeds else {}),
    }
    try:
        with _builder_quiet():
            # parse_extra_options reads the checkpoint's config and tokenizer, then create_model builds
            parsed = parse_extra_options(None, str(checkpoint), str(built), "fp32", "cpu", str(cache), [f"{k}={v}" for k, v in options.items()])
            create_model(None, str(checkpoint), str(built), "fp32", "cpu", str(cache), **parsed)
    except (NotImplementedError, ValueError, KeyError) as err:
        raise ExportError(f"ONNX Runtime's model builder could not build a fused graph ({err}); use --decoder-graph optimum") from None
    graph = folder / filename
    shutil.move(str(built / filename), graph)
    if (built / f"{filename}.data").exists():
        shutil.move(str(built / f"{filename}.data"), folder / f"{filename}.data")
    shutil.rmtree(work)
    finish_fused_graph(graph, decoder_cache_shape(model.config)[1])
    return graph


def finish_fused_graph(graph: Path, head_dim: int) -> None:
    """Record in the graph itself that its batches must not be left-padded (the precision
    transforms keep metadata), and give the KV cache its head size where the builder leaves it
    symbolic (`kv_cache_dim`, for its quantized caches): the runtime sizes its cache buffers
    from the graph. Done on the fp32 graph, whose weights lie in model.onnx.data."""
    proto = onnx.load(str(graph), load_external_data=False)
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            last = value.type.tensor_type.shape.dim[-1]
            if last.dim_param:
                last.dim_value = head_dim  # setting the value clears the name (a oneof)
    entries = {p.key: p for p in proto.metadata_props}
    entry = entries.get(LEFT_PADDING_METADATA) or proto.metadata_props.add()
    entry.key, entry.value = LEFT_PADDING_METADATA, "false"
    onnx.save_model(proto, str(graph))


@contextlib.contextmanager
def _builder_quiet() -> Iterator[None]:
    """The builder prints every tensor it saves (its errors still raise)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
