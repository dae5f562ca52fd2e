"""DCP checkpoints: written by 2 FSDP ranks, restored on 1 (resharding) with model and optimiser state."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from pipeline.models.mvit import MViT
from pipeline.trainer.checkpoint import TrainState, full_model_state, load_checkpoint, save_checkpoint
from pipeline.trainer.optim import OptimConfig, build_optimizer
from pipeline.trainer.parallelize import apply_fsdp
from tests.models.helpers import tiny_config

WORLD = 2


def _train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: int) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        clips, labels = torch.randn(2, 3, 4, 32, 32, generator=g), torch.randint(0, 7, (2,), generator=g)
        torch.nn.functional.cross_entropy(model(clips), labels).backward()
        optimizer.step()
        optimizer.zero_grad()


def _writer(rank: int, init_file: str, ckpt: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = apply_fsdp(MViT(tiny_config(2)), init_device_mesh("cpu", (WORLD,)))
        optimizer = build_optimizer(model, OptimConfig(), global_batch_size=4)
        _train_steps(model, optimizer, rank, steps=2)
        save_checkpoint(ckpt, model, optimizer, TrainState(epoch=1, step=2, samples_in_epoch=8,
                                                           mlflow_run_id="abc", world_size=WORLD))
        full = full_model_state(model)
        if rank == 0:
            torch.save(full, out)
    finally:
        dist.destroy_process_group()


def test_checkpoint_from_two_fsdp_ranks_restores_on_one_process(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "full.pt"
    mp.spawn(_writer, args=(str(tmp_path / "init"), str(ckpt), str(out)), nprocs=WORLD, join=True)
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert json.loads((ckpt / "train_state.json").read_text())["mlflow_run_id"] == "abc"

    expected = torch.load(out, weights_only=True)
    model = MViT(tiny_config(2))
    optimizer = build_optimizer(model, OptimConfig(), global_batch_size=4)
    state = load_checkpoint(ckpt, model, optimizer)
    assert state == TrainState(epoch=1, step=2, samples_in_epoch=8, mlflow_run_id="abc", world_size=WORLD)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    # the Adam moments came back too: a restored optimiser has state for every parameter
    assert len(optimizer.state) == len(list(model.parameters()))
    assert all(int(s["step"]) == 2 for s in optimizer.state.values())


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "dcp").mkdir()
    model = MViT(tiny_config(1))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path, model, build_optimizer(model, OptimConfig(), 4))
