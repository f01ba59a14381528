"""A plain training loop for an LALM: AdamW under a one-cycle schedule, gradient clipping,
the loss on target text only (`LALM.forward`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def train_lalm(
    model,
    batch_for: Callable[[int], tuple[Sequence[np.ndarray], Sequence[str]]],
    steps: int,
    lr: float = 3e-3,
    prompt: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """`steps` updates of what trains in `model` (the projector; encoder and decoder as their
    modes say) on `batch_for(step)` = (16 kHz clips, target texts); `on_step(step, loss)` after each."""
    model.set_training_mode()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        clips, targets = batch_for(step)
        loss = model(list(clips), **model.training_batch([prompt] * len(clips), list(targets))).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, loss.item())
    model.set_inference_mode()
