"""Learning-rate schedules as pure functions of the step.

The loop sets the optimizer's LR from ``lr_at(step, ...)`` every step, so resuming from a checkpoint
restores the schedule from the step alone: there is no scheduler state to save.
"""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``.

    Both schedules warm up linearly from lr/warmup_steps to ``lr`` over ``warmup_steps``. Then
    ``cosine`` decays to ``min_lr`` at the last step; ``wsd`` (warmup-stable-decay) holds ``lr`` and
    decays linearly to ``min_lr`` over the last ``decay_fraction`` of all steps.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    last = max(total_steps - 1, 1)
    if schedule == "cosine":
        span = max(last - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    if schedule == "wsd":
        decay_steps = max(int(round(decay_fraction * total_steps)), 0)
        decay_start = max(total_steps - decay_steps, warmup_steps)
        if step < decay_start or decay_steps == 0:
            return lr
        progress = min((step - decay_start) / max(last - decay_start, 1), 1.0)
        return lr + progress * (min_lr - lr)
    raise ValueError(f"unknown schedule {schedule!r}; allowed: 'cosine', 'wsd'")


def lr_for(train_cfg, step: int, total_steps: int) -> float:
    """``lr_at`` with the knobs taken from a ``TrainConfig``."""
    knobs = ("lr", "min_lr", "warmup_steps", "schedule", "decay_fraction")
    return lr_at(step, total_steps=total_steps, **{name: getattr(train_cfg, name) for name in knobs})
