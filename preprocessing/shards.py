"""Plan inputs into shards, write one shard as a unit of work, and remember finished shards.

Determinism and resume rest on three rules:
1. The plan (which input goes to which shard, in which order) is fixed before any transcoding and
   depends only on the inputs and settings: inputs are ordered by sha256(seed:key) (a seeded
   shuffle that does not depend on listing order or Python version, and mixes classes in every
   shard), then cut greedily into shards.
2. A shard is produced in full by one worker, written under a temporary name and committed
   atomically (storage.Store.staged_file). Rejected inputs simply leave the shard smaller.
3. Just before the commit, a small journal record `_state/{split}/{shard}.json` stores the shard's
   result (size, sha256, key digest, rejects) and a fingerprint of its plan + settings. A rerun skips
   a shard whose record matches the plan and whose object exists with the recorded size; everything
   else is rebuilt, byte-identically. (Any older object under the final name is deleted before the
   record is written, so an existing object with a matching record always holds that record's
   content.) A record that cannot be read as a complete result, e.g. one written before records
   carried the key digest, counts as no record: the shard is rebuilt, which costs one re-encode but
   needs no second code path, and the manifest then matches an uninterrupted run's byte for byte.

Byte bound: outputs are only known after encoding, so `--shard-bytes` is met on an estimate:
estimated bytes of an input = its weight (seconds of annotated segment for a video stored as its
segment, source bytes for images and for uncut videos stored whole) x a rate measured by encoding a
few inputs before planning (`calibrate`). Encoding is deterministic, so the estimate, and therefore
the plan, is too. Shards land near the target, not under a hard cap; the manifest records the real
sizes. The calibration encodes are not thrown away: their outputs (or rejections) travel with the
shard job that holds those inputs (`ShardJob.pre_encoded`), so no input is encoded twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from preprocessing.items import Reject, WorkItem
from core.manifest import format_digest, is_sample_key, keys_digest, parse_digest, shard_name
from core.storage import Store
from preprocessing import isolated
from preprocessing.transcode import EncodedSample, Encoder, RejectError

log = logging.getLogger(__name__)

_MEMBER = re.compile(r"^[A-Za-z0-9_-]+\.[a-z0-9]+$")


@dataclass(frozen=True)
class ShardingConfig:
    """How inputs are grouped. Either bound may be None; a shard closes at whichever comes first."""

    seed: int = 0
    shard_bytes: int | None = None
    shard_samples: int | None = None

    def __post_init__(self) -> None:
        if self.shard_bytes is None and self.shard_samples is None:
            raise ValueError("set a shard size: shard_bytes and/or shard_samples")
        for name in ("shard_bytes", "shard_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str
    items: tuple[WorkItem, ...]


def seeded_order(items: Sequence[WorkItem], seed: int) -> list[WorkItem]:
    """Inputs in a seeded pseudo-random order that depends on nothing but (seed, key)."""
    return sorted(items, key=lambda item: hashlib.sha256(f"{seed}:{item.key}".encode()).digest())


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` measured, plus what it encoded: key -> the sample, or the rejection reason."""

    bytes_per_weight: float | None
    encoded: dict[str, EncodedSample | str]

    def for_items(self, items: Sequence[WorkItem]) -> dict[str, EncodedSample | str]:
        return {item.key: self.encoded[item.key] for item in items if item.key in self.encoded}


def calibrate(
    ordered: Sequence[WorkItem], encoder: Encoder, storage_options: dict[str, Any], count: int,
    item_timeout: float | None = None,
) -> Calibration:
    """Output bytes per unit of input weight, measured on the first `count` inputs that encode (each
    within `item_timeout` seconds, as in the shards)."""
    out_bytes, weight, measured = 0, 0.0, 0
    encoded: dict[str, EncodedSample | str] = {}
    for item in ordered:
        if measured == count:
            break
        try:
            sample = isolated.encode(encoder, item, storage_options, item_timeout)
        except RejectError as exc:
            encoded[item.key] = str(exc)
            continue
        encoded[item.key] = sample
        out_bytes += len(sample.data)
        weight += item.weight
        measured += 1
    return Calibration(out_bytes / weight if weight > 0 else None, encoded)


def plan_shards(
    ordered: Sequence[WorkItem], split: str, config: ShardingConfig, bytes_per_weight: float | None
) -> list[ShardPlan]:
    """Cut the ordered inputs into shards by sample count and/or estimated bytes.

    Without a measured rate (no calibration input could be encoded) an input's source size is the
    estimate.
    """
    groups: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    current_bytes = 0.0
    for item in ordered:
        estimate = item.weight * bytes_per_weight if bytes_per_weight else float(item.size)
        full_by_count = config.shard_samples is not None and len(current) >= config.shard_samples
        full_by_bytes = config.shard_bytes is not None and current_bytes + estimate > config.shard_bytes
        if current and (full_by_count or full_by_bytes):
            groups.append(current)
            current, current_bytes = [], 0.0
        current.append(item)
        current_bytes += estimate
    if current:
        groups.append(current)
    return [ShardPlan(i, shard_name(split, i), tuple(group)) for i, group in enumerate(groups)]


@dataclass(frozen=True)
class ShardResult:
    """What a finished shard contributed: its manifest entry plus the inputs it rejected.

    ``key_digest`` is the manifest's ``format_digest(keys_digest(...))`` of the keys written, kept in
    the journal record so a resumed run can write the manifest without reading the shard again."""

    index: int
    name: str
    inputs: int
    samples: int
    bytes: int
    sha256: str
    key_digest: str
    rejects: tuple[Reject, ...]
    fingerprint: str
    reused: bool = False

    def to_json(self) -> bytes:
        body = {k: v for k, v in self.__dict__.items() if k != "reused"}
        body["rejects"] = [r.to_dict() for r in self.rejects]
        return (json.dumps(body, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardResult:
        body = json.loads(data)
        body["rejects"] = tuple(Reject(**r) for r in body["rejects"])
        parse_digest(body["key_digest"])  # KeyError for records older than the field: rebuilt
        return cls(**body, reused=True)


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker (local process or Ray task) needs to produce one shard."""

    plan: ShardPlan
    split: str
    store: Store
    encoder: Encoder
    input_options: dict[str, Any]
    fingerprint: str
    # Outputs of this shard's inputs already encoded while calibrating (key -> sample or reject reason).
    # Encoding is deterministic, so reusing them gives the bytes a fresh encode would.
    pre_encoded: Mapping[str, EncodedSample | str] = field(default_factory=dict)
    # Seconds one input may take to encode (None: no limit); over it, the input is a reject. Not part of
    # the fingerprint: it bounds the work, it does not change what a finished encode produces.
    item_timeout: float | None = None

    @property
    def journal_name(self) -> str:
        return f"_state/{self.split}/{self.plan.name}.json"


def finished_result(job: ShardJob) -> ShardResult | None:
    """The recorded result if this exact shard was already committed, else None.

    An unreadable or incomplete record (older format without ``key_digest``, a damaged file) means
    the shard is rebuilt: the record is a cache of the shard's result, never the only copy of it.
    """
    try:
        record = ShardResult.from_json(job.store.read_bytes(job.journal_name))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.info("%s: journal record unusable (%s: %s); rebuilding the shard", job.plan.name, type(exc).__name__, exc)
        return None
    if record.fingerprint != job.fingerprint or job.store.size(job.plan.name) != record.bytes:
        return None
    return record


def write_shard(job: ShardJob, report: Callable[[int], None]) -> ShardResult:
    """Encode the planned inputs in order into a staged tar, journal the result, publish the tar.

    Publishing comes last and any older object under the final name is removed before the journal
    record is written, so "final object exists and its record matches" implies it is this content.
    """
    rejects: list[Reject] = []
    keys: list[str] = []
    with job.store.staged_file(job.plan.name) as raw:
        sink = _HashingWriter(raw)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for item in job.plan.items:
                try:
                    encoded = job.pre_encoded.get(item.key)
                    if encoded is None:
                        encoded = isolated.encode(job.encoder, item, job.input_options, job.item_timeout)
                    elif isinstance(encoded, str):  # rejected while calibrating: the same reason again
                        raise RejectError(encoded)
                except RejectError as exc:
                    rejects.append(Reject(item.source, str(exc)))
                else:
                    add_sample(tar, item.key, job.encoder.extension, encoded.data, item.label_index, encoded.meta)
                    keys.append(item.key)
                report(1)
        result = ShardResult(
            index=job.plan.index,
            name=job.plan.name,
            inputs=len(job.plan.items),
            samples=len(keys),
            bytes=sink.size,
            sha256=sink.digest.hexdigest(),
            key_digest=format_digest(keys_digest(keys)),
            rejects=tuple(rejects),
            fingerprint=job.fingerprint,
        )
        job.store.remove(job.plan.name)
        job.store.write_bytes(job.journal_name, result.to_json())
    return result


def add_sample(tar: tarfile.TarFile, key: str, extension: str, payload: bytes, label_index: int, meta: dict) -> None:
    """Write one WebDataset sample: `{key}.{ext}`, `{key}.cls`, `{key}.json`."""
    if not is_sample_key(key):
        raise ValueError(f"unsafe sample key {key!r}")
    _add_member(tar, f"{key}.{extension}", payload)
    _add_member(tar, f"{key}.cls", str(label_index).encode("ascii"))
    _add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular-file member with fixed header fields, so equal content gives equal bytes."""
    if not _MEMBER.match(name):
        raise ValueError(f"unsafe tar member name {name!r}")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _HashingWriter(io.RawIOBase):
    """Forwards writes and hashes them, so a shard's sha256 costs no second read."""

    def __init__(self, target: Any) -> None:
        super().__init__()
        self._target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._target.write(view)
        self.digest.update(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size
