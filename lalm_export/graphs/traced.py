"""The op-by-op graphs, exported with `torch.onnx` (its TorchScript tracer): an encoder, and a
causal LM with its KV cache, fed token ids or `inputs_embeds` (an LALM's decoder).

No Optimum release exports on transformers 5 (docs/transformers5.md has the evidence); these
graphs keep Optimum's layout, so bundles and the runtime are unchanged: an encoder's input is
the family's (`input_values`, `input_features`), its outputs `last_hidden_state` and, when
asked, `hidden_states.0..N`; a decoder reads `input_ids` (or `inputs_embeds`),
`attention_mask`, `position_ids` and `past_key_values.N.key/value` and writes `logits` and
`present.N.key/value`. One decoder graph serves the prefill (an empty past) and every decode
step. The tracer records one run: the parity gate runs the graph on other batch sizes and
lengths than the ones traced, and refuses it if it does not generalize."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lalm_export.graphs.files import load_graph, save_graph
from lalm_export.models.families import FamilySpec

TRACE_BATCH = 2  # traced at batch 2, so no dimension of 1 is taken for a constant
TRACE_SAMPLES = 16_000  # raw-audio encoders: 1 s at 16 kHz
TRACE_PROMPT, TRACE_PAST = 3, 4  # decoder: new positions and cached positions of the traced step


class _EncoderOutputs(nn.Module):
    """The family's input → its final output, then every layer's hidden states when asked."""

    def __init__(self, model: nn.Module, spec: FamilySpec, all_hidden_states: bool) -> None:
        super().__init__()
        self.model, self.spec, self.all_hidden_states = model, spec, all_hidden_states

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**{self.spec.input_name: features}, output_hidden_states=self.all_hidden_states)
        final = getattr(out, self.spec.output_name)
        return (final, *out.hidden_states) if self.all_hidden_states else (final,)


def encoder_trace_input(model: nn.Module, spec: FamilySpec) -> torch.Tensor:
    """Random input of the family's kind: 1 s of samples, or Whisper's whole window of frames."""
    generator = torch.Generator().manual_seed(0)
    if spec.dynamic_length:
        return 0.1 * torch.randn(TRACE_BATCH, TRACE_SAMPLES, generator=generator)
    frames = 2 * int(model.config.max_source_positions)  # the convolution's stride 2 halves them
    return torch.randn(TRACE_BATCH, int(model.config.num_mel_bins), frames, generator=generator)


def export_encoder(model: nn.Module, spec: FamilySpec, all_hidden_states: bool, target: Path, opset: int) -> Path:
    """Write `target`: the fp32 encoder graph."""
    wrapper = _EncoderOutputs(model, spec, all_hidden_states).eval()
    outputs = [spec.output_name] + ([f"hidden_states.{i}" for i in range(int(model.config.num_hidden_layers) + 1)] if all_hidden_states else [])
    input_axes = {0: "batch_size", 1: "sequence_length"} if spec.dynamic_length else {0: "batch_size"}
    axes = {spec.input_name: input_axes, **{name: {0: "batch_size", 1: "sequence_length"} for name in outputs}}
    export_module(wrapper, (encoder_trace_input(model, spec),), target, [spec.input_name], outputs, axes, opset)
    return target


class _DecoderWithPast(nn.Module):
    """Flat tensors in and out around the model's cache object, in Optimum's names and order."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        ids_or_embeds = {"inputs_embeds": tokens} if tokens.is_floating_point() else {"input_ids": tokens}
        out = self.model(**ids_or_embeds, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache, use_cache=True)
        present = [tensor for layer in out.past_key_values.layers for tensor in (layer.keys, layer.values)]
        return (out.logits, *present)


def decoder_cache_shape(config: object) -> tuple[int, int]:
    """(key/value heads, head size) of a causal LM's KV cache."""
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, int(head_dim)


def export_decoder(model: nn.Module, target: Path, opset: int, embeds: bool = False) -> Path:
    """Write `target`: the fp32 causal LM with its KV cache, fed `input_ids` (or `inputs_embeds`)."""
    config = model.config
    layers = int(config.num_hidden_layers)
    heads, head_dim = decoder_cache_shape(config)
    generator = torch.Generator().manual_seed(0)
    batch, new, cached = TRACE_BATCH, TRACE_PROMPT, TRACE_PAST
    if embeds:
        tokens = torch.randn(batch, new, int(config.hidden_size), generator=generator)
    else:
        tokens = torch.randint(3, int(config.vocab_size), (batch, new), generator=generator)
    mask = torch.ones(batch, cached + new, dtype=torch.int64)
    mask[-1, :2] = 0  # a left-padded row: the mask is computed, not assumed all ones
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new:]
    past = [torch.randn(batch, heads, cached, head_dim, generator=generator) for _ in range(2 * layers)]
    cache_names = [f"past_key_values.{layer}.{part}" for layer in range(layers) for part in ("key", "value")]
    present_names = [name.replace("past_key_values", "present") for name in cache_names]
    first = "inputs_embeds" if embeds else "input_ids"
    axes = {
        first: {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
        **{name: {0: "batch_size", 2: "past_sequence_length"} for name in cache_names},
        **{name: {0: "batch_size", 2: "total_sequence_length"} for name in present_names},
    }
    wrapper = _DecoderWithPast(model, layers).eval()
    export_module(
        wrapper, (tokens, mask, positions, *past), target, [first, "attention_mask", "position_ids", *cache_names], ["logits", *present_names], axes, opset
    )
    return target


def export_module(module: nn.Module, args: tuple, target: Path, inputs: list[str], outputs: list[str], axes: dict[str, dict[int, str]], opset: int) -> None:
    """torch.onnx's TorchScript export of `module` run on `args` to `target` (every graph this
    project traces goes through here); a graph past protobuf's 2 GB limit gets its
    weights in one `<name>_data` file beside it (the tracer writes one file per tensor)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _scratch_folder(target.parent) as scratch, torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python-level branch and the exporter about its own
        # deprecation; the parity gate runs other shapes than the traced ones, the real test.
        warnings.simplefilter("ignore")
        traced = scratch / target.name
        torch.onnx.export(module, args, str(traced), input_names=inputs, output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False)
        if len(list(scratch.iterdir())) == 1:
            shutil.move(str(traced), target)
        else:
            save_graph(load_graph(traced), target)


@contextmanager
def _scratch_folder(parent: Path) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix=".trace-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
