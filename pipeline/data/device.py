"""What runs on the training device after a batch arrives: normalisation and batch-level mixing.

Batches leave the data service as uint8, four times smaller than float32, so the host-to-device copy
and the object store carry the least data; these functions run on the device right before the model.

    x = normalize(batch["video"], cfg.augment.mean, cfg.augment.std)            # float, (B, C, T, H, W)
    x, targets = mix_batch(x, batch["label"], num_classes, cfg.augment, batch["mix_seed"])
    loss = soft_cross_entropy(model(x), targets)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.data.config import AugmentConfig


def normalize(
    video: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (B, C, ...) in 0..255 -> ``dtype`` ((x / 255) - mean) / std, per channel (dim 1)."""
    shape = (1, -1) + (1,) * (video.dim() - 2)
    mean_t = torch.as_tensor(mean, dtype=dtype, device=video.device).view(shape) * 255.0
    inv_std = 1.0 / (torch.as_tensor(std, dtype=dtype, device=video.device).view(shape) * 255.0)
    return (video.to(dtype) - mean_t) * inv_std


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float, dtype: torch.dtype) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.long().unsqueeze(1), 1.0 - smoothing + off)


def mix_batch(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, aug: AugmentConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix over the batch (timm / PySlowFast ``MixUp``): returns the mixed input and soft
    targets (label smoothing included). Sample i is mixed with sample B-1-i; one lambda per batch.

    With probability ``mix_prob`` the batch is mixed: CutMix (one box, the same in every frame, lambda
    corrected to the box's real area) with probability ``switch_prob`` when both alphas are > 0,
    else Mixup. ``seed`` (the batch's ``mix_seed``) makes the draw reproducible. Works on (B, C, H, W)
    and (B, C, T, H, W).
    """
    targets = smooth_one_hot(labels, num_classes, aug.label_smoothing, x.dtype if x.is_floating_point() else torch.float32)
    rng = np.random.default_rng(seed)
    use_mix = (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0) and rng.random() < aug.mix_prob and x.shape[0] > 1
    if not use_mix:
        return x, targets
    use_cutmix = aug.cutmix_alpha > 0 and (aug.mixup_alpha <= 0 or rng.random() < aug.switch_prob)
    lam = float(rng.beta(aug.cutmix_alpha, aug.cutmix_alpha) if use_cutmix else rng.beta(aug.mixup_alpha, aug.mixup_alpha))
    flipped = x.flip(0)
    if use_cutmix:
        height, width = x.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed = x.clone()
        mixed[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    else:
        mixed = x * lam + flipped * (1.0 - lam)
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against soft targets (rows sum to 1)."""
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
