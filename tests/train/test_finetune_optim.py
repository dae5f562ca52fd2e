"""Fine-tuning knobs of the optimiser: layer-wise LR decay groups and frozen blocks (``pipeline.trainer.optim``),
on a tiny model with real AdamW steps."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models.mvit import MViT
from pipeline.trainer.config import OptimConfig
from pipeline.trainer.optim import LRSchedule, build_optimizer, layer_of
from tests.models.helpers import tiny_config

DEPTH = 4  # tiny_config's blocks
BATCH = 4


def _setup(**optim: float) -> tuple[MViT, torch.optim.Optimizer, LRSchedule]:
    torch.manual_seed(0)
    model = MViT(tiny_config(1))
    cfg = OptimConfig(lr=1e-2, reference_batch_size=BATCH, min_lr=1e-4, warmup_epochs=0, **optim)
    optimizer = build_optimizer(model, cfg, BATCH)
    return model, optimizer, LRSchedule(optimizer, cfg, BATCH, epochs=4)


def _names(model: MViT, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_layer_decay_scales_each_depth_and_keeps_the_weight_decay_rules() -> None:
    model, optimizer, schedule = _setup(layer_decay=0.5)
    assert [layer_of(n, DEPTH) for n in ("patch_embed.proj.weight", "cls_token", "pos_embed_spatial",
                                         "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "norm.weight",
                                         "head.projection.weight")] == [0, 0, 0, 1, 4, 5, 5]
    # a sharded or compiled model's names carry wrappers: the same layers
    assert layer_of("blocks.2._orig_mod._checkpoint_wrapped_module.attn.qkv.weight", DEPTH) == 3
    seen: list[str] = []
    for group in optimizer.param_groups:
        names = _names(model, group)
        seen += names
        assert {layer_of(n, DEPTH) for n in names} == {group["layer"]}
        assert group["lr_scale"] == 0.5 ** (DEPTH + 1 - group["layer"])
        decayed = {n for n in names if not (n.endswith(".bias") or "norm" in n or n in model.no_weight_decay())}
        assert decayed == (names if group["weight_decay"] == 0.05 else set()), names
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())  # every parameter once
    lr = schedule.set(1.0, epoch=1)
    assert {g["layer"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {layer: lr * 0.5 ** (DEPTH + 1 - layer) for layer in range(DEPTH + 2)})
    assert schedule.current() == lr


def test_without_the_knobs_the_two_groups_of_before_stay() -> None:
    _, optimizer, schedule = _setup()
    assert len(optimizer.param_groups) == 2 and "layer" not in optimizer.param_groups[0]
    lr = schedule.set(2.0, epoch=2)
    assert all(g["lr"] == lr for g in optimizer.param_groups)


def _train(model: MViT, optimizer: torch.optim.Optimizer, schedule: LRSchedule, epoch: int, steps: range) -> None:
    """AdamW steps on fixed random batches (one per step index), as the trainer takes them."""
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(2, 3, 4, 32, 32, generator=generator)
        y = torch.randint(0, 7, (2,), generator=generator)
        schedule.set(epoch + (step % 3 + 1) / 3, epoch)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_frozen_blocks_take_no_update_for_their_epochs_and_resume_exactly() -> None:
    model, optimizer, schedule = _setup(freeze_blocks=2, freeze_epochs=1)
    before = copy.deepcopy(model.state_dict())
    _train(model, optimizer, schedule, epoch=0, steps=range(0, 3))
    frozen = {n for n in before if layer_of(n, DEPTH) <= 2}  # embedding, blocks 0 and 1
    assert {n for n in before if torch.equal(before[n], model.state_dict()[n])} == frozen
    after_epoch0 = copy.deepcopy(model.state_dict())
    _train(model, optimizer, schedule, epoch=1, steps=range(3, 4))  # freeze_epochs over: everything moves
    assert not any(torch.equal(after_epoch0[n], model.state_dict()[n]) for n in frozen if "pool_" not in n)

    # Interrupted after step 1 of epoch 0 and resumed from the saved model and optimiser (as from a
    # checkpoint): the same weights, bit for bit, at the end of epoch 1.
    first, opt1, sched1 = _setup(freeze_blocks=2, freeze_epochs=1)
    _train(first, opt1, sched1, epoch=0, steps=range(0, 2))
    saved = copy.deepcopy((first.state_dict(), opt1.state_dict()))
    resumed, opt2, sched2 = _setup(freeze_blocks=2, freeze_epochs=1)
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    _train(resumed, opt2, sched2, epoch=0, steps=range(2, 3))
    _train(resumed, opt2, sched2, epoch=1, steps=range(3, 4))
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in model.state_dict().items())


def test_bad_fine_tuning_settings_are_refused_with_the_key() -> None:
    for override, key in [("optim.layer_decay=0", "optim.layer_decay"), ("optim.layer_decay=1.5", "optim.layer_decay"),
                          ("optim.freeze_blocks=-1", "optim.freeze_blocks"), ("optim.freeze_blocks=5", "optim.freeze_blocks"),
                          ("model.init_head=maybe", "model.init_head")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            load_config("configs/experiment/demo.yaml", [override])
        assert "\n" not in str(err.value), override
