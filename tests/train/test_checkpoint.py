"""DCP checkpoints: written by 2 FSDP ranks, restored on 1 (resharding) with model and optimiser state."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
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
        # the whole optimiser state, gathered to full tensors keyed by parameter name (a collective)
        optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        if rank == 0:
            torch.save({"model": full, "optim": optim}, out)
    finally:
        dist.destroy_process_group()


def test_checkpoint_from_two_fsdp_ranks_restores_on_one_process(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "full.pt"
    mp.spawn(_writer, args=(str(tmp_path / "init"), str(ckpt), str(out)), nprocs=WORLD, join=True)
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert json.loads((ckpt / "train_state.json").read_text())["mlflow_run_id"] == "abc"

    saved = torch.load(out, weights_only=True)
    expected = saved["model"]
    model = MViT(tiny_config(2))
    optimizer = build_optimizer(model, OptimConfig(), global_batch_size=4)
    state = load_checkpoint(ckpt, model, optimizer)
    assert state == TrainState(epoch=1, step=2, samples_in_epoch=8, mlflow_run_id="abc", world_size=WORLD)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    # The optimiser came back whole: every parameter's step and both Adam moments, value for value (a
    # restore that left the moments at zero would still have the right entries and steps), and the
    # hyper-parameters of every group.
    restored = get_optimizer_state_dict(model, optimizer)
    want = saved["optim"]
    assert restored["state"].keys() == want["state"].keys() == dict(model.named_parameters()).keys()
    for name, entry in want["state"].items():
        assert entry.keys() == restored["state"][name].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        for key, value in entry.items():
            torch.testing.assert_close(restored["state"][name][key], value, rtol=0, atol=0, msg=f"{name} {key}")
        assert int(entry["step"]) == 2, name
    moving = [name for name, entry in want["state"].items() if entry["exp_avg_sq"].abs().sum() > 0]
    assert len(moving) > len(want["state"]) // 2, "the compared moments are mostly non-zero (a real comparison)"
    assert len(restored["param_groups"]) == len(want["param_groups"])
    for got_group, want_group in zip(restored["param_groups"], want["param_groups"]):
        assert got_group == want_group


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "dcp").mkdir()
    model = MViT(tiny_config(1))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path, model, build_optimizer(model, OptimConfig(), 4))
