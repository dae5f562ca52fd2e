"""Applies FSDP2 to an MViT from outside the model, the torchtitan way.

Each ``MultiScaleBlock`` becomes one FSDP unit (its parameters are all-gathered just before it runs
and freed after), then the root wraps what is left (patch embedding, position embeddings, final norm,
head). The model file stays unaware of any of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pipeline.models.mvit import MViT


@dataclass(frozen=True)
class FSDPSettings:
    param_dtype: torch.dtype | None = None  # torch.bfloat16 on GPU; None keeps fp32 (CPU)
    reduce_dtype: torch.dtype | None = torch.float32
    reshard_after_forward: bool = True


def apply_fsdp(model: MViT, mesh: DeviceMesh, settings: FSDPSettings = FSDPSettings()) -> MViT:
    """Shards ``model`` in place over ``mesh``: one FSDP unit per block, then the root."""
    mp = MixedPrecisionPolicy(param_dtype=settings.param_dtype, reduce_dtype=settings.reduce_dtype)
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        # The last block's parameters are needed again first in backward: keeping them avoids a re-gather.
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp,
            reshard_after_forward=settings.reshard_after_forward and i < last,
        )
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=settings.reshard_after_forward)
    return model
