"""The model trains under FSDP2 with one fully_shard unit per block (2 CPU ranks, gloo), also with the
whole ``parallelize()`` composition: activation checkpointing, then torch.compile, then FSDP2."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from pipeline.models.mvit import MViT
from pipeline.trainer.parallelize import ParallelSettings, apply_fsdp, parallelize
from tests.models.helpers import tiny_config

WORLD = 2


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(4, 3, 4, 32, 32, generator=g), torch.randint(0, 7, (4,), generator=g)


def _step(model: torch.nn.Module, clips: torch.Tensor, labels: torch.Tensor) -> float:
    optim = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(clips), labels)
    loss.backward()
    optim.step()
    return loss.item()


def _worker(rank: int, init_file: str, version: int, out_dir: str, composed: bool = False) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = MViT(tiny_config(version, **(_COMPOSED if composed else {})))
        mesh = init_device_mesh("cpu", (WORLD,))
        if composed:
            parallelize(model, mesh, ParallelSettings(activation_checkpointing=True, compile=True))
            assert model.grad_checkpointing
            assert all(b._compiled_call_impl is not None for b in model.blocks)  # noqa: SLF001 - compiled in place
        else:
            apply_fsdp(model, mesh)
        assert all(isinstance(b, FSDPModule) for b in model.blocks) and isinstance(model, FSDPModule)
        clips, labels = _data()
        half = clips.shape[0] // WORLD
        loss = _step(model, clips[rank * half:(rank + 1) * half], labels[rank * half:(rank + 1) * half])
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save({"state": full, "loss": loss}, os.path.join(out_dir, "fsdp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("version", [1, 2])
def test_two_rank_fsdp_step_equals_single_process_step(tmp_path, version):
    mp.spawn(_worker, args=(str(tmp_path / "init"), version, str(tmp_path)), nprocs=WORLD, join=True)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)

    torch.manual_seed(0)
    reference = MViT(tiny_config(version))
    clips, labels = _data()
    _step(reference, clips, labels)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(sharded["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)


# Two blocks (one stage change) keep the cold compile short, as in tests/models/test_model.py.
_COMPOSED = dict(depth=2, stage_starts=(1,))


@pytest.mark.slow
def test_parallelize_composes_checkpointing_compile_and_fsdp_into_the_single_process_step(tmp_path):
    """AC + per-block torch.compile + FSDP2 over 2 ranks: one step lands on the weights of one eager,
    unsharded process (compiled kernels round differently: the compile test's tolerance)."""
    mp.spawn(_worker, args=(str(tmp_path / "init"), 2, str(tmp_path), True), nprocs=WORLD, join=True)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)

    torch.manual_seed(0)
    reference = MViT(tiny_config(2, **_COMPOSED))
    clips, labels = _data()
    _step(reference, clips, labels)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(sharded["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
