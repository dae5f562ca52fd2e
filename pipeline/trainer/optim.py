"""Optimiser and learning-rate schedule of the MViT recipes (AdamW, or SGD with momentum for SSv2; cosine
with linear warmup).

Weight decay is not applied to norms, biases, position embeddings, relative-position tables or the cls
token: decaying them towards zero only fights the normalisation they implement. The learning rate is
given for a reference global batch and scaled linearly with the actual one (Goyal et al.), so a preset
keeps its meaning when the cluster shape changes.

Fine-tuning (``optim.layer_decay``, ``optim.freeze_blocks``): parameters are grouped by depth as well,
layer 0 the patch embedding, cls token and position embeddings, layer i + 1 block i, the last layer the
final norm and the head; each group's LR is the schedule's times ``layer_decay ** (last - layer)``, so
the layers nearest the input, whose features transfer best, move least (BEiT's and MViTv2's fine-tuning
recipe). Frozen layers get LR 0 in the first ``freeze_epochs`` epochs: AdamW's decoupled weight decay is
scaled by the LR too, as SGD's whole step is, so their weights do not change at all; their gradients are
still computed (and count in the clipping norm) and their moments still accumulate.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from pipeline.trainer.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    return cfg.lr * global_batch_size / cfg.reference_batch_size


def _clean(name: str) -> str:
    """The parameter's name in the model: FSDP2 keeps original names; torch.compile and activation
    checkpointing add wrapper components."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_of(name: str, depth: int) -> int:
    """The fine-tuning layer of a parameter: 0 for the embedding (patch embedding, cls token, position
    embeddings), i + 1 for block i, depth + 1 for what follows the blocks (final norm, head)."""
    clean = _clean(name)
    if clean.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    match = _BLOCK.match(clean)
    return int(match.group(1)) + 1 if match else depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 by_layer: bool = False) -> list[dict]:
    """Decayed weights, and everything 1-D or named as an embedding/token (not decayed); with
    ``layer_decay`` < 1 or ``by_layer``, those two per layer, each group with its ``layer`` and
    ``lr_scale``. Empty groups are left out."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    layered = by_layer or layer_decay != 1.0
    depth = len(getattr(model, "blocks", ()))
    groups: dict[tuple[int, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or _clean(name) in skip
        layer = layer_of(name, depth) if layered else depth + 1
        groups.setdefault((layer, no_decay), []).append(param)
    if not layered:
        return [{"params": groups.get((depth + 1, False), []), "weight_decay": weight_decay},
                {"params": groups.get((depth + 1, True), []), "weight_decay": 0.0}]
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "layer": layer,
         "lr_scale": layer_decay ** (depth + 1 - layer)}
        for (layer, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch_size: int) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, by_layer=cfg.freeze_blocks > 0 and cfg.freeze_epochs > 0)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=scaled_lr(cfg, global_batch_size), momentum=cfg.momentum)
    return torch.optim.AdamW(
        groups,
        lr=scaled_lr(cfg, global_batch_size),
        betas=tuple(cfg.betas),  # type: ignore[arg-type]
        eps=cfg.eps,
    )


class WarmupCosine:
    """LR multiplier as a function of training progress in (fractional) epochs: linear warmup from
    ``start_ratio`` (None: from ~0, never below 1/1000) to 1, then a half cosine down to ``min_ratio`` at
    the last epoch.

    Progress is measured in epochs rather than optimiser steps (as PySlowFast does) so that a job
    resumed on a different number of workers, hence a different number of steps per epoch, continues
    on the same curve; nothing but the epoch position needs saving.
    """

    def __init__(self, epochs: float, warmup_epochs: float, min_ratio: float, start_ratio: float | None = None) -> None:
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        self.epochs = float(epochs)
        self.warmup = min(max(float(warmup_epochs), 0.0), self.epochs)
        self.min_ratio = min_ratio
        self.start_ratio = start_ratio

    def __call__(self, progress: float) -> float:
        if progress < self.warmup:
            if self.start_ratio is not None:
                return self.start_ratio + (1 - self.start_ratio) * progress / self.warmup
            return max(progress / self.warmup, 1e-3)
        span = max(self.epochs - self.warmup, 1e-12)
        t = min(max((progress - self.warmup) / span, 0.0), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class LRSchedule:
    """Sets every parameter group's LR from the progress in epochs (call before each optimiser step): the
    schedule's LR times the group's layer-wise scale, 0 for a frozen layer while its epochs last.

    The scales and layers are read from the groups when the schedule is made (before a checkpoint is
    restored into the optimiser), so they are the config's, whatever the checkpoint's groups carry.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, global_batch_size: int, epochs: int) -> None:
        self.optimizer = optimizer
        self.peak = scaled_lr(cfg, global_batch_size)
        start = None if cfg.warmup_start_lr is None else cfg.warmup_start_lr / cfg.lr
        self.curve = WarmupCosine(epochs, cfg.warmup_epochs, cfg.min_lr / cfg.lr, start)
        self.scales = [float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
        self.layers = [g.get("layer") for g in optimizer.param_groups]
        self.freeze_blocks, self.freeze_epochs = cfg.freeze_blocks, cfg.freeze_epochs
        self._last: float | None = None

    def frozen(self, layer: int | None, epoch: int | None) -> bool:
        """Whether ``layer`` takes no update in ``epoch``: the embedding (layer 0) and blocks 0 ..
        freeze_blocks - 1 (layers 1 .. freeze_blocks) in epochs before ``freeze_epochs``."""
        return (layer is not None and epoch is not None and self.freeze_blocks > 0 and epoch < self.freeze_epochs
                and layer <= self.freeze_blocks)

    def set(self, progress: float, epoch: int | None = None) -> float:
        """Sets the groups' LRs for a step at ``progress`` (fractional epochs) of ``epoch`` (the epoch the step
        belongs to: freezing follows it, not the progress, which reaches ``epoch + 1`` on its last step);
        returns the unscaled LR."""
        lr = self.peak * self.curve(progress)
        for group, scale, layer in zip(self.optimizer.param_groups, self.scales, self.layers):
            group["lr"] = 0.0 if self.frozen(layer, epoch) else lr * scale
        self._last = lr
        return lr

    def current(self) -> float:
        """The unscaled LR the last optimiser step used: the last one set, else (a restored optimiser) that of
        the head's group, whose scale is 1, else the schedule's start."""
        if self._last is not None:
            return self._last
        restored = [g.get("lr") for g, scale in zip(self.optimizer.param_groups, self.scales) if scale == 1.0]
        return float(restored[-1]) if restored and restored[-1] is not None else self.peak * self.curve(0.0)
