"""A plain training loop for an LALM: AdamW under a one-cycle schedule, gradient clipping,
the loss on target text only (`LALM.forward`); and the tiny LALM the demo's tasks train."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def train_lalm(
    model,
    batch_for: Callable[[int], tuple[Sequence[np.ndarray], Sequence[str]]],
    steps: int,
    lr: float = 3e-3,
    prompt: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    auxiliary_loss: Callable[[Any, Sequence[np.ndarray], Sequence[str]], torch.Tensor] | None = None,
    bf16: bool = False,
) -> None:
    """`steps` updates of what trains in `model` (the projector; encoder and decoder as their
    modes say) on `batch_for(step)` = (16 kHz clips, target texts); `on_step(step, loss)` after
    each (the decoder's loss). `auxiliary_loss(model, clips, targets)` is added to it when given.
    `bf16`: forward passes under bfloat16 autocast on the CPU (weights, gradients and the
    optimizer stay fp32): faster on a CPU with bf16 instructions, many times slower on one
    without (`runtime.cpu.has_bf16`)."""
    model.set_training_mode()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 0.2 if steps == 10 else 0.1  # OneCycleLR divides by zero when its warm-up is exactly one step
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=warmup)
    for step in range(steps):
        clips, targets = batch_for(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(list(clips), **model.training_batch([prompt] * len(clips), list(targets))).loss
            total = loss if auxiliary_loss is None else loss + auxiliary_loss(model, clips, targets)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss.item())
    model.set_inference_mode()


def curriculum_stage(step: int, steps: int) -> int:
    """The demo tasks' curriculum: stage 0 for the first twelfth of the steps (the shortest
    labels: the decoder learns to read the audio), 1 until a quarter, 2 after (the task's own)."""
    return 0 if step < steps // 12 else 1 if step < steps // 4 else 2


def build_tiny_lalm(folder: Path, window_seconds: int, prompt: str, seed: int = 0) -> Any:
    """A tiny LALM from random checkpoints saved in `folder` (loaded through the real loading
    code): a Whisper-style encoder whose window is `window_seconds` (its log-mel front end
    resolves tones and formants), a projector (downsample 2) and a Llama-style decoder;
    encoder and decoder fully trained."""
    from transformers import WhisperFeatureExtractor

    from lalm_export.demo.tiny import build_tiny_checkpoint, save_random_checkpoint, tiny_config
    from lalm_export.models import LLMDecoder, encoder_class
    from lalm_export.models.lalm import LALM, ProjectorConfig

    config = tiny_config("whisper")
    config.max_source_positions = window_seconds * 50  # 50 encoder frames per second
    save_random_checkpoint("whisper", folder / "encoder", config, seed=seed)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=window_seconds).save_pretrained(str(folder / "encoder"))
    build_tiny_checkpoint("llm", folder / "decoder", seed=seed + 1)
    torch.manual_seed(seed)
    encoder = encoder_class("whisper")(str(folder / "encoder"), finetune=True)
    decoder = LLMDecoder(str(folder / "decoder"), finetune=True)
    return LALM(encoder, decoder, ProjectorConfig(downsample=2), prompt=prompt)
