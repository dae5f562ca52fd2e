"""The function every Ray Train worker of an evaluation job runs (``pipeline.evaluate`` is its driver).

It builds the network, loads the weights the driver resolved, parallelizes it as a training job does
(same precision, FSDP2 over the workers) and runs the training job's own validation pass
(``validation.run_validation``) over the split: the numbers are the ones the job would have reported
for these weights. Rank 0 hands the merged result to the driver through the results queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.data.loader import ShardLoader
from pipeline.models.mvit import MViT
from pipeline.trainer.evaluate import video_report
from pipeline.trainer.loop import quiet_worker_logs
from pipeline.trainer.setup import WorkerContext, prepare_model
from pipeline.trainer.spec import EvalSpec
from pipeline.trainer.validation import check_epoch_counts, check_epoch_identity, run_validation

DATASET = "val"  # the name the driver gives the evaluated split in TorchTrainer(datasets=...)


@dataclass
class EvalOutcome:
    """What rank 0 sends back: the metrics (``val/...`` keys, as a training job logs them), the per-class
    and per-video report (``evaluate.video_report``) and the data accounting of the pass."""

    metrics: dict[str, float]
    report: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1


def evaluate_per_worker(config: dict[str, Any]) -> None:
    """The ``TorchTrainer`` entry point: ``config = {"spec": EvalSpec}``."""
    quiet_worker_logs()
    spec: EvalSpec = config["spec"]
    cfg = spec.config()
    ctx = WorkerContext.current()
    import ray

    model = MViT(spec.model_config)
    model.load_state_dict(ray.get(spec.weights))  # strict: the driver fitted them to this network
    model = prepare_model(model, ctx, cfg.trainer.precision, cfg.trainer.activation_checkpointing,
                          cfg.trainer.compile)
    loader = ShardLoader.for_train_worker(DATASET, ctx.device, cfg.data.prefetch_batches)
    mean, std = cfg.data.augment.mean, cfg.data.augment.std
    shape = (1,) + spec.model_config.input_shape
    result = run_validation(model, loader, ctx, mean, std, 0, lambda: torch.zeros(shape, device=ctx.device))
    what = f"evaluation of split {spec.split!r}"
    check_epoch_counts(result.stats, what)
    identity = check_epoch_identity(result.stats, what)
    if ctx.is_main:
        data = {"samples": result.stats.samples, "failed": result.stats.failed, "expected": result.stats.expected,
                "views": result.stats.views, "identity_checked": identity,
                "failures": [list(f) for f in result.stats.failures]}
        spec.results.put(EvalOutcome(result.metrics(identity), video_report(result.accumulator, spec.classes),
                                     data, ctx.world_size))
