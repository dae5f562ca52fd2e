"""The worker side: one worker's shard of a dataset as an iterator of torch batches, epoch by epoch.

    loader = ShardLoader.for_train_worker("train", device=device)      # inside the train function
    loader.plan(range(start_epoch, epochs))     # the passes to come: one Ray Data execution reads them all
    for epoch in range(start_epoch, epochs):
        for batch in loader.epoch(epoch, position=resume_position if epoch == start_epoch else 0):
            x = normalize(batch["video"], mean, std)     # (B, C, T, H, W) float on the device
            ...
            checkpoint_state = loader.state()           # {"epoch": e, "position": p}
        stats = loader.stats                            # EpochStats: samples, failed, fingerprint, ...
        # merged over workers: stats.complete, and fingerprint == expected_digest (see EpochStats)

A batch is a dict: ``video`` uint8 (B, 3, T, H, W) (T = 1 for images; with ``augment.on_device`` a list
of B uint8 (T, h, w, 3) crops, each its box's size, plus ``flip``, ``rand_augment`` and ``erase``, for
``device_augment.render_on_device`` and ``augment_on_device``), ``label`` int64 (B,),
``video_id`` list[str] (the sample key), ``view`` int64 (B,) (training view index, or clip * crops
+ crop in evaluation), ``mix_seed`` int (seed for ``device.mix_batch``), ``epoch`` and ``step``.
Pad rows and samples that failed to decode are dropped, so B may be smaller than the configured
batch size, usually by at most one sample's views. B can be 0 only at an epoch's end when a batch
holds one sample (e.g. 30-view evaluation) or fewer than 2 x workers samples remain: every rank
must still take that step (FSDP collectives) and skip the loss for it.

Planned passes are read by one execution, pass after pass: the decoder actors, their decode
processes and the read workers start once per run (or per attempt after a restart), not per epoch,
and the next epoch's first batches are read while this one ends. A pass asked for out of plan
(another epoch, a resume position) starts a new execution from there.

Every worker gets the same number of batches per epoch (``Layout.batches_per_worker``), and the
loader checks each batch is the unit the plan gives this rank, so a misconfigured split fails
loudly instead of hanging a collective or silently repeating data.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.data import DataIterator

from pipeline.data.plan import FAILED, OK, PAD, DatasetFacts, Layout, stable_hash
from pipeline.data.service import CONTEXT_KEY
from core.manifest import add_digests, is_sample_key, sample_key_hash

_MAX_LOGGED_FAILURES = 20


_COUNTS = ("batches", "samples", "views", "failed", "unkeyed", "pad_rows")


@dataclass
class EpochStats:
    """What one worker received in one epoch. ``merge`` sums workers; then
    ``samples + failed == expected`` shows the count is right, and ``fingerprint == expected_digest``
    shows the samples are the split's own: none lost, none repeated, even when a duplicate and a loss
    would leave the count unchanged. The fingerprint is ``core.manifest.keys_digest`` of the
    keys of the delivered and failed samples (first view only; pad rows excluded), order-independent,
    so workers' parts add up; ``expected_digest`` is the same digest of the manifest's keys.

    The comparison is only meaningful when ``unkeyed == 0``: a sample the reader never reached (a shard
    broken off early) is counted under a made-up ``shard#index`` key, since its real key is unknown.
    """

    epoch: int
    start: int = 0
    expected: int = 0  # samples the whole job should see this epoch (after ``start``)
    batches: int = 0
    samples: int = 0  # decoded samples delivered
    views: int = 0  # rows delivered (samples x views)
    failed: int = 0  # samples skipped because they did not decode (or were missing from a shard)
    unkeyed: int = 0  # of ``failed``: samples whose key is unknown (not in the fingerprint)
    pad_rows: int = 0
    fingerprint: int = 0
    # What ``fingerprint`` must add up to over all workers: the manifest's digest of the split. Known
    # only for an epoch read from its start (which samples precede a resume position depends on the
    # shuffle, so the digest of the rest cannot be derived) and when every shard entry has a digest.
    expected_digest: int | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        return {f"{prefix}{k}": float(getattr(self, k)) for k in _COUNTS}

    @staticmethod
    def merge(parts: list[EpochStats]) -> EpochStats:
        first = parts[0]
        total = EpochStats(first.epoch, first.start, first.expected, expected_digest=first.expected_digest)
        for part in parts:
            if (part.epoch, part.start, part.expected_digest) != (first.epoch, first.start, first.expected_digest):
                raise ValueError("merging stats of different epochs (or datasets)")
            for name in _COUNTS:
                setattr(total, name, getattr(total, name) + getattr(part, name))
            total.fingerprint = add_digests([total.fingerprint, part.fingerprint])
            total.failures += part.failures
        return total

    @property
    def complete(self) -> bool:
        """Every expected sample arrived once (delivered or counted as failed)."""
        return self.samples + self.failed == self.expected

    @property
    def identity_checkable(self) -> bool:
        """Whether ``fingerprint == expected_digest`` is a valid test of this (merged) epoch."""
        return self.start == 0 and self.expected_digest is not None and self.unkeyed == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def carry(self, before: dict[str, int] | None = None) -> dict[str, int]:
        """What a checkpoint taken now keeps of this (merged, partial) epoch, so that the epoch resumed
        from it, on any number of workers, can still be checked whole (``with_carry``). ``before``: the
        carry this epoch was itself resumed with."""
        before = before or {"position": self.start, "samples": 0, "failed": 0, "unkeyed": 0, "fingerprint": 0}
        if before["position"] != self.start:
            raise ValueError(f"carry from position {before['position']} for an epoch resumed at {self.start}")
        return {"position": self.start + self.samples + self.failed,
                "samples": before["samples"] + self.samples, "failed": before["failed"] + self.failed,
                "unkeyed": before["unkeyed"] + self.unkeyed,
                "fingerprint": add_digests([before["fingerprint"], self.fingerprint])}

    def with_carry(self, carry: dict[str, int] | None, split_digest: int | None) -> EpochStats:
        """This (merged) resumed epoch plus what the samples before its resume position added up to:
        the whole epoch, as if read at once, so ``complete`` and the identity check cover all of it.
        Unchanged when there is no carry, or it does not end where this epoch resumed."""
        if carry is None or self.start == 0 or carry.get("position") != self.start:
            return self
        whole = EpochStats(self.epoch, 0, self.expected + carry["samples"] + carry["failed"],
                           expected_digest=split_digest)  # fmt: skip
        for name in _COUNTS:
            setattr(whole, name, getattr(self, name) + carry.get(name, 0))
        whole.fingerprint = add_digests([carry["fingerprint"], self.fingerprint])
        whole.failures = list(self.failures)
        return whole


class DataStalled(RuntimeError):
    """A worker waited too long for its next batch; the message says for what."""


def _resources(values: dict[str, float]) -> str:
    shown = {k: v for k, v in values.items() if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


class _Stream:
    """One Ray Data execution's batches for this worker, read pass after pass.

    Ray Data's iterator has no timeout of its own, so a thread pulls from it into a one-slot queue that
    the loader waits on with one. Between passes the thread waits with the next pass's first batch in
    hand while the execution reads ahead, bounded by Ray Data's backpressure.
    """

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], passes: tuple[int, ...], position: int,
                 name: str) -> None:  # fmt: skip
        self._passes, self._position = passes, position
        self._slot: queue.Queue = queue.Queue(maxsize=1)
        threading.Thread(target=self._pump, args=(batches,), name=name, daemon=True).start()

    @property
    def next(self) -> tuple[int, int] | None:
        """(epoch, position) of the pass this stream delivers next; None once its last pass is read."""
        return (self._passes[0], self._position) if self._passes else None

    def passed(self) -> None:
        """The current pass has been read whole: the next one starts at its beginning."""
        self._passes, self._position = self._passes[1:], 0

    def get(self, timeout: float) -> tuple[str, Any]:
        """("rows", batch), ("done", None) or ("error", exception); ``queue.Empty`` after ``timeout``."""
        return self._slot.get(timeout=timeout)

    def _pump(self, batches: Iterator[dict[str, np.ndarray]]) -> None:
        try:
            for rows in batches:
                self._slot.put(("rows", rows))
            self._slot.put(("done", None))
        except BaseException as err:  # noqa: BLE001 - handed to the consuming thread, which raises it
            self._slot.put(("error", err))


class ShardLoader:
    """Iterates one worker's split of a dataset built by ``service.build_dataset``."""

    def __init__(
        self,
        iterator: DataIterator,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        prefetch_batches: int = 2,
    ) -> None:
        facts = iterator.get_context().get_config(CONTEXT_KEY)
        if not isinstance(facts, DatasetFacts):
            raise ValueError("this iterator does not come from pipeline.data.service.build_dataset")
        self._iterator = iterator
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.prefetch_batches = prefetch_batches
        self.seed = facts.seed
        self.samples, self.per_unit, self.views = facts.samples, facts.per_unit, facts.views
        self._cursor = facts.cursor
        self.split_digest = facts.key_digest
        self._facts = facts
        self.stats = EpochStats(-1)
        self._layout: Layout | None = None
        self._done = 0
        self._planned: tuple[int, ...] = ()
        self._stream: _Stream | None = None
        self.blocked_s = 0.0  # seconds spent waiting for the data service (no batch ready), since creation

    @classmethod
    def for_train_worker(cls, name: str = "train", device: torch.device | str | None = None,
                         prefetch_batches: int = 2) -> ShardLoader:  # fmt: skip
        """The loader of dataset ``name`` inside a Ray Train worker (``get_dataset_shard``)."""
        context = ray.train.get_context()
        return cls(
            ray.train.get_dataset_shard(name), rank=context.get_world_rank(), world_size=context.get_world_size(),
            device=device, prefetch_batches=prefetch_batches,
        )  # fmt: skip

    @property
    def rows_per_batch(self) -> int:
        return self.per_unit * self.views

    def layout(self, position: int = 0) -> Layout:
        return Layout(self.samples, position, self.world_size, self.per_unit)

    def batches_per_epoch(self, position: int = 0) -> int:
        """Batches this worker gets in an epoch started at ``position`` (the same on every worker)."""
        return self.layout(position).batches_per_worker

    def state(self) -> dict[str, int]:
        """Where the job is once every worker has taken as many batches as this one: store it in the
        checkpoint and pass it back as ``epoch(e, position)`` to resume."""
        if self._layout is None:
            return {"epoch": 0, "position": 0}
        return {"epoch": self.stats.epoch, "position": self._layout.position_after(self._done)}

    def plan(self, epochs: Iterable[int]) -> None:
        """The passes this worker is going to read, in order (a run's remaining epochs, or the epochs
        after which it validates). Passes read in plan order share one Ray Data execution: its read
        tasks and decoder actors start once and run on from one pass into the next, instead of starting
        again (seconds) for every pass. Every worker must plan the same passes. Without a plan, each
        ``epoch`` call is an execution of its own."""
        epochs = tuple(int(e) for e in epochs)
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"planned epochs must increase: {list(epochs)}")
        self._planned = epochs

    def epoch(self, epoch: int, position: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` for this worker, starting at sample ``position`` of the epoch."""
        layout = self.layout(position)
        stream = self._stream
        if stream is None or stream.next != (epoch, position):
            self._stream = None  # (an abandoned stream: its execution ends with the worker)
            then = tuple(e for e in self._planned if e > epoch)
            self._cursor.request(self.rank, self.world_size, epoch, position, then)
            batches = self._iterator.iter_batches(
                batch_size=self.rows_per_batch, batch_format="numpy", prefetch_batches=self.prefetch_batches
            )
            stream = self._stream = _Stream(batches, (epoch, *then), position, name=f"mvit-batches-{epoch}")
        self._layout, self._done = layout, 0
        digest = self.split_digest if position == 0 else None  # see EpochStats.expected_digest
        self.stats = stats = EpochStats(epoch, position, layout.remaining, expected_digest=digest)
        finished = False
        try:
            for step in range(layout.batches_per_worker):
                rows = self._next_rows(stream, epoch, step)
                if rows is None:
                    raise self._miscount(epoch, str(step), layout)
                self._check_unit(rows, epoch, layout, step)
                batch = self._collect(rows, stats, epoch, step)
                stats.batches += 1
                self._done = step + 1
                yield batch
            stream.passed()
            if stream.next is None and self._next_rows(stream, epoch, layout.batches_per_worker) is not None:
                raise self._miscount(epoch, f"more than {layout.batches_per_worker}", layout)
            finished = True
        finally:
            if not finished or stream.next is None:
                self._stream = None

    def _miscount(self, epoch: int, got: str, layout: Layout) -> RuntimeError:
        return RuntimeError(f"rank {self.rank} got {got} batches in epoch {epoch}, the plan has "
                            f"{layout.batches_per_worker}: was the dataset split into {self.world_size} parts?")

    def _next_rows(self, stream: _Stream, epoch: int, step: int) -> dict[str, np.ndarray] | None:
        """The stream's next batch, None at its end. A wait longer than ``data.batch_timeout_s`` raises
        ``DataStalled`` naming what the data service waits for, instead of blocking this rank forever."""
        timeout = self._facts.batch_timeout_s
        began = time.perf_counter()
        try:
            kind, item = stream.get(timeout)
            self.blocked_s += time.perf_counter() - began
        except queue.Empty:
            raise DataStalled(self._stall_text(epoch, step, f"no batch for {timeout:g} s (data.batch_timeout_s)")) from None
        if kind == "done":
            return None
        if kind == "error":
            if "Timed out while starting actors" in str(item):
                raise DataStalled(self._stall_text(epoch, step, "the decoder actors were not placed within "
                                                   "data.decoder.start_timeout_s")) from item  # fmt: skip
            raise item
        return item

    def _stall_text(self, epoch: int, step: int, what: str) -> str:
        """One line: which rank waited for what, and whether the cluster can place the decoder actors."""
        need = dict(self._facts.decoder_resources)
        text = (f"rank {self.rank}: the data service stopped delivering in epoch {epoch} before batch {step}: {what}. "
                f"Decoder actors need {_resources(need)} each, {self._facts.decoder_min_actors} at least")
        try:
            free, total = ray.available_resources(), ray.cluster_resources()
        except Exception:  # noqa: BLE001 - the diagnosis is best effort; the stall itself is certain
            return text
        short = {k: (free.get(k, 0.0), total.get(k, 0.0)) for k, v in need.items() if free.get(k, 0.0) + 1e-9 < v}
        if short:
            missing = ", ".join(f"{k} (free {f:g} of {t:g})" for k, (f, t) in short.items())
            return f"{text}; the cluster lacks {missing}: add nodes, or lower data.decoder.* / trainer.* demands"
        return f"{text}; the cluster has room for them (free: {_resources(free)}): a stage is stuck, see the Ray Data logs"

    def _check_unit(self, rows: dict[str, np.ndarray], epoch: int, layout: Layout, step: int) -> None:
        expected = step * self.world_size + self.rank
        units, epochs = np.unique(rows["unit"]), np.unique(rows["epoch"])
        if len(rows["unit"]) != self.rows_per_batch or units.tolist() != [expected] or epochs.tolist() != [epoch]:
            raise RuntimeError(
                f"rank {self.rank}, epoch {epoch}, step {step}: expected the {self.rows_per_batch} rows of unit "
                f"{expected} of epoch {epoch}, got {len(rows['unit'])} rows of units {units.tolist()} of epochs "
                f"{epochs.tolist()}. Split the dataset with order preserved "
                "(TorchTrainer(dataset_config=pipeline.data.ray_train_data_config(cfg))) into world_size parts."
            )

    def _collect(self, rows: dict[str, np.ndarray], stats: EpochStats, epoch: int, step: int) -> dict[str, Any]:
        status = rows["status"]
        keep = status == OK
        first_view = rows["view"] == 0
        stats.pad_rows += int((status == PAD).sum())
        stats.views += int(keep.sum())
        for key, ok, bad, error in zip(rows["video_id"], keep & first_view, (status == FAILED) & first_view, rows["error"]):
            key = str(key)
            # A failed sample without a real key is a placeholder for one the reader never reached
            # (or a crafted member name): it cannot stand for a manifest key, so it is counted apart.
            unkeyed = bad and not is_sample_key(key)
            if (ok or bad) and not unkeyed:
                stats.fingerprint = add_digests([stats.fingerprint, sample_key_hash(key)])
            stats.samples += int(ok)
            stats.failed += int(bad)
            stats.unkeyed += int(unkeyed)
            if bad and len(stats.failures) < _MAX_LOGGED_FAILURES:
                stats.failures.append((str(key), str(error)))
        on_device = self.device is not None and self.device.type != "cpu"
        video = rows["video"] if keep.all() else rows["video"][keep]
        if "flip" in rows:  # augment.on_device: a list of crops, each view its box's size (the device resizes them)
            video = [_tensor(crop, self.device if on_device else None) for crop in video]
        else:
            video = _tensor(video, self.device if on_device else None)
        label = torch.from_numpy(rows["label"][keep].astype(np.int64))
        view = torch.from_numpy(rows["view"][keep].astype(np.int64))
        if on_device:
            label, view = label.to(self.device, non_blocking=True), view.to(self.device, non_blocking=True)
        return {
            "video": video,
            "label": label,
            "view": view,
            "video_id": [str(k) for k in rows["video_id"][keep]],
            "mix_seed": stable_hash("mix", self.seed, epoch, stats.start, step, self.rank) % 2**63,
            "epoch": epoch,
            "step": step,
            # augment.on_device: each view's flip and drawn RandAugment ops and erase box, for device_augment.
            # They stay on the host, which groups the rows by op; only the pixels work on the device.
            **{name: torch.from_numpy(np.ascontiguousarray(rows[name][keep]))
               for name in ("rand_augment", "erase", "flip") if name in rows},
        }


def _tensor(array: np.ndarray, device: torch.device | None) -> torch.Tensor:
    """A batch's (or one crop's) pixels as a tensor of their own (Ray may hand out read-only views of its
    buffers), pinned and copied to ``device`` without blocking when one is given."""
    tensor = torch.from_numpy(np.ascontiguousarray(array) if array.flags.writeable else array.copy())
    return tensor.pin_memory().to(device, non_blocking=True) if device is not None else tensor
