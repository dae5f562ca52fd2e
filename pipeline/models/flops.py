"""FLOP and parameter counting the way the MViT paper reports them.

The paper (like fvcore, which PySlowFast uses) counts one multiply-add as one FLOP and counts the
matrix products: convolutions, linear layers and the two attention matmuls. We run the model on the
``meta`` device under ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per
multiply-add for exactly those ops, and halve it. On ``meta`` attention takes the math path, so its
matmuls are always counted (fused CPU/GPU attention kernels would otherwise be invisible) and no
memory or time is spent on real activations, even for MViT-B 64x3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.mvit import MViT, MViTConfig


@dataclass(frozen=True)
class ModelStats:
    params: int
    head_params: int  # the classifier's share of ``params``
    gflops: float  # multiply-adds per view, in units of 1e9
    by_op: dict[str, float]  # GFLOPs per aten op

    @property
    def params_m(self) -> float:
        return self.params / 1e6


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_stats(cfg: MViTConfig) -> ModelStats:
    """Parameters and per-view GFLOPs of the network ``cfg`` describes, for one input clip."""
    with torch.device("meta"):
        model = MViT(cfg).eval()
        x = torch.empty((1,) + cfg.input_shape)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    by_op = {str(op): n / 2e9 for op, n in counter.get_flop_counts()["Global"].items()}
    return ModelStats(params=count_params(model), head_params=count_params(model.head), gflops=counter.get_total_flops() / 2e9, by_op=by_op)
