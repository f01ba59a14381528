"""Optimum's decoder graph fed `inputs_embeds`: an LALM's decoder where ONNX Runtime's model
builder does not apply (architectures outside its tested list, rotary scaling, CUDA).

Optimum exports a causal LM with `input_ids` only. Its ONNX config for the architecture is
kept whole (KV cache names, dynamic axes, position ids where the architecture takes them,
the model patcher) and only the first input is renamed: `inputs_embeds`
`(batch, sequence, hidden)` where `input_ids` was. The dummy inputs come from Optimum's own
generators (so the attention mask still spans past + new positions) with the ids replaced by
random embeddings of the same shape. The runtime feeds the graph like Optimum's other
decoder graphs (`runtime.ort_backends.OrtDecoderBackend`), with embeddings for ids."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

TASK = "text-generation-with-past"


def embeds_onnx_config(model: nn.Module) -> Any:
    """The architecture's Optimum ONNX config with the KV cache, taking `inputs_embeds` for `input_ids`."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers Optimum's ONNX configs)
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(exporter="onnx", model=model, task=TASK, library_name="transformers")
    config = constructor(model.config, use_past_in_inputs=True)  # one graph: prefill (empty past) and decode steps
    ids_config = type(config)
    hidden_size = int(model.config.hidden_size)

    def inputs(self: Any) -> dict[str, dict[int, str]]:
        return {("inputs_embeds" if name == "input_ids" else name): axes for name, axes in ids_config.inputs.fget(self).items()}

    def generate_dummy_inputs(self: Any, framework: str = "pt", **kwargs: Any) -> dict[str, Any]:
        with_ids = copy.copy(self)
        with_ids.__class__ = ids_config
        dummy = with_ids.generate_dummy_inputs(framework, **kwargs)
        ids = dummy.pop("input_ids")
        return {"inputs_embeds": torch.randn(*ids.shape, hidden_size), **dummy}

    config.__class__ = type(f"{ids_config.__name__}Embeds", (ids_config,), {"inputs": property(inputs), "generate_dummy_inputs": generate_dummy_inputs})
    return config


def export_embeds_decoder(model: nn.Module, target: Path, opset: int) -> Path:
    """Write `target` (+ its external data when large): the fp32 decoder taking `inputs_embeds`."""
    from optimum.exporters.onnx.convert import export_pytorch

    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The tracer's notes on Python branches; the parity gate runs other lengths than traced.
        warnings.simplefilter("ignore")
        export_pytorch(model, embeds_onnx_config(model), opset=opset, output=target)
    return target
