"""The learning rate of step t: a pure function of the step, so every rank, and a resumed run, follow one curve.

With lr = optim.lr, m = optim.min_lr, W = optim.warmup_steps, T = train.steps and t = 1, ..., T:

    warm-up (every schedule)   t <= W:  lr_t = lr * t / W
    constant                   t >  W:  lr_t = lr
    cosine                     t >  W:  lr_t = m + (lr - m) * (1 + cos(pi * (t - W) / (T - W))) / 2
    linear                     t >  W:  lr_t = m + (lr - m) * (1 - (t - W) / (T - W))

so both decays start just below lr at t = W + 1 and reach m at t = T (config keeps W < T).
"""

from __future__ import annotations

import math

from pipeline.config import LR_SCHEDULES, OptimConfig


def lr_at(step: int, optim: OptimConfig, steps: int) -> float:
    """The learning rate the update of `step` (1-based) uses in a run of `steps` steps."""
    lr, m, w = optim.lr, optim.min_lr, optim.warmup_steps
    if 0 < step <= w:
        return lr * step / w  # linear warm-up from lr / W to lr
    progress = (step - w) / (steps - w)  # (t - W) / (T - W), in (0, 1]
    if optim.schedule == "cosine":
        return m + (lr - m) * (1 + math.cos(math.pi * progress)) / 2
    if optim.schedule == "linear":
        return m + (lr - m) * (1 - progress)
    if optim.schedule == "constant":
        return lr
    raise ValueError(f"unknown lr schedule {optim.schedule!r}; expected one of {LR_SCHEDULES}")


def set_lr(optimizers, lr: float) -> None:
    """Every parameter group of every optimizer takes this step's learning rate (before its update)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
