"""The unit every dataset reader produces and every shard worker consumes.

Dataset modules (kinetics.py, imagenet.py) only *discover* inputs: they turn a raw layout into a
list of `WorkItem`s plus the inputs they could already reject (missing files, unknown labels).
Everything after that (planning, encoding, writing) is dataset-agnostic, so the same code path runs
for real and synthetic data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_KEY_LEN = 64


@dataclass(frozen=True)
class WorkItem:
    """One input that should become one sample.

    `weight` is what shard planning measures an input by: seconds of video when the stored video is
    the annotated segment (a pre-cut clip, or an uncut video cut with `trim`), source bytes otherwise:
    an uncut video stored whole is as long as the file, not as its segment (see shards.plan_shards).

    `segment` is in source time (seconds from the start of the annotated video). `precut`: the file
    is already cut to `segment` (a Kinetics clip file), so its time 0 is `segment[0]`; otherwise it is
    the whole annotated video, and `trim` says whether to cut it. The encoder needs the difference to
    record where the stored video lies in source time (transcode.VideoEncoder.encode).
    """

    key: str
    source: str
    source_id: str
    label: str | None
    label_index: int
    size: int
    segment: tuple[float, float] | None = None
    trim: bool = False
    precut: bool = False

    @property
    def weight(self) -> float:
        if self.segment is not None and (self.precut or self.trim):
            return max(self.segment[1] - self.segment[0], 0.0)
        return float(self.size)

    def fingerprint_fields(self) -> list:
        """What identifies this input and its sample for resume checks (path, size, label, cut)."""
        return [self.key, self.source, self.source_id, self.size, self.label, self.label_index, self.segment, self.trim,
                self.precut]


@dataclass(frozen=True)
class Reject:
    """An input that produced no sample, and why. Serialised one per line in rejects.jsonl."""

    source: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason}


@dataclass
class Discovery:
    """Result of reading a raw dataset layout: what to encode and what was rejected up front."""

    classes: list[str]
    class_ids: list[str]
    items: list[WorkItem] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        return len(self.items) + len(self.rejects)


def sanitize_key(raw_id: str) -> str:
    """A WebDataset-safe key: no dots (they split key from extension), no slashes, short.

    Over-long ids keep a readable prefix and get a hash suffix so they stay unique.
    """
    key = _KEY_UNSAFE.sub("_", raw_id) or "_"
    if len(key) > _MAX_KEY_LEN:
        key = key[: _MAX_KEY_LEN - 17] + "-" + _short_hash(raw_id, 16)
    return key


def unique_keys(raw_ids: list[str]) -> dict[str, str]:
    """Map distinct raw ids to distinct sanitized keys.

    Two ids that sanitize to the same key (e.g. "a.b" and "a_b") both get a hash suffix of their
    raw id, so the result never depends on input order.
    """
    by_key: dict[str, list[str]] = {}
    for raw in raw_ids:
        by_key.setdefault(sanitize_key(raw), []).append(raw)
    keys: dict[str, str] = {}
    for key, raws in by_key.items():
        for raw in raws:
            keys[raw] = key if len(raws) == 1 else f"{key[:_MAX_KEY_LEN - 9]}-{_short_hash(raw, 8)}"
    return keys


def _short_hash(text: str, length: int) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:length]
