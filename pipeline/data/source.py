"""Reading a split's shards into Ray Data: a ``Datasource`` whose read plan follows the epoch plan.

One read task per read group (``plan.ReadGroup``) of each epoch the execution carries (the
cursor's ``plan.Span``: one execution may read a whole run's epochs back to back). A task opens its
shards through fsspec (local paths, ``file://``, ``s3://`` with an endpoint override), iterates each tar with
``core.tar_members`` (bounded: per-member size cap, plain tar only, links, devices and sparse members
refused), groups members into samples by webdataset's key rule (``_grouped``, which unlike
``group_by_keys`` keeps a complete sample read just before a break), interleaves the shards
round-robin through a seeded shuffle buffer, and emits one row per sample: the encoded bytes, label
and metadata, its epoch position and unit, plus the pad rows of the units it completes (see
``plan``).

The manifest is the truth about what a shard holds. A shard that breaks off (damaged tar, dropped
connection after s3fs's retries) or holds fewer samples than recorded yields BROKEN rows for the
missing samples (counted as failed by the worker, never a crash); samples beyond the recorded count
are ignored with a warning. A shard that cannot be opened at all fails the read with
``ShardUnavailableError`` naming it: a wrong URL, endpoint or credentials, or a storage outage that
outlasts the retries, must stop the job, not turn into an epoch of skipped samples.

Shards are not hashed while reading: a shard's hash is known only after its samples have been
handed on, and every epoch would pay for it. The manifest's sha256 is what ``python -m
preprocessing verify`` checks; a shard whose bytes changed but still parse is read as it is.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from core.manifest import UNLABELED
from core.tar_members import Member, iter_members
from pipeline.data.plan import BROKEN, PAD, SAMPLE, CursorRef, Layout, ReadGroup, ShardRef, make_plan, stable_hash

log = logging.getLogger(__name__)

READ_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("data", pa.binary()),
        ("label", pa.int64()),
        ("meta", pa.string()),
        ("kind", pa.int8()),
        ("pos", pa.int64()),
        ("unit", pa.int64()),
        ("epoch", pa.int64()),
        ("error", pa.string()),
    ]
)
_READ_BLOCK_BYTES = 8 << 20


class ShardSource(Datasource):
    """The shards of one split, read in the order of the epoch the cursor names."""

    def __init__(
        self,
        shards: list[ShardRef],
        *,
        extension: str,
        num_classes: int,
        storage_options: dict[str, Any],
        seed: int,
        per_unit: int,
        permute: bool,
        interleave: int,
        buffer: int,
        cursor: CursorRef,
        total_bytes: int,
    ) -> None:
        super().__init__()
        self.shards = shards
        self.extension = extension
        self.num_classes = num_classes
        self.storage_options = dict(storage_options)
        self.seed = seed
        self.per_unit = per_unit
        self.permute = permute
        self.interleave = interleave
        self.buffer = buffer
        self.cursor = cursor
        self.total_bytes = total_bytes

    def get_name(self) -> str:
        return "MViTShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return self.total_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, **_: Any) -> list[ReadTask]:
        """The read tasks of every epoch of the cursor's span, in order: the first epoch from the resume
        position, the others whole. Each epoch's units are a multiple of the world size, so the split
        hands unit u of every epoch to worker u mod W."""
        span = self.cursor.current()
        tasks = []
        for epoch in span.epochs:
            plan = make_plan(
                self.shards, seed=self.seed, epoch=epoch, start=span.position if epoch == span.epoch else 0,
                world_size=span.world_size, per_unit=self.per_unit, permute=self.permute, interleave=self.interleave,
            )  # fmt: skip
            mean_bytes = self.total_bytes / max(1, plan.layout.total)
            for group in plan.groups:
                rows = plan.layout.group_rows(group)
                meta = BlockMetadata(num_rows=rows, size_bytes=int(rows * mean_bytes),
                                     input_files=[s.url for s in group.shards], exec_stats=None)  # fmt: skip
                reader = GroupReader(group, plan.layout, epoch, self)
                tasks.append(ReadTask(reader, meta, schema=READ_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks


class GroupReader:
    """The body of one read task (a picklable callable)."""

    def __init__(self, group: ReadGroup, layout: Layout, epoch: int, source: ShardSource) -> None:
        self.group, self.layout, self.epoch = group, layout, epoch
        self.extension = source.extension
        self.num_classes = source.num_classes
        self.storage_options = source.storage_options
        self.buffer = source.buffer
        self.seed = source.seed

    def __call__(self) -> Iterator[pa.Table]:
        from core import faults

        planted = faults.current().kill_read  # a drill (MVIT_FAULTS): this task's process dies, every attempt
        if planted:
            faults.kill_process_if_planted(planted, [s.url.rsplit("/", 1)[-1] for s in self.group.shards], "read task")
        rows: list[dict[str, Any]] = []
        size = 0
        for offset, sample in enumerate(self._samples()):
            index = self.group.first + offset - self.layout.start
            if index < 0:  # consumed before the resume position: read past, never decoded
                continue
            rows.append({**sample, "pos": self.group.first + offset, "unit": self.layout.unit_of(index)})
            size += len(sample["data"])
            for unit, count in self.layout.pads_after(index):
                rows.extend(_pad_row(unit) for _ in range(count))
            if size >= _READ_BLOCK_BYTES:
                yield self._table(rows)
                rows, size = [], 0
        if rows:
            yield self._table(rows)

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        for row in rows:
            row["epoch"] = self.epoch
        return pa.Table.from_pylist(rows, schema=READ_SCHEMA)

    def _samples(self) -> Iterator[dict[str, Any]]:
        """The group's samples in their epoch order: shards round-robin through a seeded buffer."""
        rng = random.Random(stable_hash("buffer", self.seed, self.epoch, self.group.first))
        streams = [_exactly(shard, self.extension, self.num_classes, self.storage_options) for shard in self.group.shards]
        held: list[dict[str, Any]] = []
        while streams:
            for stream in list(streams):
                sample = next(stream, None)
                if sample is None:
                    streams.remove(stream)
                    continue
                held.append(sample)
                if len(held) > self.buffer:
                    yield _take(held, rng)
        while held:
            yield _take(held, rng)


def _take(held: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    i = rng.randrange(len(held))
    held[i], held[-1] = held[-1], held[i]
    return held.pop()


def _pad_row(unit: int) -> dict[str, Any]:
    return {"key": "", "data": b"", "label": -1, "meta": "", "kind": PAD, "pos": -1, "unit": unit, "error": ""}


def _broken(key: str, error: str) -> dict[str, Any]:
    return {"key": key, "data": b"", "label": -1, "meta": "", "kind": BROKEN, "error": error[:300]}


def _exactly(shard: ShardRef, extension: str, num_classes: int, storage_options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The shard's samples cut or completed (with BROKEN rows) to the manifest's count."""
    count, errors = 0, []
    for sample in _shard_samples(shard, extension, num_classes, storage_options, errors):
        if count == shard.samples:
            log.warning("%s holds more samples than its manifest entry (%d); ignoring the rest", shard.url, shard.samples)
            return
        count += 1
        yield sample
    why = f"reading the shard stopped: {errors[0]}" if errors else "the shard holds fewer samples than its manifest entry"
    for missing in range(count, shard.samples):
        yield _broken(f"{shard.url.rsplit('/', 1)[-1]}#{missing}", f"sample missing: {why}")


def _shard_samples(
    shard: ShardRef, extension: str, num_classes: int, storage_options: dict[str, Any], errors: list[str]
) -> Iterator[dict[str, Any]]:
    """Rows for the samples of one tar, in tar order; stops at the first read error (in ``errors``).

    A shard that cannot be opened at all (missing object, no access, wrong endpoint) raises: that is
    a configuration or storage outage, which must stop the job rather than read as an empty epoch.
    """
    fs, path = fsspec.core.url_to_fs(shard.url, **storage_options)
    try:
        stream = fs.open(path, "rb", block_size=_READ_BLOCK_BYTES)
    except Exception as exc:  # noqa: BLE001 - named and re-raised: the job must stop with a clear reason
        raise ShardUnavailableError(f"cannot open shard {shard.url}: {type(exc).__name__}: {exc}") from exc
    try:
        for sample in _grouped(iter_members(stream, shard.member_cap), shard.url):
            yield _sample_row(sample, extension, num_classes)
    except Exception as exc:  # noqa: BLE001 - a damaged or cut-off shard ends here; its samples are counted
        errors.append(f"{type(exc).__name__}: {exc}")
        log.warning("reading %s stopped: %s", shard.url, errors[-1])
    finally:
        stream.close()


class ShardUnavailableError(OSError):
    """A shard could not be opened at all (missing object, no access, storage outage after retries)."""


def _grouped(members: Iterator[Member], url: str) -> Iterator[dict[str, Any]]:
    """Tar members grouped into samples by key (webdataset's rule: the name up to the first dot).

    Unlike webdataset's ``group_by_keys``, a sample read in full before the stream breaks is still
    yielded (then the error is raised): a shard cut off inside one member loses that sample and the
    ones after it, not the complete sample before it. A refused member (``core.tar_members``) marks its
    sample with the reason (``__problem__``), which fails that sample by name.
    """
    current: dict[str, Any] | None = None
    try:
        for member in members:
            key, suffix = key_and_extension(member.name)
            if key is None:
                if member.problem is not None:  # not a {key}.{ext} name: no sample to fail, but say so
                    log.warning("%s: %s", url, member.problem)
                continue
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            suffix = suffix.lower()
            if suffix in current:
                raise ValueError(f"{url}: member {member.name!r} appears twice")
            if member.problem is not None:
                current.setdefault("__problem__", member.problem)
            current[suffix] = member.data
    except Exception:
        if current is not None:
            yield current
        raise
    if current is not None:
        yield current


def key_and_extension(name: str) -> tuple[str | None, str | None]:
    """WebDataset's sample-key rule for a member name: the key is the name up to the first dot of its last
    path component (``dir/k.mp4`` -> ``dir/k``, ``mp4``); (None, None) for a name without one, or whose
    last component starts with a dot (webdataset would key ``a/b/.c`` by its folder; no sample is read
    from such a name either way).

    Spelled out here rather than imported from webdataset: ``webdataset.tariterators`` imports torch,
    which a read task in a fresh Ray worker paid on every epoch's first read (``python -X importtime -c
    "import pipeline.data.source"``: 2.5 s with it, 1.5 s without, on this project's 2-core machine).
    """
    folder, slash, base = name.rpartition("/")
    key, dot, extension = base.partition(".")
    return (folder + slash + key, extension) if key and dot else (None, None)


def _unsafe_key(key: str) -> bool:
    """A key that is a path (``../../x``, ``/abs/x``, ``dir/x``) or holds control characters. Shards made
    by ``preprocessing`` only hold plain ``{key}.{ext}`` members; anything else was crafted or damaged.
    Nothing here is ever written to disk, but such a sample is refused (and counted) rather than trusted."""
    return "/" in key or "\\" in key or key.startswith("..") or any(ord(c) < 32 or ord(c) == 127 for c in key)


def _sample_row(sample: dict[str, Any], extension: str, num_classes: int) -> dict[str, Any]:
    """One sample's row, or a BROKEN row saying why it cannot be trained on. A label outside the split's
    classes would index past the classifier (a crash on CPU, a device assert on GPU) and an unlabelled
    one (-1) would be scored as wrong: both are FAILED by name, the epoch goes on."""
    key = sample["__key__"]
    if _unsafe_key(key):
        return _broken(key, f"unsafe member name {key!r}: members must be plain {{key}}.{{ext}} names")
    if "__problem__" in sample:
        return _broken(key, sample["__problem__"])
    data, cls = sample.get(extension), sample.get("cls")
    if data is None or cls is None:
        missing = [name for name, value in ((extension, data), ("cls", cls)) if value is None]
        return _broken(key, f"sample has no .{' / .'.join(missing)} member")
    try:
        label = int(cls.decode("ascii").strip())
    except ValueError:
        return _broken(key, f"unreadable .cls member {cls[:20]!r}")
    if label == UNLABELED:
        return _broken(key, f"unlabelled sample (class {UNLABELED}): usable for prediction, not for training or evaluation")
    if not 0 <= label < num_classes:
        return _broken(key, f"label {label} is outside the split's {num_classes} classes")
    meta = sample.get("json", b"{}").decode("utf-8", errors="replace")
    return {"key": key, "data": data, "label": label, "meta": meta, "kind": SAMPLE, "error": ""}
