"""Optimiser and learning-rate schedule of the MViT recipe (AdamW, cosine with linear warmup).

Weight decay is not applied to norms, biases, position embeddings, relative-position tables or the cls
token: decaying them towards zero only fights the normalisation they implement. The learning rate is
given for a reference global batch and scaled linearly with the actual one (Goyal et al.), so a preset
keeps its meaning when the cluster shape changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 1.6e-3  # at reference_batch_size; scaled linearly with the global batch
    reference_batch_size: int = 512
    min_lr: float = 1.6e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 30.0
    clip_grad_norm: float | None = 1.0  # None disables clipping

    def __post_init__(self) -> None:
        """Messages start with the full key (``optim.lr ...``): ``load_config`` names its source from it."""
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.reference_batch_size < 1:
            raise ValueError(f"optim.reference_batch_size must be >= 1, got {self.reference_batch_size}")
        for name in ("warmup_epochs", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must both be in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"optim.clip_grad_norm must be > 0 (or null for no clipping), got {self.clip_grad_norm}")


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
