"""The figures a person reads while a job runs: one line per epoch, from rank 0.

``Meter`` sums what a stretch of training did (loss, rows, time waiting for data, time computing) and
turns it into the metrics MLflow keeps; ``EpochProgress`` writes the epoch's line (loss, LR, clips/s,
data-wait share, validation accuracy when evaluated, elapsed time and ETA) and returns the timing
figures so MLflow keeps those too. Ray forwards the line to the driver's output (``ray job submit``
prints it, prefixed with the worker's name and pid).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("pipeline.progress")


@dataclass
class Meter:
    """Sums over a stretch of steps, averaged over ranks before use (see ``Trainer._log_window``)."""

    loss: float = 0.0  # loss x rows, summed
    rows: float = 0.0
    wait: float = 0.0  # seconds waiting for the next batch
    busy: float = 0.0  # seconds stepping
    # Of ``wait``: seconds the data service had no batch ready. The rest is this worker's own work on a
    # batch that had arrived (the plan checks, the key fingerprints, the copy to a tensor and the device).
    blocked: float = 0.0

    def add(self, other: Meter) -> None:
        self.loss += other.loss
        self.rows += other.rows
        self.wait += other.wait
        self.busy += other.busy
        self.blocked += other.blocked

    def reset(self) -> None:
        self.loss = self.rows = self.wait = self.busy = self.blocked = 0.0

    def metrics(self, prefix: str, world_size: int, lr: float | None) -> dict[str, float]:
        """Rank-averaged sums -> ``{prefix}loss``, ``clips_per_s`` (all ranks), ``data_wait_fraction``,
        ``data_blocked_fraction`` (the part of the wait with no batch ready) and ``lr`` when given."""
        elapsed = max(self.wait + self.busy, 1e-9)
        out = {
            f"{prefix}loss": self.loss / max(self.rows, 1),
            f"{prefix}clips_per_s": self.rows * world_size / elapsed,
            f"{prefix}data_wait_fraction": self.wait / elapsed,
            f"{prefix}data_blocked_fraction": self.blocked / elapsed,
        }
        if lr is not None:
            out[f"{prefix}lr"] = lr
        return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class EpochProgress:
    """Elapsed time and ETA over the epochs this attempt runs (a resumed job counts from its resume)."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        self.epochs, self.enabled = epochs, enabled
        self.started = time.monotonic()
        self.first_epoch = 0

    def start(self, first_epoch: int) -> None:
        self.started, self.first_epoch = time.monotonic(), first_epoch

    def epoch_done(self, epoch: int, metrics: dict[str, float], lr: float) -> dict[str, float]:
        """Logs the line of ``epoch`` (0-based) from its metrics; returns ``time/*`` figures for MLflow."""
        elapsed = time.monotonic() - self.started
        done = epoch + 1 - self.first_epoch
        eta = elapsed / max(done, 1) * (self.epochs - epoch - 1)
        if self.enabled:
            log.info(format_epoch_line(epoch, self.epochs, metrics, lr, elapsed, eta))
        return {"time/elapsed_s": elapsed, "time/eta_s": eta}


def format_epoch_line(epoch: int, epochs: int, metrics: dict[str, float], lr: float, elapsed: float, eta: float) -> str:
    parts = [
        f"epoch {epoch + 1}/{epochs}",
        f"loss {metrics['train/epoch_loss']:.4f}",
        f"lr {lr:.2e}",
        f"{metrics['train/epoch_clips_per_s']:.1f} clips/s",
        f"data wait {metrics['train/epoch_data_wait_fraction']:.0%}",
    ]
    if "val/video_top1" in metrics:
        parts.append(f"val top-1 {metrics['val/video_top1']:.1f}% top-5 {metrics['val/video_top5']:.1f}%")
    parts.append(f"elapsed {_duration(elapsed)}, ETA {_duration(eta)}")
    return " | ".join(parts)
