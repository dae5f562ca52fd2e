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
from pipeline.trainer.spec import InitWeights


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


def resuming() -> bool:
    """Whether this attempt resumes a checkpoint of its own job (Ray Train hands it one): the job's own
    progress wins over ``model.init_from``, so a restarted fine-tune resumes instead of starting again."""
    try:
        import ray.train

        return ray.train.get_checkpoint() is not None
    except (RuntimeError, AttributeError, ValueError):  # not in a Ray Train worker
        return False


def load_initial_weights(model: MViT, init: InitWeights) -> None:
    """Loads the driver's fitted weights into the (unsharded) model: before FSDP2 shards it, so every rank
    shards the same full tensors. Strict but for the re-initialised keys, which keep the model's values."""
    import ray

    state = ray.get(init.weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if sorted(missing) != sorted(init.reinitialized) or unexpected:
        raise RuntimeError(f"initial weights {init.source} do not match the model built on this worker: missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


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
