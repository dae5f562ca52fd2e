"""The function every Ray Train worker runs: it composes the components and reads as the recipe.

    model      pipeline.train.setup      MViT -> device -> FSDP2 per block (+ AC, compile)
    optimiser  pipeline.train.optim      AdamW groups, LR from the epoch position, scaled by global batch
    data       pipeline.data             ShardLoader batches (uint8) -> normalise, mix on the device
    state      pipeline.train.checkpoint DCP checkpoints through ray.train.report; resume incl. data position
    tracking   pipeline.tracking         MLflow on rank 0, one run per job across restarts
    metrics    pipeline.train.evaluate   view- and video-level top-1/top-5

Reproducibility: every source of randomness is a function of (seed, position): the data service seeds
per sample and view, mixing per batch, and the torch RNG (stochastic depth, dropout) is reseeded per
optimiser micro-step from (seed, step, rank). A job resumed from a checkpoint therefore continues on
exactly the path the uninterrupted job would have taken.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import ExperimentConfig, build_model_config, from_container
from pipeline.data.device import mix_batch, normalize, soft_cross_entropy
from pipeline.data.loader import EpochStats, ShardLoader
from pipeline.data.plan import stable_hash
from pipeline.models.mvit import MViT
from pipeline.tracking import Tracker
from pipeline.train.checkpoint import TrainState, full_model_state, load_checkpoint, save_checkpoint
from pipeline.train.evaluate import VideoAccumulator
from pipeline.train.export import copy_to_storage, export_model
from pipeline.train.optim import LRSchedule, build_optimizer
from pipeline.train.setup import WorkerContext, prepare_model

log = logging.getLogger(__name__)


def _all_reduce_mean(values: list[float], ctx: WorkerContext) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    if dist.is_initialized() and ctx.world_size > 1:
        dist.all_reduce(t)
        t /= ctx.world_size
    return t.tolist()


def _gather(obj: Any, ctx: WorkerContext) -> list[Any]:
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


class IncompleteCheckpointDownload(OSError):
    """A checkpoint's files are missing after Ray's per-node download: a consequence of a storage error
    raised on another rank, which ``job.failure_summary`` reports instead."""


class Trainer:
    """State and steps of one worker's training run (constructed inside the Ray Train worker)."""

    def __init__(self, cfg: ExperimentConfig, job: dict[str, Any]) -> None:
        self.cfg, self.job = cfg, job
        self.ctx = WorkerContext.current()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank, before sharding
        self.model_cfg = build_model_config(cfg.model)
        self.model = prepare_model(MViT(self.model_cfg), self.ctx, cfg.trainer.precision,
                                   cfg.trainer.activation_checkpointing, cfg.trainer.compile)
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.global_batch_size)
        self.schedule = LRSchedule(self.optimizer, cfg.optim, cfg.global_batch_size, cfg.trainer.epochs)
        self.state = TrainState(world_size=self.ctx.world_size)
        self.train_data = ShardLoader.for_train_worker("train", self.ctx.device, cfg.data.prefetch_batches)
        self.val_data = ShardLoader.for_train_worker("val", self.ctx.device, cfg.data.prefetch_batches)
        self.tracker = Tracker(cfg.tracking, job["tracking_uri"], enabled=self.ctx.is_main)
        self.mean, self.std = cfg.data.augment.mean, cfg.data.augment.std

    # -- state ---------------------------------------------------------------------------------
    def restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            try:
                self.state = load_checkpoint(directory, self.model, self.optimizer)
            except FileNotFoundError as err:
                # Ray downloads a remote checkpoint once per node into a shared folder; when that download
                # fails, the rank that ran it raises the storage error and the others find the folder
                # incomplete. Registered checkpoints in storage are complete, so say what happened.
                storage = getattr(checkpoint.filesystem, "type_name", "remote").upper()
                raise IncompleteCheckpointDownload(
                    f"checkpoint {checkpoint.path} arrived incomplete on this node: its download from {storage} "
                    f"storage failed (the storage error is on the rank that downloaded it): {err}") from None
        log.info("rank %d resumed at epoch %d, step %d, sample %d of the epoch (checkpoint written by %d workers)",
                 self.ctx.rank, self.state.epoch, self.state.step, self.state.samples_in_epoch, self.state.world_size)
        self.state.world_size = self.ctx.world_size

    def report(self, metrics: dict[str, float], with_checkpoint: bool) -> None:
        """``ray.train.report`` on every rank (a barrier); with a DCP checkpoint of this rank's shards."""
        import ray.train

        metrics = {**metrics, "epoch": self.state.epoch, "step": self.state.step}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="mvit-ckpt-") as tmp:
            save_checkpoint(tmp, self.model, self.optimizer, self.state)
            name = f"checkpoint_epoch{self.state.epoch:04d}_step{self.state.step:08d}"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

    # -- training --------------------------------------------------------------------------------
    def start_tracking(self) -> None:
        run_id = self.tracker.start(
            run_name=self.cfg.tracking.run_name or self.cfg.name,
            resume_run_id=self.state.mlflow_run_id,
            params=self.job["params"],
            tags={**self.job["tags"], "world_size": str(self.ctx.world_size)},
            job_key=self.job["job_key"],
        )
        if run_id is not None:
            self.state.mlflow_run_id = run_id
            for artifact_file, text in self.job.get("texts", {}).items():
                self.tracker.log_text(text, artifact_file)

    def _reseed(self, step: int, micro: int) -> None:
        torch.manual_seed(stable_hash("torch", self.cfg.seed, step, micro, self.ctx.rank) % 2**63)

    def _placeholder_clip(self) -> torch.Tensor:
        """One zero clip: an empty batch still has to run the forward (FSDP all-gathers on every rank)."""
        return torch.zeros((1,) + self.model_cfg.input_shape, device=self.ctx.device)

    def _forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        x = normalize(batch["video"], self.mean, self.std)
        rows = int(x.shape[0])
        if rows == 0:  # weight 0: the step only keeps the ranks' collectives in step
            return self.model(self._placeholder_clip()).sum() * 0.0, 0
        x, targets = mix_batch(x, batch["label"], self.model_cfg.num_classes, self.cfg.data.augment, batch["mix_seed"])
        return soft_cross_entropy(self.model(x), targets), rows

    def train_epoch(self, epoch: int) -> EpochStats:
        cfg = self.cfg.trainer
        start = self.state.samples_in_epoch if epoch == self.state.epoch else 0
        self.state.epoch, self.state.samples_in_epoch = epoch, start
        steps_in_epoch = self.train_data.batches_per_epoch(start)
        first_batch = self.train_data.layout(0).batches_per_worker - steps_in_epoch
        total_batches = self.train_data.batches_per_epoch(0)
        self.model.train()
        window = {"loss": 0.0, "rows": 0, "wait": 0.0, "busy": 0.0, "steps": 0}
        micro, clock = 0, time.perf_counter()
        batches: Iterator[dict[str, Any]] = self.train_data.epoch(epoch, start)
        for i, batch in enumerate(batches):
            arrived = time.perf_counter()
            window["wait"] += arrived - clock
            if cfg.max_steps_per_epoch and i >= cfg.max_steps_per_epoch * cfg.grad_accum_steps:
                clock = time.perf_counter()
                continue  # smoke runs: drain the epoch (equal counts everywhere) without stepping
            self._reseed(self.state.step, micro)
            loss, rows = self._forward_loss(batch)
            (loss / cfg.grad_accum_steps).backward()
            window["loss"] += loss.item() * rows
            window["rows"] += rows
            micro += 1
            if micro == cfg.grad_accum_steps:
                progress = epoch + (first_batch + i + 1) / max(total_batches, 1)
                lr = self.schedule.set(progress)
                if self.cfg.optim.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                micro = 0
                self.state.step += 1
                window["steps"] += 1
                self.state.samples_in_epoch = self.train_data.state()["position"]
                window["busy"] += time.perf_counter() - arrived
                if self.state.step % self.cfg.tracking.log_every_steps == 0:
                    self._log_window(window, lr)
                if cfg.checkpoint_every_steps and self.state.step % cfg.checkpoint_every_steps == 0:
                    self.report({}, with_checkpoint=True)
            else:
                window["busy"] += time.perf_counter() - arrived
            clock = time.perf_counter()
        return self.train_data.stats

    def _log_window(self, window: dict[str, float], lr: float) -> None:
        loss_sum, rows, wait, busy = _all_reduce_mean(
            [window["loss"], window["rows"], window["wait"], window["busy"]], self.ctx)
        elapsed = max(wait + busy, 1e-9)
        self.tracker.log_metrics({
            "train/loss": loss_sum / max(rows, 1),
            "train/lr": lr,
            "train/clips_per_s": rows * self.ctx.world_size / elapsed,
            "train/data_wait_fraction": wait / elapsed,
        }, step=self.state.step)
        for key in window:
            window[key] = 0.0

    def evaluate(self, epoch: int) -> dict[str, float]:
        self.model.eval()
        acc = VideoAccumulator()
        with torch.no_grad():
            for batch in self.val_data.epoch(epoch, 0):
                x = normalize(batch["video"], self.mean, self.std)
                if x.shape[0] == 0:
                    self.model(self._placeholder_clip())
                    continue
                acc.add(self.model(x), batch["label"], batch["video_id"])
        stats = EpochStats.merge(_gather(self.val_data.stats, self.ctx))
        check_epoch_counts(stats, f"validation after epoch {epoch}")
        identity_checked = check_epoch_identity(stats, f"validation after epoch {epoch}")
        parts = _gather(acc, self.ctx)
        merged = parts[0]
        for part in parts[1:]:
            merged.merge(part)
        metrics = {f"val/{k}": v for k, v in merged.metrics().items()}
        metrics.update({f"val/{k}": v for k, v in stats.as_metrics(prefix="data_").items()})
        metrics["val/data_identity_checked"] = float(identity_checked)
        return metrics

    def run(self) -> None:
        self.restore()
        self.start_tracking()
        cfg = self.cfg.trainer
        status = "FAILED"
        try:
            for epoch in range(self.state.epoch, cfg.epochs):
                stats = EpochStats.merge(_gather(self.train_epoch(epoch), self.ctx))
                # Every rank holds the same merged stats, so every rank raises together.
                check_epoch_counts(stats, f"epoch {epoch}")
                identity_checked = check_epoch_identity(stats, f"epoch {epoch}")
                metrics = {f"data/{k}": v for k, v in stats.as_metrics(prefix="").items()}
                metrics["data/identity_checked"] = float(identity_checked)  # 0: counts only (see the check)
                if (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs:
                    metrics.update(self.evaluate(epoch))
                self.state.epoch, self.state.samples_in_epoch = epoch + 1, 0
                top1 = metrics.get("val/video_top1")
                if top1 is not None and (self.state.best_top1 is None or top1 > self.state.best_top1):
                    self.state.best_top1 = top1
                self.tracker.log_metrics({**metrics, "epoch": epoch + 1}, step=self.state.step)
                self.report(metrics, with_checkpoint=True)
            self.export()
            status = "FINISHED"
        finally:
            # A failure here is retried by Ray from the last checkpoint: keep the run open for it.
            if status == "FINISHED":
                self.tracker.finish(status)

    def export(self) -> None:
        weights = full_model_state(self.model)  # collective
        if not self.ctx.is_main:
            return
        with tempfile.TemporaryDirectory(prefix="mvit-export-") as tmp:
            written = export_model(weights, self.model_cfg, Path(tmp), classes=self.job.get("classes"))
            for path in written:
                self.tracker.log_artifact(str(path), "model")
            if self.job.get("export_dir"):
                copy_to_storage(written, self.job["export_dir"], self.job.get("storage_options") or {})
        log.info("exported the final model (%d files)", len(written))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The ``TorchTrainer`` entry point: ``config = {"experiment": ..., "job": ...}``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Trainer(from_container(config["experiment"]), config["job"]).run()
