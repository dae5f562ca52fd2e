"""Optimiser and learning-rate schedule of the MViT recipe (AdamW, cosine with linear warmup).

Weight decay is not applied to norms, biases, position embeddings, relative-position tables or the cls
token: decaying them towards zero only fights the normalisation they implement. The learning rate is
given for a reference global batch and scaled linearly with the actual one (Goyal et al.), so a preset
keeps its meaning when the cluster shape changes.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from pipeline.trainer.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    return cfg.lr * global_batch_size / cfg.reference_batch_size


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and everything 1-D or named as an embedding/token (not decayed)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # FSDP2 keeps original names; strip wrappers that torch.compile / checkpointing may add.
        clean = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        if param.ndim <= 1 or clean in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch_size: int) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=scaled_lr(cfg, global_batch_size),
        betas=tuple(cfg.betas),  # type: ignore[arg-type]
        eps=cfg.eps,
    )


class WarmupCosine:
    """LR multiplier as a function of training progress in (fractional) epochs: linear warmup from ~0
    to 1, then a half cosine down to ``min_ratio`` at the last epoch.

    Progress is measured in epochs rather than optimiser steps (as PySlowFast does) so that a job
    resumed on a different number of workers, hence a different number of steps per epoch, continues
    on the same curve; nothing but the epoch position needs saving.
    """

    def __init__(self, epochs: float, warmup_epochs: float, min_ratio: float) -> None:
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        self.epochs = float(epochs)
        self.warmup = min(max(float(warmup_epochs), 0.0), self.epochs)
        self.min_ratio = min_ratio

    def __call__(self, progress: float) -> float:
        if progress < self.warmup:
            return max(progress / self.warmup, 1e-3)
        span = max(self.epochs - self.warmup, 1e-12)
        t = min(max((progress - self.warmup) / span, 0.0), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class LRSchedule:
    """Sets every parameter group's LR from the progress in epochs (call before each optimiser step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, global_batch_size: int, epochs: int) -> None:
        self.optimizer = optimizer
        self.peak = scaled_lr(cfg, global_batch_size)
        self.curve = WarmupCosine(epochs, cfg.warmup_epochs, cfg.min_lr / cfg.lr)

    def set(self, progress: float) -> float:
        lr = self.peak * self.curve(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def current(self) -> float:
        """The LR the last optimiser step used (the schedule's start before any step)."""
        return float(self.optimizer.param_groups[0].get("lr", self.peak * self.curve(0.0)))
