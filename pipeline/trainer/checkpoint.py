"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), handed to Ray Train.

Every rank writes its own shard files into a local directory and passes it to ``ray.train.report``;
Ray merges the ranks' directories into one checkpoint directory in ``RunConfig.storage_path`` (local
or S3) and keeps the latest N. ``CheckpointManager`` owns the cadence (epoch ends, every N steps) and
the resume; ``retention`` the number kept. DCP stores tensors by their global names and shapes, so a
checkpoint written by N workers loads on M workers (resharding on load).

Layout of one checkpoint directory:
    dcp/                 DCP files: model and optimiser state (``.metadata`` + ``__<rank>_*.distcp``)
    train_state.json     epoch, step, position in the epoch, MLflow run id, world size (rank 0)

Restoring never runs code from the checkpoint. Stock DCP (torch 2.x) unpickles ``.metadata`` with
plain ``pickle``, and non-tensor values (the optimiser's hyper-parameters) with ``torch.load`` and
``weights_only`` off, so a tampered checkpoint in shared storage would execute code in every worker.
``load_checkpoint`` reads with ``SafeFileSystemReader`` (metadata through an allowlist of DCP's own
metadata classes) and ``SafeLoadPlanner`` (values with ``weights_only=True``); anything else raises
``UnsafeCheckpoint`` naming the file. The checkpoint's content is not authenticated: whoever can write
to the storage path can still replace weights or training state.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from core.errors import UnsafeCheckpoint, weights_only_refusal

log = logging.getLogger(__name__)

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
    # The epoch so far, merged over ranks (``EpochStats.carry``): a resumed epoch is checked whole with it
    epoch_carry: dict | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainState":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# What DCP's own ``.metadata`` pickle refers to (torch 2.x): its metadata dataclasses, torch.Size, dtypes,
# layouts (via torch.serialization._get_layout) and the checkpoint path. Nothing here runs code on load.
# Private names (torch's ``_get_layout``, ``_MEM_FORMAT_ENCODING``, ``_StorageInfo``; Python 3.13's
# ``pathlib._local``) are what the pickle itself names, so no public alias can stand in for them.
# tests/test_private_apis.py saves a DCP checkpoint with the installed torch and fails if its metadata
# names anything outside this set (docs/versions.md).
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals DCP metadata is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` refuses anything but DCP's metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Mirrors the stock read_metadata, with the unpickler swapped; _get_metadata_path is private
        # (guarded by tests/test_private_apis.py).
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError) as err:
                raise UnsafeCheckpoint(f"refused checkpoint metadata {path}: {err}") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"refused checkpoint metadata {path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values (``BYTE_IO`` items) with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: IO[bytes]) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpoint(f"refused checkpoint value {read_item.dest_index.fqn!r}: "
                                   f"{weights_only_refusal(err)}") from None
        super().load_bytes(read_item, io.BytesIO(_plain_bytes(obj)))


def _plain_bytes(obj: Any) -> bytes:
    """``obj`` (already loaded safely) serialised again for the stock ``load_bytes`` to place."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer.getvalue()


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
    """Collective: restores model and optimiser in place (any world size) and returns the state.

    Reads through ``SafeFileSystemReader`` + ``SafeLoadPlanner``: a checkpoint that would need code
    execution to load raises ``UnsafeCheckpoint`` (see the module docstring).
    """
    directory = Path(directory)
    state_file = directory / TRAIN_STATE_FILE
    if not state_file.is_file() or not (directory / DCP_DIR / ".metadata").is_file():
        raise FileNotFoundError(
            f"{directory} is not a complete checkpoint (needs {TRAIN_STATE_FILE} and {DCP_DIR}/.metadata)"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    # The metadata is checked here first so a refusal surfaces as itself, not inside DCP's per-rank report.
    SafeFileSystemReader(str(directory / DCP_DIR)).read_metadata()
    try:
        dcp.load(target, storage_reader=SafeFileSystemReader(str(directory / DCP_DIR)), planner=SafeLoadPlanner())
    except CheckpointException as err:
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, UnsafeCheckpoint)]
        if refused:
            raise UnsafeCheckpoint(f"{directory}: {refused[0]}") from None
        raise
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    return TrainState.from_dict(json.loads(state_file.read_text()))


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model weights on CPU (on rank 0; other ranks get an empty dict)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


class IncompleteCheckpointDownload(OSError):
    """A checkpoint's files are missing after Ray's per-node download: a consequence of a storage error
    raised on another rank, which ``job.failure_summary`` reports instead."""


def retention(keep: int) -> Any:
    """``RunConfig(checkpoint_config=...)`` for the driver: Ray keeps the latest ``keep`` checkpoints in
    storage and deletes older ones once a newer one is registered (never a partial one)."""
    import ray.train

    return ray.train.CheckpointConfig(num_to_keep=keep)


class CheckpointManager:
    """The worker side of checkpointing: when to write one (``due``), writing it through
    ``ray.train.report`` (``report``) and resuming from the latest (``restore``). How many are kept is
    decided with it, by ``retention`` on the driver.

    Cadence: a checkpoint at the end of every epoch, and every ``every_steps`` optimiser steps inside
    one when set (mid-epoch checkpoints carry the position in the epoch, so a restart loses at most
    ``every_steps`` steps). ``ray.train.report`` is a barrier: every rank calls ``report`` together.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, every_steps: int = 0) -> None:
        self.model, self.optimizer, self.every_steps = model, optimizer, every_steps

    def due(self, step: int) -> bool:
        """Whether optimiser step ``step`` (just taken) ends with a mid-epoch checkpoint."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def restore(self, world_size: int) -> TrainState | None:
        """Collective: loads the latest checkpoint of this job into the model and optimiser (any world
        size); None when the job starts fresh."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            try:
                state = load_checkpoint(directory, self.model, self.optimizer)
            except FileNotFoundError as err:
                # Ray downloads a remote checkpoint once per node into a shared folder; when that download
                # fails, the rank that ran it raises the storage error and the others find the folder
                # incomplete. Registered checkpoints in storage are complete, so say what happened.
                storage = getattr(checkpoint.filesystem, "type_name", "remote").upper()
                raise IncompleteCheckpointDownload(
                    f"checkpoint {checkpoint.path} arrived incomplete on this node: its download from {storage} "
                    f"storage failed (the storage error is on the rank that downloaded it): {err}") from None
        log.info("rank %d resumed at epoch %d, step %d, sample %d of the epoch (checkpoint written by %d workers)",
                 _rank(), state.epoch, state.step, state.samples_in_epoch, state.world_size)
        state.world_size = world_size
        return state

    def report(self, metrics: dict[str, float], state: TrainState, with_checkpoint: bool) -> None:
        """``ray.train.report`` on every rank (a barrier), with a DCP checkpoint of this rank's shards."""
        import ray.train

        metrics = {**metrics, "epoch": state.epoch, "step": state.step}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="mvit-ckpt-") as tmp:
            save_checkpoint(tmp, self.model, self.optimizer, state)
            name = f"checkpoint_epoch{state.epoch:04d}_step{state.step:08d}"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
