"""The function every Ray Train worker runs: it composes the components and reads as the recipe.

    model        pipeline.trainer.setup       MViT -> device -> parallelize (AC, compile, FSDP2)
    optimiser    pipeline.trainer.optim       AdamW groups, LR from the epoch position, scaled by global batch
    data         pipeline.data                ShardLoader batches (uint8) -> normalise, mix on the device
    checkpoints  pipeline.trainer.checkpoint  CheckpointManager: cadence, DCP through ray.train.report, resume
    tracking     pipeline.tracking            MLflow on rank 0, one run per job across restarts
    metrics      pipeline.trainer.evaluate    view- and video-level top-1/top-5
    progress     pipeline.trainer.progress    the one line per epoch a person reads

``Trainer.run`` reads top to bottom: ``setup`` (resume, tracking), per epoch ``train_epoch`` (which
calls ``step`` per batch) and ``evaluate``, then ``close`` (export, finish the run).

Reproducibility: every source of randomness is a function of (seed, position): the data service seeds
per sample and view, mixing per batch, and the torch RNG (stochastic depth, dropout) is reseeded per
optimiser micro-step from (seed, step, rank). A job resumed from a checkpoint therefore continues on
exactly the path the uninterrupted job would have taken.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core import faults
from pipeline.config import ExperimentConfig, build_model_config
from pipeline.data.device import mix_batch, normalize, soft_cross_entropy
from pipeline.data.loader import EpochStats, ShardLoader
from pipeline.data.plan import stable_hash
from pipeline.models.mvit import MViT
from pipeline.tracking import Tracker
from pipeline.trainer.checkpoint import CheckpointManager, TrainState, full_model_state
from pipeline.trainer.export import copy_to_storage, export_model
from pipeline.trainer.optim import LRSchedule, build_optimizer
from pipeline.trainer.preemption import PreemptionCadence
from pipeline.trainer.progress import EpochProgress, Meter
from pipeline.trainer.setup import WorkerContext, load_initial_weights, prepare_model, resuming
from pipeline.trainer.spec import JobSpec
from pipeline.trainer.validation import check_epoch_counts, check_epoch_identity, gather_object, run_validation

log = logging.getLogger(__name__)


def _all_reduce_mean(values: list[float], ctx: WorkerContext) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    if dist.is_initialized() and ctx.world_size > 1:
        dist.all_reduce(t)
        t /= ctx.world_size
    return t.tolist()


def node_address() -> str:
    """This process's node as the cluster knows it: the node's IP address (Ray's view), else the host's."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - placement is informative; a plain process names its host
        pass
    return socket.gethostname()


def placement_text(placement: list[str]) -> str:
    """``rank:node`` pairs in rank order, e.g. ``0:10.213.0.2,1:10.213.0.3`` (an MLflow tag value)."""
    return ",".join(f"{rank}:{node}" for rank, node in enumerate(placement))


def quiet_worker_logs() -> None:
    """The project's INFO lines and every library's warnings reach the driver; library INFO does not.

    Ray Train sets the worker's root logger to INFO, where Ray Train itself reports every
    ``ray.train.report`` call with its whole metrics dict, and MLflow announces its database migrations
    and system-metrics thread: hundreds of lines a run, all kept in MLflow or Ray's log files anyway.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (by the tracker)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case it was imported already
    logging.getLogger("pipeline").setLevel(logging.INFO)


class Trainer:
    """State and steps of one worker's training run (constructed inside the Ray Train worker)."""

    def __init__(self, cfg: ExperimentConfig, job: JobSpec) -> None:
        self.cfg, self.job = cfg, job
        self.ctx = WorkerContext.current()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank, before sharding
        self.model_cfg = build_model_config(cfg.model)
        model = MViT(self.model_cfg)
        if job.init is not None:  # before sharding; a checkpoint of this job, when there is one, wins
            if resuming():
                log.info("rank %d: resuming this job's checkpoint; model.init_from (%s) not applied", self.ctx.rank,
                         job.init.source)  # fmt: skip
            else:
                load_initial_weights(model, job.init)
                if self.ctx.is_main:
                    log.info("initialised the model from %s; re-initialised: %s", job.init.source,
                             ", ".join(job.init.reinitialized) or "nothing")
        self.model = prepare_model(model, self.ctx, cfg.trainer.precision, cfg.trainer.activation_checkpointing,
                                   cfg.trainer.compile)
        # The global batch of this attempt: an elastic group that lost workers takes smaller steps, so its
        # LR follows the linear scaling rule for the batch it really has (equal to the config's at full size)
        global_batch = self.ctx.world_size * cfg.data.batch_size * cfg.trainer.grad_accum_steps
        self.optimizer = build_optimizer(self.model, cfg.optim, global_batch)
        self.schedule = LRSchedule(self.optimizer, cfg.optim, global_batch, cfg.trainer.epochs)
        self.checkpoints = CheckpointManager(self.model, self.optimizer, cfg.trainer.checkpoint_every_steps)
        self.state = TrainState(world_size=self.ctx.world_size)
        self.train_data = ShardLoader.for_train_worker("train", self.ctx.device, cfg.data.prefetch_batches)
        self.val_data = ShardLoader.for_train_worker("val", self.ctx.device, cfg.data.prefetch_batches)
        self.tracker = Tracker(cfg.tracking, job.tracking_uri, enabled=self.ctx.is_main)
        self.progress = EpochProgress(cfg.trainer.epochs, enabled=self.ctx.is_main)
        self.epoch_meter = Meter()  # the last trained epoch's figures (rank-averaged), for its progress line
        self.epoch_carry: dict | None = None  # the epoch in progress before this attempt resumed it
        self._preemption_answered = False
        self.preemption = PreemptionCadence(cfg.trainer.preemption_check_every_steps,
                                            cfg.trainer.preemption_check_every_s)
        self._window_step = 0  # the optimiser step the current logging window started after
        self.mean, self.std = cfg.data.augment.mean, cfg.data.augment.std

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Resume from the latest checkpoint (if any), then open (or reopen) the job's MLflow run and
        record where this attempt's ranks run."""
        placement = gather_object(node_address(), self.ctx)  # collective: every rank says where it is
        log.info("rank %d of %d on node %s", self.ctx.rank, self.ctx.world_size, placement[self.ctx.rank])
        self.state = self.checkpoints.restore(self.ctx.world_size) or self.state
        run_id = self.tracker.start(
            run_name=self.cfg.tracking.run_name or self.cfg.name,
            resume_run_id=self.state.mlflow_run_id,
            params=self.job.experiment,
            tags={**self.job.tags, "world_size": str(self.ctx.world_size), "placement": placement_text(placement)},
            job_key=self.job.job_key,
        )
        if run_id is not None:
            self.state.mlflow_run_id = run_id
            for artifact_file, text in self.job.texts.items():
                self.tracker.log_text(text, artifact_file)
            # The tags name the latest attempt's placement; one file per attempt keeps them all, and the
            # world_size metric shows every (re)start at the step it resumed from
            self.tracker.log_metrics({"world_size": float(self.ctx.world_size)}, step=self.state.step)
            self.tracker.log_text(json.dumps({"step": self.state.step, "epoch": self.state.epoch,
                                              "ranks": dict(enumerate(placement))}, indent=1),
                                  f"placement/from-step-{self.state.step:08d}.json")
        self.progress.start(self.state.epoch)

    # -- step ------------------------------------------------------------------------------------
    def _reseed(self, step: int, micro: int) -> None:
        torch.manual_seed(stable_hash("torch", self.cfg.seed, step, micro, self.ctx.rank) % 2**63)

    def _placeholder_clip(self) -> torch.Tensor:
        """One zero clip: an empty batch still has to run the forward (FSDP all-gathers on every rank)."""
        return torch.zeros((1,) + self.model_cfg.input_shape, device=self.ctx.device)

    def _forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        video = batch["video"]
        if "erase" in batch:  # augment.on_device: the decoder sent crops and the views' flips, ops and boxes
            # imported here: it pulls in torchvision (seconds), which a job without the option never needs
            from pipeline.data.device_augment import DeviceAugmentParams, augment_on_device, render_on_device

            _, frames, size, _ = self.model_cfg.input_shape
            video = render_on_device(video, batch["flip"], size, frames, self.ctx.device)
            video = augment_on_device(video, DeviceAugmentParams(batch["rand_augment"], batch["erase"], self.mean,
                                                                 self.std))  # fmt: skip
        x = normalize(video, self.mean, self.std)
        rows = int(x.shape[0])
        if rows == 0:  # weight 0: the step only keeps the ranks' collectives in step
            return self.model(self._placeholder_clip()).sum() * 0.0, 0
        x, targets = mix_batch(x, batch["label"], self.model_cfg.num_classes, self.cfg.data.augment, batch["mix_seed"])
        return soft_cross_entropy(self.model(x), targets), rows

    def step(self, batch: dict[str, Any], micro: int, progress: float) -> tuple[float, int, float | None]:
        """Forward and backward of one micro-batch; on the last micro-batch of ``grad_accum_steps`` also
        the optimiser step at LR position ``progress`` (epochs, fractional). Returns the summed loss, the
        rows it covered and the LR when an optimiser step was taken (else None)."""
        accum = self.cfg.trainer.grad_accum_steps
        faults.check_step(self.ctx.rank, self.state.step + 1)  # a planted failure (MVIT_FAULTS), else nothing
        self._reseed(self.state.step, micro)
        loss, rows = self._forward_loss(batch)
        (loss / accum).backward()
        if micro + 1 < accum:
            return loss.item() * rows, rows, None
        lr = self.schedule.set(progress, self.state.epoch)
        if self.cfg.optim.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return loss.item() * rows, rows, lr

    def train_epoch(self, epoch: int) -> EpochStats:
        cfg = self.cfg.trainer
        start = self.state.samples_in_epoch if epoch == self.state.epoch else 0
        # A resumed epoch carries the figures of its samples before ``start`` (any world size wrote them)
        self.epoch_carry = self.state.epoch_carry if start else None
        self.state.epoch, self.state.samples_in_epoch, self.state.epoch_carry = epoch, start, self.epoch_carry
        steps_in_epoch = self.train_data.batches_per_epoch(start)
        first_batch = self.train_data.layout(0).batches_per_worker - steps_in_epoch
        total_batches = self.train_data.batches_per_epoch(0)
        self.model.train()
        window, whole = Meter(), Meter()  # the logging window, and the whole epoch for its progress line
        self._window_step = self.state.step
        micro, clock, blocked = 0, time.perf_counter(), self.train_data.blocked_s
        batches: Iterator[dict[str, Any]] = self.train_data.epoch(epoch, start)
        for i, batch in enumerate(batches):
            arrived = time.perf_counter()
            window.wait += arrived - clock
            window.blocked += self.train_data.blocked_s - blocked
            blocked = self.train_data.blocked_s
            if cfg.max_steps_per_epoch and i >= cfg.max_steps_per_epoch * cfg.grad_accum_steps:
                clock = time.perf_counter()
                continue  # smoke runs: drain the epoch (equal counts everywhere) without stepping
            progress = epoch + (first_batch + i + 1) / max(total_batches, 1)
            loss_sum, rows, lr = self.step(batch, micro, progress)
            window.loss += loss_sum
            window.rows += rows
            micro = 0 if lr is not None else micro + 1
            if lr is not None:
                self.state.samples_in_epoch = self.train_data.state()["position"]
            window.busy += time.perf_counter() - arrived
            if lr is not None and self.state.step % self.cfg.tracking.log_every_steps == 0:
                self._log_window(window, whole, lr)
            if lr is not None and self.checkpoints.due(self.state.step):
                self.checkpoint_mid_epoch()
            if lr is not None and self.preemption.due(self.state.step):
                self.answer_preemption()
            clock = time.perf_counter()
        self._log_window(window, whole, None)  # the rest of the epoch: in the epoch figures, not logged per step
        self.epoch_meter = whole
        return self.train_data.stats

    def checkpoint_mid_epoch(self) -> None:
        """Collective: a checkpoint at this step boundary, with the epoch's figures so far (merged over
        ranks) so that the epoch resumed from it is still checked whole, on any number of workers."""
        partial = EpochStats.merge(gather_object(self.train_data.stats, self.ctx))
        carry = partial.carry(self.epoch_carry)
        if carry["position"] != self.state.samples_in_epoch:  # cannot happen while the plan holds; say so if it does
            log.warning("epoch %d: %d samples counted before position %d; the resumed epoch will be checked by "
                        "counts only", self.state.epoch, carry["position"], self.state.samples_in_epoch)  # fmt: skip
            carry = None
        self.state.epoch_carry = carry
        self.tracker.flush()  # the metrics of every step this checkpoint covers are stored before it
        self.checkpoints.report({}, self.state, with_checkpoint=True)

    def answer_preemption(self) -> None:
        """Collective (every rank asks Ray Train, which agrees on one answer): when a node of this job is
        being drained (a spot reclaim, a Kubernetes eviction: see docs/training.md), checkpoint at this step
        boundary and wait for the node to go, so the restart redoes no step. If the node is still there
        after its deadline (the drain was called off), training goes on."""
        import ray.train

        notice = ray.train.get_preemption_info()
        if notice is None or self._preemption_answered:
            return
        self._preemption_answered = True
        # A drain without a deadline may take the node any moment: wait preemption_wait_s from now, as
        # long as one with a deadline is waited for past it.
        deadline = notice.deadline_ms / 1000 if notice.deadline_ms else time.time()
        if not self.checkpoints.due(self.state.step):  # else the periodic one was just taken at this very step
            self.checkpoint_mid_epoch()  # (a second one would reuse its folder name, which retention then deletes)
        if self.ctx.is_main:
            when = f"{deadline - time.time():.0f} s before the deadline" if notice.deadline_ms else "no deadline given"
            log.warning("preemption notice for node(s) %s (ranks %s), %s: checkpointed at step %d; waiting for the "
                        "node to leave", ", ".join(n[:12] for n in notice.preempted_node_ids), notice.preempted_ranks,
                        when, self.state.step)  # fmt: skip
            self.tracker.log_metrics({"preemption/notices": 1.0}, step=self.state.step)
        while time.time() < deadline + self.cfg.trainer.preemption_wait_s:
            time.sleep(1.0)
        log.warning("rank %d: the preempted node is still here %g s after its deadline; training goes on",
                    self.ctx.rank, self.cfg.trainer.preemption_wait_s)

    def _log_window(self, window: Meter, whole: Meter, lr: float | None) -> None:
        """Collective: the window's figures averaged over ranks, logged per step (when ``lr`` is given),
        and added to the epoch's."""
        sums = [window.loss, window.rows, window.wait, window.busy, window.blocked]
        averaged = Meter(*_all_reduce_mean(sums, self.ctx))
        whole.add(averaged)
        steps = self.state.step - self._window_step
        if steps > 0:  # the all-reduced figures are the same on every rank, and so is the cadence from them
            self.preemption.observe((averaged.wait + averaged.busy) / steps)
        self._window_step = self.state.step
        if lr is not None:
            self.tracker.log_metrics(averaged.metrics("train/", self.ctx.world_size, lr), step=self.state.step)
        window.reset()

    # -- evaluate --------------------------------------------------------------------------------
    def evaluate(self, epoch: int) -> dict[str, float]:
        what = f"validation after epoch {epoch}"
        result = run_validation(self.model, self.val_data, self.ctx, self.mean, self.std, epoch, self._placeholder_clip)
        self._report_failures(result.stats, what, f"data/failed-val-{epoch:04d}.json")
        check_epoch_counts(result.stats, what)
        return result.metrics(check_epoch_identity(result.stats, what))

    def _report_failures(self, stats: EpochStats, what: str, artifact_file: str) -> None:
        """Samples counted FAILED (the epoch went on without them): their keys and reasons, in the log and
        in MLflow, so a poison sample is found by name, not only as a count."""
        if not stats.failed or not self.ctx.is_main:
            return
        shown = "; ".join(f"{key}: {reason}" for key, reason in stats.failures[:5])
        more = f" (and {stats.failed - 5} more)" if stats.failed > 5 else ""
        log.warning("%s: %d samples failed and were skipped: %s%s", what, stats.failed, shown, more)
        self.tracker.log_text(json.dumps({"failed": stats.failed, "listed": [list(f) for f in stats.failures]},
                                         indent=1), artifact_file)  # fmt: skip

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> None:
        self.setup()
        cfg = self.cfg.trainer
        status = "FAILED"
        try:
            # One data execution per split carries all the passes of this attempt (see ShardLoader.plan)
            self.train_data.plan(range(self.state.epoch, cfg.epochs))
            self.val_data.plan(e for e in range(self.state.epoch, cfg.epochs) if self._validates(e))
            for epoch in range(self.state.epoch, cfg.epochs):
                stats = EpochStats.merge(gather_object(self.train_epoch(epoch), self.ctx))
                stats = stats.with_carry(self.epoch_carry, self.train_data.split_digest)  # whole, if it was resumed
                self._report_failures(stats, f"epoch {epoch}", f"data/failed-epoch-{epoch:04d}.json")
                # Every rank holds the same merged stats, so every rank raises together.
                check_epoch_counts(stats, f"epoch {epoch}")
                identity_checked = check_epoch_identity(stats, f"epoch {epoch}")
                metrics = {f"data/{k}": v for k, v in stats.as_metrics(prefix="").items()}
                metrics["data/identity_checked"] = float(identity_checked)  # 0: counts only (see the check)
                metrics.update(self.epoch_meter.metrics("train/epoch_", self.ctx.world_size, None))
                if self._validates(epoch):
                    metrics.update(self.evaluate(epoch))
                self.state.epoch, self.state.samples_in_epoch, self.state.epoch_carry = epoch + 1, 0, None
                top1 = metrics.get("val/video_top1")
                if top1 is not None and (self.state.best_top1 is None or top1 > self.state.best_top1):
                    self.state.best_top1 = top1
                metrics.update(self.progress.epoch_done(epoch, metrics, self.schedule.current()))
                self.tracker.log_metrics({**metrics, "epoch": epoch + 1}, step=self.state.step)
                self.tracker.flush()  # as in checkpoint_mid_epoch
                self.checkpoints.report(metrics, self.state, with_checkpoint=True)
            status = "FINISHED"
        finally:
            self.close(status)

    def _validates(self, epoch: int) -> bool:
        cfg = self.cfg.trainer
        return (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs

    # -- close -----------------------------------------------------------------------------------
    def close(self, status: str) -> None:
        """After the last epoch: the final model exported, the MLflow run finished. After a failure the
        run stays open: Ray retries from the last checkpoint (``max_failures``) and reopens it."""
        if status != "FINISHED":
            return
        self.export()
        self.tracker.finish(status)

    def export(self) -> None:
        weights = full_model_state(self.model)  # collective
        if not self.ctx.is_main:
            return
        with tempfile.TemporaryDirectory(prefix="mvit-export-") as tmp:
            written = export_model(weights, self.model_cfg, Path(tmp), classes=self.job.classes)
            for path in written:
                self.tracker.log_artifact(str(path), "model")
            if self.job.export_dir:
                copy_to_storage(written, self.job.export_dir, self.job.export_storage_options)
        log.info("exported the final model (%d files)", len(written))


def train_loop_per_worker(config: dict[str, JobSpec]) -> None:
    """The ``TorchTrainer`` entry point: ``config = {"job": JobSpec}``."""
    quiet_worker_logs()
    job = config["job"]
    Trainer(job.config(), job).run()
