"""One pass of a model over an evaluation split, and the checks that an epoch's data is whole.

A training job validates with ``run_validation`` after its epochs, and the evaluation command
(``pipeline.evaluate``) runs the very same function over the same data service, so evaluating a job's
final model reproduces the job's last validation exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.data.device import normalize
from pipeline.data.loader import EpochStats, ShardLoader
from pipeline.trainer.evaluate import VideoAccumulator
from pipeline.trainer.setup import WorkerContext


def gather_object(obj: Any, ctx: WorkerContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (just ``[obj]`` in a single process)."""
    if not (dist.is_initialized() and ctx.world_size > 1):
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def check_epoch_counts(stats: EpochStats, what: str) -> None:
    """Raise unless every sample of the (merged) epoch was delivered or counted as failed."""
    if not stats.complete:
        raise RuntimeError(f"{what}: {stats.samples} samples + {stats.failed} failed "
                           f"!= {stats.expected} expected: data was lost")


def check_epoch_identity(stats: EpochStats, what: str) -> bool:
    """Whether the (merged) epoch's key fingerprint was compared with the manifest's digest of the split;
    raises if it was and they differ. Counts alone miss a sample delivered twice while another is lost.

    False when the comparison cannot be made: a resumed epoch (``start > 0``: which samples came before
    the resume position depends on the shuffle, so the digest of the rest is unknown and the samples
    before the checkpoint were checked by no one), a manifest without key digests, or failed samples
    whose keys are unknown (a shard that broke off). Counts are still checked then.
    """
    if not stats.identity_checkable:
        return False
    if stats.fingerprint != stats.expected_digest:
        raise RuntimeError(
            f"{what}: the samples delivered are not the split's samples (a sample was duplicated or lost): "
            f"key fingerprint {stats.fingerprint:016x} != manifest digest {stats.expected_digest:016x} "
            f"over {stats.samples} delivered + {stats.failed} failed of {stats.expected} expected"
        )
    return True


@dataclass
class ValidationPass:
    """What one pass gave, merged over ranks (the same on every rank)."""

    accumulator: VideoAccumulator
    stats: EpochStats

    def metrics(self, identity_checked: bool) -> dict[str, float]:
        metrics = {f"val/{k}": v for k, v in self.accumulator.metrics().items()}
        metrics.update({f"val/{k}": v for k, v in self.stats.as_metrics(prefix="data_").items()})
        metrics["val/data_identity_checked"] = float(identity_checked)
        return metrics


def run_validation(model: torch.nn.Module, loader: ShardLoader, ctx: WorkerContext, mean: list[float],
                   std: list[float], epoch: int, placeholder: Callable[[], torch.Tensor]) -> ValidationPass:
    """Collective: ``model`` (eval mode, no gradients) over ``loader``'s pass ``epoch``; per-view softmax
    summed per video, then merged over ranks. An empty batch still runs ``placeholder()`` through the model:
    FSDP2 all-gathers on every rank, so every rank must take every forward."""
    model.eval()
    acc = VideoAccumulator()
    with torch.no_grad():
        for batch in loader.epoch(epoch, 0):
            x = normalize(batch["video"], mean, std)
            if x.shape[0] == 0:
                model(placeholder())
                continue
            acc.add(model(x), batch["label"], batch["video_id"])
    stats = EpochStats.merge(gather_object(loader.stats, ctx))
    parts = gather_object(acc, ctx)
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    return ValidationPass(merged, stats)
