"""Turns an MViT into the model a training worker steps, from outside the model, the torchtitan way.

``parallelize`` applies, in this order:

1. activation checkpointing (the model's own per-block switch: each block's activations are dropped
   after forward and recomputed in backward);
2. ``torch.compile`` per block, in place (parameter names unchanged, so checkpoints stay portable);
3. FSDP2 ``fully_shard`` per block, then the root.

The order is torchtitan's, for its reason: compile must see each block as it will run, recomputation
included, so AC goes first; and FSDP2 comes last so that its per-block hooks (all-gather before a
block, reshard after) sit at the block boundaries, outside the compiled graphs, instead of being traced
into them. The model file stays unaware of any of this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pipeline.models.mvit import MViT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FSDPSettings:
    param_dtype: torch.dtype | None = None  # torch.bfloat16 on GPU; None keeps fp32 (CPU)
    reduce_dtype: torch.dtype | None = torch.float32
    reshard_after_forward: bool = True


@dataclass(frozen=True)
class ParallelSettings:
    activation_checkpointing: bool = False
    compile: bool = False
    fsdp: FSDPSettings = FSDPSettings()


def parallelize(model: MViT, mesh: DeviceMesh | None, settings: ParallelSettings = ParallelSettings()) -> MViT:
    """AC, then compile, then FSDP2 over ``mesh`` (None: a single process, no sharding); in place."""
    if settings.activation_checkpointing:
        model.set_grad_checkpointing(True)
    if settings.compile:
        apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, mesh, settings.fsdp)
        log.info("FSDP2: %d blocks + root sharded over %d %s ranks", len(model.blocks), mesh.size(), mesh.device_type)
    return model


def apply_compile(model: MViT) -> MViT:
    """Compiles each block in place, not the whole model, so that the FSDP2 units applied afterwards
    keep their boundaries. MViT's blocks are not alike (widths, pooling strides, drop-path rates): each
    is its own graph of the one shared ``forward``, and dynamo's recompile limit (8 by default) counts
    them all against that code object, so without ``isolate_recompiles`` the blocks after the eighth
    ran eagerly (half of MViT-B's 16)."""
    for block in model.blocks:
        block.compile(isolate_recompiles=True)
    return model


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
