"""Kinetics-400/600/700: annotation CSV + video folder -> work items.

CSV columns: `label,youtube_id,time_start,time_end,split[,is_cc]` (the label column is absent from
some test CSVs: those rows become unlabeled samples with class index -1). The DeepMind archive calls
the validation CSV `validate.csv`; its split is named "val" here.

Videos are found by file name anywhere below the given folder, so both real layouts work: flat
`{youtube_id}_{start:06d}_{end:06d}.mp4` (CVDF: train/ val/ test/) and per-class folders. Files may be
.mp4, .mkv or .webm. A full, uncut download named `{youtube_id}.{ext}` is also accepted and can be
trimmed to the annotated segment (`trim`); untrimmed, the whole video is stored and the sample's
metadata says so (`trimmed`, `start_in_source`: see transcode.VideoEncoder.encode).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import posixpath
from dataclasses import dataclass
from typing import Any

from preprocessing.items import Discovery, Reject, WorkItem, unique_keys
from core.media import VIDEO_SUFFIXES
from core.manifest import UNLABELED
from core.storage import exists, find_files, read_text

log = logging.getLogger(__name__)

_SPLIT_ALIASES = {"validate": "val", "validation": "val"}
_REQUIRED = ("youtube_id", "time_start", "time_end")


@dataclass(frozen=True)
class KineticsSource:
    """Where one split's annotations and videos are.

    `classes_from`: a CSV whose sorted unique labels define class indices, or a text file with one
    label per line in class-index order. Default: `train.csv` beside `csv` if present, else `csv`,
    so that train and val get the same indices.
    """

    csv: str
    videos: str
    classes_from: str | None = None
    trim: bool = False


@dataclass(frozen=True)
class Annotation:
    label: str | None
    youtube_id: str
    start: float
    end: float
    split: str | None

    @property
    def clip_id(self) -> str:
        return f"{self.youtube_id}_{int(self.start):06d}_{int(self.end):06d}"


@dataclass(frozen=True)
class AnnotationTable:
    """The rows of an annotation CSV that can be used, the rows that cannot (as rejects, one per row,
    named `{csv}:{line}`), and the label of every row (usable or not, for the class list)."""

    rows: list[Annotation]
    malformed: list[Reject]
    labels: set[str]


def read_annotation_table(url: str, storage_options: dict[str, Any] | None = None) -> AnnotationTable:
    """Parse an annotation CSV. A bad row (times that are not finite numbers, end before start, no
    youtube_id) becomes a reject instead of stopping the whole split: real CSVs are hand-edited."""
    reader = csv.DictReader(io.StringIO(read_text(url, storage_options)))
    missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{url}: missing column(s) {missing}; expected label,youtube_id,time_start,time_end,split")
    table = AnnotationTable([], [], set())
    for row in reader:
        label = row.get("label") or None
        if label is not None:
            table.labels.add(label)
        problem = _row_problem(row)
        if problem:
            table.malformed.append(Reject(f"{url}:{reader.line_num}", f"malformed CSV row: {problem}"))
            continue
        table.rows.append(
            Annotation(
                label=label,
                youtube_id=row["youtube_id"].strip(),
                start=float(row["time_start"]),
                end=float(row["time_end"]),
                split=row.get("split") or None,
            )
        )
    return table


def _row_problem(row: dict[str, str | None]) -> str | None:
    """Why a CSV row cannot name a clip, or None."""
    if not (row.get("youtube_id") or "").strip():
        return "empty youtube_id"
    times = []
    for column in ("time_start", "time_end"):
        text = (row.get(column) or "").strip()
        try:
            value = float(text)
        except ValueError:
            return f"{column} {text!r} is not a number"
        if not math.isfinite(value) or value < 0:
            return f"{column} {text!r} is not a finite time >= 0"
        times.append(value)
    if times[1] < times[0]:
        return f"time_end {times[1]:g} is before time_start {times[0]:g}"
    return None


def read_annotations(url: str, storage_options: dict[str, Any] | None = None) -> list[Annotation]:
    """The usable rows of an annotation CSV (see `read_annotation_table`)."""
    return read_annotation_table(url, storage_options).rows


def default_split(annotations: list[Annotation], csv_url: str) -> str:
    """The CSV's split column if it has one value, else the file name; "validate" -> "val"."""
    splits = {a.split for a in annotations if a.split}
    name = splits.pop() if len(splits) == 1 else posixpath.splitext(posixpath.basename(csv_url))[0]
    return _SPLIT_ALIASES.get(name, name)


def load_classes(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    if url.lower().endswith(".csv"):
        return sorted(read_annotation_table(url, storage_options).labels)
    return [line.strip() for line in read_text(url, storage_options).splitlines() if line.strip()]


def discover(source: KineticsSource, storage_options: dict[str, Any] | None = None) -> Discovery:
    table = read_annotation_table(source.csv, storage_options)
    annotations = table.rows
    classes_url = source.classes_from or _default_classes_csv(source.csv, storage_options)
    classes = load_classes(classes_url, storage_options)
    log.info("kinetics: %d rows in %s (%d malformed), %d classes from %s", len(annotations) + len(table.malformed),
             source.csv, len(table.malformed), len(classes), classes_url)  # fmt: skip
    class_index = {name: i for i, name in enumerate(classes)}
    videos = _index_videos(source.videos, storage_options)
    keys = unique_keys(sorted({a.clip_id for a in annotations}))

    found = Discovery(classes=classes, class_ids=list(classes), rejects=list(table.malformed))
    seen: set[str] = set()
    for row in annotations:
        clip_id = row.clip_id
        if clip_id in seen:
            found.rejects.append(Reject(clip_id, "duplicate row: clip already listed in the CSV"))
            continue
        seen.add(clip_id)
        if row.label is not None and row.label not in class_index:
            found.rejects.append(Reject(clip_id, f"label {row.label!r} is not in the class list ({classes_url})"))
            continue
        if clip_id in videos:
            (url, size), trim, precut = videos[clip_id], False, True
        elif row.youtube_id in videos:
            (url, size), trim, precut = videos[row.youtube_id], source.trim, False
        else:
            found.rejects.append(
                Reject(clip_id, f"missing: no {clip_id} or {row.youtube_id} video (.mp4/.mkv/.webm) below {source.videos}")
            )
            continue
        found.items.append(
            WorkItem(
                key=keys[clip_id],
                source=url,
                source_id=row.youtube_id,
                label=row.label,
                label_index=class_index[row.label] if row.label is not None else UNLABELED,
                size=size,
                segment=(row.start, row.end),
                trim=trim,
                precut=precut,
            )
        )
    return found


def _default_classes_csv(csv_url: str, storage_options: dict[str, Any] | None) -> str:
    sibling = posixpath.join(posixpath.dirname(csv_url), "train.csv")
    return sibling if exists(sibling, storage_options) else csv_url


def _index_videos(url: str, storage_options: dict[str, Any] | None) -> dict[str, tuple[str, int]]:
    """File stem -> (url, size). On duplicates (same clip in two folders) the first path wins."""
    index: dict[str, tuple[str, int]] = {}
    duplicates = 0
    for file_url, relative, size in find_files(url, VIDEO_SUFFIXES, storage_options):
        stem = posixpath.splitext(posixpath.basename(relative))[0]
        if stem in index:
            duplicates += 1
            continue
        index[stem] = (file_url, size)
    if duplicates:
        log.warning("kinetics: %d video files share a name with another; the first path (sorted) is used", duplicates)
    return index
