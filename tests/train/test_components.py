"""Optimiser groups, LR schedule, evaluation metrics, secret redaction and the epoch accounting checks."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.mvit import MViT
from core.redact import REDACTED, redact_mapping
from pipeline.tracking import flatten
from pipeline.trainer.evaluate import VideoAccumulator, topk_correct
from pipeline.trainer.optim import LRSchedule, OptimConfig, WarmupCosine, build_optimizer, param_groups, scaled_lr
from tests.models.helpers import tiny_config


def test_no_weight_decay_on_norms_biases_embeddings_and_cls():
    model = MViT(tiny_config(1))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"} <= no_decay_names
    assert all(n.endswith(".bias") or "norm" in n or n in model.no_weight_decay() for n in no_decay_names)
    assert "blocks.0.attn.qkv.weight" in decay_names and "blocks.0.attn.pool_k.weight" in decay_names
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_lr_scales_with_global_batch_and_follows_warmup_cosine():
    cfg = OptimConfig(lr=1.6e-3, reference_batch_size=512, min_lr=1.6e-5, warmup_epochs=2)
    assert scaled_lr(cfg, 64) == pytest.approx(2e-4)
    curve = WarmupCosine(epochs=10, warmup_epochs=2, min_ratio=0.01)
    assert curve(1.0) == pytest.approx(0.5)
    assert curve(2.0) == pytest.approx(1.0)
    assert curve(6.0) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert curve(10.0) == pytest.approx(0.01)
    optimizer = build_optimizer(MViT(tiny_config(1)), cfg, 64)
    schedule = LRSchedule(optimizer, cfg, 64, epochs=10)
    assert schedule.set(2.0) == pytest.approx(2e-4)
    assert all(g["lr"] == pytest.approx(2e-4) for g in optimizer.param_groups)


def test_sgd_with_momentum_and_a_warmup_from_a_set_lr_the_ssv2_recipe():
    # PySlowFast's SSv2 recipe: SGD momentum 0.9, wd 1e-4 (none on 1-D parameters), lr 0.0025 per 16 clips,
    # warmup 3 epochs from 1e-4, cosine to 1e-6 at epoch 100
    cfg = OptimConfig(name="sgd", lr=0.0025, reference_batch_size=16, momentum=0.9, weight_decay=1e-4,
                      warmup_epochs=3, warmup_start_lr=1e-4, min_lr=1e-6)  # fmt: skip
    model = MViT(tiny_config(1))
    optimizer = build_optimizer(model, cfg, 32)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and not g["nesterov"] and g["dampening"] == 0 for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    schedule = LRSchedule(optimizer, cfg, 32, epochs=100)
    assert schedule.set(0.0) == pytest.approx(2e-4)  # 1e-4 at the reference batch, x2 for a global batch of 32
    assert schedule.set(1.5) == pytest.approx(2 * (1e-4 + (0.0025 - 1e-4) * 0.5))
    assert schedule.set(3.0) == pytest.approx(0.005)
    assert schedule.set(100.0) == pytest.approx(2e-6)
    # the default warmup (no warmup_start_lr) is unchanged: from 1/1000 of the peak
    assert LRSchedule(optimizer, OptimConfig(name="sgd", warmup_epochs=3), 512, epochs=100).set(0.0) == \
        pytest.approx(1.6e-6)
    # a step moves the weights as torch's SGD with momentum does
    weight = model.head.projection.weight  # in the decayed group
    before = weight.detach().clone()
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    assert torch.allclose(weight.detach(), before - lr * (1 + 1e-4 * before), atol=1e-9)


def test_optim_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_lr"):
        OptimConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="reference_batch_size"):
        OptimConfig(reference_batch_size=0)
    with pytest.raises(ValueError, match="optim.name"):
        OptimConfig(name="lamb")
    with pytest.raises(ValueError, match="optim.warmup_start_lr"):
        OptimConfig(lr=1e-3, warmup_start_lr=1e-2)
    with pytest.raises(ValueError, match="optim.momentum"):
        OptimConfig(momentum=1.0)


def test_topk_and_video_level_accuracy_average_views():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]])
    assert topk_correct(logits, torch.tensor([0, 2, 1]), ks=(1, 2)) == {1: 1, 2: 2}

    acc = VideoAccumulator()
    # video "a" (label 0): one view wrong, two confidently right -> video-level right
    acc.add(torch.tensor([[0.0, 1.0], [5.0, 0.0]]), torch.tensor([0, 0]), ["a", "a"])
    other = VideoAccumulator()
    other.add(torch.tensor([[4.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1]), ["a", "b"])
    acc.merge(other)  # views of one video split across ranks
    metrics = acc.metrics()
    assert metrics["videos"] == 2 and metrics["views"] == 4
    assert metrics["view_top1"] == pytest.approx(75.0)
    assert metrics["video_top1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="different labels"):
        acc.add(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), ["a"])


def test_redaction_removes_secret_keys_uri_passwords_and_planted_env_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "planted-token-83741")
    config = {
        "tracking": {"tracking_uri": "postgresql://mlflow:hunter22@db:5432/mlflow"},
        "storage": {"aws_secret_access_key": "abc", "path": "s3://bucket/x?sig=planted-token-83741"},
        "name": "run",
        "list": ["planted-token-83741", 3],
    }
    flat = flatten(redact_mapping(config))
    text = repr(flat)
    assert "hunter22" not in text and "planted-token-83741" not in text and "abc" not in text
    assert flat["tracking.tracking_uri"] == f"postgresql://mlflow:{REDACTED}@db:5432/mlflow"
    assert flat["storage.aws_secret_access_key"] == REDACTED
    assert flat["name"] == "run"


def test_failure_summary_names_the_root_cause_not_the_collateral_collective_error() -> None:
    from ray.train import ControllerError, WorkerGroupError

    from pipeline.config import load_config
    from pipeline.trainer.job import failure_summary

    cfg = load_config("configs/experiment/demo.yaml", ["trainer.max_failures=1"])
    workers = WorkerGroupError("...", {
        0: RuntimeError("Traceback (most recent call last):\n  File \"loop.py\", line 1\nRuntimeError: [gloo/pair.cc:534] "
                        "Connection closed by peer [127.0.0.1]:4242"),
        1: OSError("Traceback (most recent call last):\nIncompleteCheckpointDownload: checkpoint s3://b/c arrived "
                   "incomplete on this node"),
        2: OSError("Traceback (most recent call last):\n  File \"x.py\"\n    upload()\nOSError: When uploading key "
                   "'runs/demo/x': AWS Error NETWORK_CONNECTION"),
    })  # fmt: skip
    summary = failure_summary(cfg, workers)
    assert "\n" not in summary and "trainer.max_failures=1" in summary
    assert summary.endswith("rank 2: OSError: When uploading key 'runs/demo/x': AWS Error NETWORK_CONNECTION")
    controller = failure_summary(cfg, ControllerError(OSError("When writing snapshot: AWS Error SLOW_DOWN")))
    assert controller.endswith("controller: OSError: When writing snapshot: AWS Error SLOW_DOWN")
    only_collateral = WorkerGroupError("...", {0: RuntimeError("RuntimeError: gloo: Connection reset by peer")})
    assert failure_summary(cfg, only_collateral).endswith("rank 0: RuntimeError: gloo: Connection reset by peer")


def test_epoch_identity_check_catches_a_duplicate_that_hides_a_loss() -> None:
    from pipeline.data.loader import EpochStats
    from pipeline.trainer.validation import check_epoch_counts, check_epoch_identity
    from core.manifest import keys_digest

    split = keys_digest(["a", "b", "c", "d"])
    exact = EpochStats(3, 0, 4, samples=3, failed=1, fingerprint=split, expected_digest=split)
    check_epoch_counts(exact, "epoch 3")
    assert check_epoch_identity(exact, "epoch 3") is True

    # "a" delivered twice, "b" never: the counts add up, only the identity check sees it.
    swapped = EpochStats(3, 0, 4, samples=4, fingerprint=keys_digest(["a", "a", "c", "d"]), expected_digest=split)
    check_epoch_counts(swapped, "epoch 3")
    with pytest.raises(RuntimeError, match=r"^epoch 3: the samples delivered are not the split's samples \(a sample "
                                           r"was duplicated or lost\)"):  # fmt: skip
        check_epoch_identity(swapped, "epoch 3")
    with pytest.raises(RuntimeError, match="data was lost"):
        check_epoch_counts(EpochStats(3, 0, 4, samples=3), "epoch 3")

    # Cases where the comparison cannot be made: not run (metric 0), not failed.
    unknown = [
        EpochStats(3, 2, 2, samples=2, fingerprint=keys_digest(["c", "d"]), expected_digest=None),  # resumed
        EpochStats(3, 2, 2, samples=2, fingerprint=keys_digest(["c", "d"]), expected_digest=split),  # resumed
        EpochStats(3, 0, 4, samples=4, fingerprint=keys_digest(["a", "b", "c", "d"])),  # older manifest
        EpochStats(3, 0, 4, samples=3, failed=1, unkeyed=1, fingerprint=keys_digest(["a", "b", "c"]),
                   expected_digest=split),  # a shard broke off: the missing sample's key is unknown
    ]  # fmt: skip
    assert [check_epoch_identity(stats, "epoch 3") for stats in unknown] == [False] * 4


def test_epoch_line_carries_every_figure_and_mlflow_gets_the_timing() -> None:
    from pipeline.trainer.progress import EpochProgress, Meter, format_epoch_line

    meter = Meter(loss=12.0, rows=8.0, wait=1.0, busy=3.0, blocked=0.4)  # rank-averaged sums of one epoch
    figures = meter.metrics("train/epoch_", world_size=2, lr=None)
    assert figures == {"train/epoch_loss": 1.5, "train/epoch_clips_per_s": 4.0, "train/epoch_data_wait_fraction": 0.25,
                       "train/epoch_data_blocked_fraction": 0.1}
    line = format_epoch_line(3, 10, {**figures, "val/video_top1": 87.5, "val/video_top5": 100.0}, 7.52e-4,
                             elapsed=82.0, eta=123.0)
    assert line == ("epoch 4/10 | loss 1.5000 | lr 7.52e-04 | 4.0 clips/s | data wait 25% | "
                    "val top-1 87.5% top-5 100.0% | elapsed 1:22, ETA 2:03")
    assert "val top-1" not in format_epoch_line(0, 10, figures, 1e-3, 1.0, 9.0)  # an epoch without evaluation

    progress = EpochProgress(epochs=10, enabled=False)
    progress.start(first_epoch=4)  # a job resumed at epoch 4: its ETA counts from the resume
    progress.started -= 30.0  # two epochs of 15 s
    timing = progress.epoch_done(5, figures, 1e-3)
    assert timing["time/elapsed_s"] == pytest.approx(30.0, abs=1.0)
    assert timing["time/eta_s"] == pytest.approx(15.0 * 4, abs=2.0)


def test_checkpoint_cadence_is_every_n_steps_or_only_epoch_ends() -> None:
    from pipeline.trainer.checkpoint import CheckpointManager

    every_3 = CheckpointManager(torch.nn.Linear(1, 1), None, every_steps=3)  # type: ignore[arg-type]
    assert [s for s in range(1, 10) if every_3.due(s)] == [3, 6, 9]
    assert not any(CheckpointManager(torch.nn.Linear(1, 1), None).due(s) for s in range(1, 10))  # type: ignore[arg-type]


def test_preemption_cadence_follows_the_ranks_step_time_or_a_fixed_count() -> None:
    """Null (the default): every step until a step time is known, then about every
    ``preemption_check_every_s`` seconds counted from the last check; a count: every N steps; 0: never."""
    from pipeline.trainer.config import TrainerConfig
    from pipeline.trainer.preemption import PreemptionCadence

    cfg = TrainerConfig()
    assert (cfg.preemption_check_every_steps, cfg.preemption_check_every_s) == (None, 2.0)
    auto = PreemptionCadence(None, 2.0)
    assert [s for s in range(1, 5) if auto.due(s)] == [1, 2, 3, 4]
    auto.observe(0.25)  # 8 steps in 2 s: the next check 8 steps after the last (step 4)
    assert [s for s in range(5, 30) if auto.due(s)] == [12, 20, 28]
    auto.observe(0.7)  # slower steps: every 2
    assert [s for s in range(30, 37) if auto.due(s)] == [30, 32, 34, 36]
    auto.observe(5.0)  # a step longer than the interval: every step
    assert [s for s in range(37, 40) if auto.due(s)] == [37, 38, 39]
    auto.observe(0.0)  # no time measured (an empty window): the cadence stays
    assert [s for s in range(40, 42) if auto.due(s)] == [40, 41]

    fixed = PreemptionCadence(3, 2.0)
    fixed.observe(0.01)  # a fixed count ignores the step time
    assert [s for s in range(1, 10) if fixed.due(s)] == [3, 6, 9]
    assert not any(PreemptionCadence(0, 2.0).due(s) for s in range(1, 10))


def test_preemption_cadence_settings_are_checked() -> None:
    from pipeline.config import ConfigError
    from pipeline.trainer.config import TrainerConfig

    with pytest.raises(ConfigError, match="trainer.preemption_check_every_steps must be >= 0"):
        TrainerConfig(preemption_check_every_steps=-1)
    with pytest.raises(ConfigError, match="trainer.preemption_check_every_s must be > 0"):
        TrainerConfig(preemption_check_every_s=0.0)
