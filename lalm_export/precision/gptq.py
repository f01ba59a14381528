"""GPTQ: int4 weights that compensate their own rounding error, from calibration text.

Round-to-nearest int4 rounds every weight on its own. GPTQ (Frantar et al., 2022) quantizes
a Linear layer's input columns one at a time and spreads each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian `H = 2 XᵀX` of the layer's
inputs X on calibration text: the layer's *outputs* stay close, not each weight. Layers are
done in order, each seeing the already quantized layers before it: the first decoder layer's
inputs are captured once, and each layer then runs alone on its predecessor's outputs (one
pass through the model in all, not one per layer).

Without calibration text the model writes its own: sequences sampled at temperature 1 from
its start token (on a trained decoder as accurate as calibrating on its training text;
docs/performance-notes.md).

The grid is the one ONNX Runtime's MatMulNBits stores (symmetric, blocks of 32 by default along the
input dimension, the block's largest-magnitude weight at -8): the quantized weights are put
back into the fp32 model, exported, and `int4.quantize_int4` writes them into
MatMulNBits exactly (it recovers each block's grid instead of rounding again)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lalm_export.errors import OptionsError
from lalm_export.precision.int4 import block_scale, grid_levels

CALIBRATION_WINDOW = 128  # tokens per calibration sequence
MAX_CALIBRATION_WINDOWS = 64
MIN_CALIBRATION_TOKENS = 2 * CALIBRATION_WINDOW
DAMPING = 0.01  # of the Hessian's mean diagonal, added for a stable Cholesky factorisation
LAZY_BATCH = 128  # columns updated together (a multiple of the block size)
SAMPLING_BATCH = 64  # sequences sampled together: a wider batch samples more tokens per second (docs/performance-notes.md)


@dataclass(frozen=True)
class Calibration:
    """Where GPTQ's calibration windows came from: a text file, or samples of the model."""

    windows: int
    tokens_per_window: int
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None

    def to_dict(self) -> dict[str, object]:
        shape = {"windows": self.windows, "tokens_per_window": self.tokens_per_window}
        if self.path is None:
            return {"method": "gptq", "calibration": "model samples", "temperature": 1.0, "seed": self.seed, **shape}
        return {"method": "gptq", "calibration": "text file", "calibration_text": self.path, "sha256": self.sha256, **shape}


def calibration_windows(text_file: Path, tokenizer) -> np.ndarray:
    """Token windows `(n, CALIBRATION_WINDOW)` cut from a UTF-8 text file, evenly spread."""
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OptionsError(f"--calibration {text_file} does not exist; pass a UTF-8 text file of the kind of text the model will see") from None
    except UnicodeDecodeError:
        raise OptionsError(f"--calibration {text_file} is not UTF-8 text") from None
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    if ids.size < MIN_CALIBRATION_TOKENS:
        raise OptionsError(f"--calibration {text_file} has {ids.size} tokens; GPTQ needs at least {MIN_CALIBRATION_TOKENS} (a few pages of text)")
    count = min(MAX_CALIBRATION_WINDOWS, ids.size // CALIBRATION_WINDOW)
    starts = np.linspace(0, ids.size - CALIBRATION_WINDOW, count).astype(np.int64)
    return np.stack([ids[s : s + CALIBRATION_WINDOW] for s in starts])


@torch.no_grad()
def sampled_calibration_windows(model: nn.Module, tokenizer: Any, seed: int, count: int = MAX_CALIBRATION_WINDOWS, progress: bool = False) -> np.ndarray:
    """`(count, CALIBRATION_WINDOW)` tokens the model samples itself at temperature 1 from its
    start token (BOS, else EOS), never stopping early: calibration without a text file."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise OptionsError("--int4-method gptq without --calibration samples text from the model, which needs a BOS or EOS token; pass --calibration FILE")
    windows = []
    steps = -(-count // SAMPLING_BATCH) * CALIBRATION_WINDOW
    with torch.random.fork_rng(), tqdm(total=steps, desc="sample", unit="token", disable=not progress, leave=False) as bar:
        torch.manual_seed(seed)
        for first in range(0, count, SAMPLING_BATCH):
            prompt = torch.full((min(SAMPLING_BATCH, count - first), 1), start, dtype=torch.long)
            sampled = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                repetition_penalty=1.0,
                max_new_tokens=CALIBRATION_WINDOW,
                min_new_tokens=CALIBRATION_WINDOW,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start,
                streamer=_StepCounter(bar),
            )
            windows.append(sampled[:, 1:].numpy())
    return np.concatenate(windows).astype(np.int64)


class _StepCounter:
    """A `generate` streamer that only advances a progress bar, one step per new token."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def signed_block_scales(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Per (row, block) scale of the symmetric int4 grid: the largest-magnitude weight maps to -8."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block, block)
    index = blocks.abs().argmax(dim=-1, keepdim=True)
    return block_scale(torch.gather(blocks, -1, index).squeeze(-1))


def quantize_to_grid(column: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return grid_levels(column / safe) * scale


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, block: int) -> torch.Tensor:
    """The GPTQ int4 weight (dequantized, fp32) of a Linear weight `(out, in)`; `in % block == 0`."""
    w = weight.detach().clone().float()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPING * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    quantized = torch.zeros_like(w)
    scales = torch.zeros(w.shape[0])
    for start in range(0, w.shape[1], LAZY_BATCH):
        end = min(start + LAZY_BATCH, w.shape[1])
        w1, errors = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start)
        h1 = h_inv[start:end, start:end]
        for i in range(end - start):
            if i % block == 0:  # the block's grid, from its weights as updated so far
                scales = signed_block_scales(w1[:, i : i + block], block)[:, 0]
            q = quantize_to_grid(w1[:, i], scales)
            quantized[:, start + i] = q
            error = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= error[:, None] * h1[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return quantized


@contextmanager
def _input_hessians(modules: dict[str, nn.Linear]) -> Iterator[dict[str, torch.Tensor]]:
    """Accumulate each Linear's `2 XᵀX / n` over the forward passes run inside the block."""
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in modules.items()}
    counts = dict.fromkeys(modules, 0)

    def hook(name: str):
        def accumulate(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            n = x.shape[0]
            total = counts[name] + n
            hessians[name] *= counts[name] / total
            hessians[name] += (2.0 / total) * (x.T @ x)
            counts[name] = total

        return accumulate

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield hessians
    finally:
        for handle in handles:
            handle.remove()


def untie_lm_head(model: nn.Module) -> None:
    """A tied lm_head shares the embedding's tensor; GPTQ must change only the lm_head."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = nn.Parameter(embedding.weight.detach().clone())
        model.config.tie_word_embeddings = False


class _Captured(Exception):
    """Stops the model's forward pass once the first decoder layer's inputs are recorded."""


@torch.no_grad()
def first_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """For each batch of token ids, the hidden states and keyword arguments (mask, positions,
    rotary tables) that the model passes to its first decoder layer."""
    layer = model.get_decoder().layers[0]
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _Captured

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def gptq_quantize_decoder(model: nn.Module, windows: np.ndarray, block: int, lm_head: bool = True, progress: bool = True) -> int:
    """Replace every decoder Linear weight (and, with `lm_head`, the lm_head's) by its GPTQ int4
    weight, in place. Returns the number of layers quantized. Linear layers whose input width
    is not a multiple of `block` are left as they are (the int4 export rounds them to nearest)."""
    if lm_head:
        untie_lm_head(model)
    batches = list(torch.from_numpy(windows).split(8))
    inputs = first_layer_inputs(model, batches)
    done = 0
    for layer in tqdm(model.get_decoder().layers, desc="gptq", unit="layer", disable=not progress, leave=False):
        stage = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear) and m.in_features % block == 0}
        with _input_hessians(stage) as hessians:
            for hidden, kwargs in inputs:
                run_layer(layer, hidden, kwargs)
        for name, module in stage.items():
            module.weight.copy_(gptq_weight(module.weight, hessians[name], block))
            done += 1
        inputs = [(run_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
    head = model.get_output_embeddings()
    if lm_head and isinstance(head, nn.Linear) and head.in_features % block == 0:
        # The final norm sits between the last layer and the lm_head: a full pass is the
        # architecture-independent way to reach the lm_head's inputs.
        with _input_hessians({"lm_head": head}) as hessians:
            for batch in batches:
                model(input_ids=batch, use_cache=False)
        head.weight.copy_(gptq_weight(head.weight, hessians["lm_head"], block))
        done += 1
    return done
