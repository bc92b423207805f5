"""Optimizer and learning-rate schedule from the trainer config."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak lr for the update numbered `step` (0-based).

    Linear warm-up over `warmup_steps` (the first update already moves: factor 1/warmup), then
    constant, linear decay to 0, or cosine decay to 0 at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")


def build_optimizer(model: torch.nn.Module, trainer_cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if trainer_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay)
    if trainer_cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay)
    raise ValueError(f"unknown optimizer {trainer_cfg.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, trainer_cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=trainer_cfg.warmup_steps, total_steps=total_steps,
                               kind=trainer_cfg.schedule),
    )
