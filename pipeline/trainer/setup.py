"""Where a training worker runs and the model it trains: device, precision, FSDP2, compile, AC.

Kept apart from the loop so that the loop reads as the recipe, and so that a test can build the
same sharded model the job builds without going through Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from pipeline.models.mvit import MViT
from pipeline.trainer.parallelize import FSDPSettings, ParallelSettings, parallelize


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "WorkerContext":
        """The context of this Ray Train worker (or a plain single process)."""
        try:
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
        except (RuntimeError, AttributeError, ValueError):
            rank = dist.get_rank() if dist.is_initialized() else 0
            world = dist.get_world_size() if dist.is_initialized() else 1
            return cls(rank, world, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def param_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 compute on GPU (``auto``), fp32 on CPU where bf16 matmuls are slow and gloo reduces fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def prepare_model(model: MViT, ctx: WorkerContext, precision: str, activation_checkpointing: bool,
                  compile_model: bool) -> torch.nn.Module:
    """The model on this worker's device, parallelized (``parallelize.parallelize``: AC, compile, FSDP2
    over all ranks when distributed)."""
    model.to(ctx.device)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,)) if dist.is_initialized() else None
    settings = ParallelSettings(activation_checkpointing=activation_checkpointing, compile=compile_model,
                                fsdp=FSDPSettings(param_dtype=param_dtype(precision, ctx.device)))
    return parallelize(model, mesh, settings)
