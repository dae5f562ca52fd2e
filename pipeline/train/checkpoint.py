"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), handed to Ray Train.

Every rank writes its own shard files into a local directory and passes it to ``ray.train.report``;
Ray merges the ranks' directories into one checkpoint directory in ``RunConfig.storage_path`` (local
or S3) and keeps the N best/latest. DCP stores tensors by their global names and shapes, so a
checkpoint written by N workers loads on M workers (resharding on load).

Layout of one checkpoint directory:
    dcp/                 DCP files: model and optimiser state (``.metadata`` + ``__<rank>_*.distcp``)
    train_state.json     epoch, step, position in the epoch, MLflow run id, world size (rank 0)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

TRAIN_STATE_FILE = "train_state.json"
DCP_DIR = "dcp"


@dataclass
class TrainState:
    """Where training stands; enough to continue exactly where a checkpoint was taken."""

    epoch: int = 0  # epoch in progress (or next to start)
    step: int = 0  # optimiser steps taken so far (the MLflow step axis)
    samples_in_epoch: int = 0  # samples of `epoch` already consumed, summed over all workers
    mlflow_run_id: str | None = None
    world_size: int = 1
    best_top1: float | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainState":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_checkpoint(directory: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState) -> Path:
    """Collective: every rank must call it. Writes this rank's shards (and, on rank 0, the state)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / DCP_DIR))
    if _rank() == 0:
        (directory / TRAIN_STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    return directory


def load_checkpoint(directory: str | os.PathLike[str], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> TrainState:
    """Collective: restores model and optimiser in place (any world size) and returns the state."""
    directory = Path(directory)
    state_file = directory / TRAIN_STATE_FILE
    if not state_file.is_file() or not (directory / DCP_DIR / ".metadata").is_file():
        raise FileNotFoundError(
            f"{directory} is not a complete checkpoint (needs {TRAIN_STATE_FILE} and {DCP_DIR}/.metadata)"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=str(directory / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    return TrainState.from_dict(json.loads(state_file.read_text()))


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model weights on CPU (on rank 0; other ranks get an empty dict)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
