"""Something-Something v2: the official release layout -> work items, and a check of a downloaded tree.

The release (20BN, now distributed by Qualcomm after a licence acceptance):

- `20bn-something-something-v2/{id}.webm`: every video of every split in one folder (VP9, 240 px
  high, 12 fps, a few seconds each);
- `something-something-v2-labels.json`: `{template with "something" for each placeholder: "index"}`,
  e.g. `"Pushing something from left to right": "93"`, 174 classes;
- `something-something-v2-train.json` / `-validation.json`: lists of records `{"id", "label",
  "template", "placeholders"}`, e.g. `{"id": "78687", "label": "holding potato next to vicks vaporub
  bottle", "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks
  vaporub bottle"]}`;
- `something-something-v2-test.json`: records with only `id` (the test labels are not public).

The JSON files are looked for in the root and in its `labels/` and `annotations/` folders (the labels
package unzips to `labels/`), the videos in `20bn-something-something-v2/` if the root has that folder,
else in the root itself; `--annotations` / `--videos` name them directly.

A record's class is its `template` with the brackets removed ("Pushing [something] from left to
right" -> "Pushing something from left to right"), looked up in the labels file, so class indices
are the official ones (the class list is ordered by index). The validation split is written as
`val`; the test split is written unlabelled (class index `core.manifest.UNLABELED`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from core.manifest import UNLABELED
from core.storage import exists, find_files, join, read_text
from preprocessing.items import Discovery, Reject, WorkItem, unique_keys

log = logging.getLogger(__name__)

VIDEO_FOLDER = "20bn-something-something-v2"
LABELS_FILE = "something-something-v2-labels.json"
SPLIT_FILES = {
    "train": "something-something-v2-train.json",
    "validation": "something-something-v2-validation.json",
    "test": "something-something-v2-test.json",
}
OUTPUT_SPLITS = {"train": "train", "validation": "val", "test": "test"}
LABELLED_SPLITS = ("train", "validation")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation"}
_ANNOTATION_FOLDERS = ("", "labels", "annotations")
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # real ids are decimal numbers; never a path


def class_name(template: str) -> str:
    """The labels file's name for a record's template: its brackets removed."""
    return template.replace("[", "").replace("]", "")


def release_split(name: str) -> str:
    """'train' | 'validation' | 'test' for a split name as a user may type it ('val' -> 'validation')."""
    split = _SPLIT_ALIASES.get(name, name)
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown SSv2 split {name!r}; choose from train, validation (or val), test")
    return split


@dataclass(frozen=True)
class Layout:
    """Where a release's JSON files and videos are."""

    annotations: str
    videos: str

    def labels_url(self) -> str:
        return join(self.annotations, LABELS_FILE)

    def split_url(self, split: str) -> str:
        return join(self.annotations, SPLIT_FILES[release_split(split)])


def locate(root: str, storage_options: dict[str, Any] | None = None, annotations: str | None = None,
           videos: str | None = None) -> Layout:  # fmt: skip
    """The layout below `root`: the first of root, root/labels, root/annotations that holds the labels
    file (root itself when none does: the error then names the file there), and root/VIDEO_FOLDER when
    it exists, else root. `annotations` / `videos` override the search."""
    if annotations is None:
        candidates = [join(root, sub) if sub else root for sub in _ANNOTATION_FOLDERS]
        annotations = next((c for c in candidates if exists(join(c, LABELS_FILE), storage_options)), root)
    if videos is None:
        nested = join(root, VIDEO_FOLDER)
        videos = nested if exists(nested, storage_options) else root
    return Layout(annotations, videos)


# ---- the JSON files --------------------------------------------------------------------------


def _read_json(url: str, storage_options: dict[str, Any] | None) -> Any:
    try:
        return json.loads(read_text(url, storage_options))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url}: not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{url}: not UTF-8 text ({exc})") from None


def load_classes(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The labels file as the class list, ordered by index. Its indices must be exactly 0..N-1 (as
    decimal strings, or integers), each once: anything else would silently renumber classes."""
    labels = _read_json(url, storage_options)
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{url}: expected a non-empty JSON object {{template: index}}, got {type(labels).__name__}")
    by_index: dict[int, str] = {}
    for name, value in labels.items():
        text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
        if not text.isdigit():
            raise ValueError(f"{url}: class {name!r} has index {value!r}, not a whole number")
        index = int(text)
        if index in by_index:
            raise ValueError(f"{url}: index {index} is given to both {by_index[index]!r} and {name!r}")
        by_index[index] = name
    expected = set(range(len(by_index)))
    if set(by_index) != expected:
        missing = sorted(expected - set(by_index))[:5]
        extra = sorted(set(by_index) - expected)[:5]
        raise ValueError(f"{url}: class indices must be exactly 0..{len(by_index) - 1}; missing {missing}, "
                         f"out of range {extra}")  # fmt: skip
    return [by_index[i] for i in range(len(by_index))]


@dataclass(frozen=True)
class Record:
    """One usable record of a split file; `template` is None in the test split."""

    id: str
    template: str | None
    description: str | None


@dataclass
class RecordTable:
    """A split file's usable records, and its malformed ones as rejects named `{file}:{position}`."""

    records: list[Record] = field(default_factory=list)
    malformed: list[Reject] = field(default_factory=list)


def read_records(url: str, labelled: bool, storage_options: dict[str, Any] | None = None) -> RecordTable:
    """Parse a split file (a JSON list of records). A record that cannot name a video or a class
    becomes a reject instead of stopping the split; a file that is not a JSON list is an error."""
    data = _read_json(url, storage_options)
    if not isinstance(data, list):
        raise ValueError(f"{url}: expected a JSON list of records, got {type(data).__name__}")
    table = RecordTable()
    for position, raw in enumerate(data):
        problem = _record_problem(raw, labelled)
        if problem:
            table.malformed.append(Reject(f"{url}:{position}", f"malformed record: {problem}"))
            continue
        template = raw["template"] if labelled else None
        description = raw.get("label") if labelled and isinstance(raw.get("label"), str) else None
        table.records.append(Record(str(raw["id"]).strip(), template, description))
    return table


def _record_problem(raw: Any, labelled: bool) -> str | None:
    """Why a record cannot name a video (and, in a labelled split, a class), or None."""
    if not isinstance(raw, dict):
        return f"not a JSON object: {json.dumps(raw)[:80]}"
    record_id = raw.get("id")
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        return f"no usable id ({json.dumps(record_id)[:80]})"
    if not _ID.fullmatch(str(record_id).strip()):
        return f"id {str(record_id)[:80]!r} is not a plain name ([A-Za-z0-9_-], at most 128 characters)"
    if labelled:
        template = raw.get("template")
        if not isinstance(template, str) or not template.strip():
            return f"id {record_id}: no template ({json.dumps(template)[:80]})"
    return None


# ---- discovery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ssv2Source:
    """One split of a release: `split` is train, validation (or val) or test; `annotations` /
    `videos` override where `locate` looks below `root`."""

    root: str
    split: str
    annotations: str | None = None
    videos: str | None = None

    @property
    def output_split(self) -> str:
        return OUTPUT_SPLITS[release_split(self.split)]


def discover(source: Ssv2Source, storage_options: dict[str, Any] | None = None) -> Discovery:
    split = release_split(source.split)
    layout = locate(source.root, storage_options, source.annotations, source.videos)
    classes = load_classes(layout.labels_url(), storage_options)
    class_index = {name: i for i, name in enumerate(classes)}
    labelled = split in LABELLED_SPLITS
    split_url = layout.split_url(split)
    table = read_records(split_url, labelled, storage_options)
    log.info("ssv2: %d records in %s (%d malformed), %d classes from %s", len(table.records) + len(table.malformed),
             split_url, len(table.malformed), len(classes), layout.labels_url())  # fmt: skip
    videos = index_videos(layout.videos, storage_options)
    keys = unique_keys(sorted({r.id for r in table.records}))

    found = Discovery(classes=classes, class_ids=list(classes), rejects=list(table.malformed))
    seen: set[str] = set()
    for record in table.records:
        if record.id in seen:
            found.rejects.append(Reject(record.id, "duplicate record: id already listed in the split file"))
            continue
        seen.add(record.id)
        label = class_name(record.template) if record.template is not None else None
        if label is not None and label not in class_index:
            found.rejects.append(Reject(record.id, f"template {record.template!r} is not in the labels file "
                                                   f"({layout.labels_url()})"))  # fmt: skip
            continue
        if record.id not in videos:
            found.rejects.append(Reject(record.id, f"missing: no {record.id}.webm in {layout.videos}"))
            continue
        url, size = videos[record.id]
        if size == 0:
            found.rejects.append(Reject(record.id, f"empty file: {record.id}.webm has 0 bytes"))
            continue
        found.items.append(
            WorkItem(
                key=keys[record.id],
                source=url,
                source_id=record.id,
                label=label,
                label_index=class_index[label] if label is not None else UNLABELED,
                size=size,
            )
        )
    return found


def index_videos(url: str, storage_options: dict[str, Any] | None) -> dict[str, tuple[str, int]]:
    """`{id}.webm` directly in `url` -> (url, size)."""
    index: dict[str, tuple[str, int]] = {}
    for file_url, relative, size in find_files(url, (".webm",), storage_options):
        if "/" not in relative:  # the release keeps every video in one folder
            index[posixpath.splitext(relative)[0]] = (file_url, size)
    return index


# ---- checking a downloaded release -----------------------------------------------------------


@dataclass(frozen=True)
class ReleaseCheck:
    """What `check_release` found. `problems`: the release's own files that are missing or unreadable
    (then nothing else could be checked for them); `missing_videos` / `empty_videos`: per split file,
    ids without a `{id}.webm` / with an empty one (a few examples kept in `examples`);
    `unknown_templates`: train/validation records whose template is not in the labels file."""

    root: str
    annotations: str
    videos: str
    problems: tuple[str, ...]
    records: dict[str, int]
    missing_videos: dict[str, int]
    empty_videos: dict[str, int]
    unknown_templates: dict[str, int]
    malformed_records: dict[str, int]
    classes: int
    examples: tuple[str, ...]

    @property
    def ok(self) -> bool:
        counts = (self.missing_videos, self.empty_videos, self.unknown_templates, self.malformed_records)
        return not self.problems and not any(sum(c.values()) for c in counts)

    def summary(self) -> str:
        """A few lines a user can act on."""
        lines = [f"SSv2 release at {self.root}: {'OK' if self.ok else 'INCOMPLETE'}"
                 f" (JSON files in {self.annotations}, videos in {self.videos})"]  # fmt: skip
        lines += [f"  problem: {p}" for p in self.problems]
        for split in SPLIT_FILES:
            if split not in self.records:
                continue
            counts = [_count(self.records[split], "record")]
            for name, table in (("missing video", self.missing_videos), ("empty video", self.empty_videos),
                                ("unknown template", self.unknown_templates),
                                ("malformed record", self.malformed_records)):  # fmt: skip
                if table.get(split):
                    counts.append(_count(table[split], name))
            lines.append(f"  {split}: " + ", ".join(counts))
        if self.classes:
            lines.append(f"  labels: {self.classes} classes")
        lines += [f"  e.g. {example}" for example in self.examples]
        if not self.ok:
            lines.append(self._advice())
        return "\n".join(lines)

    def _advice(self) -> str:
        if sum(self.missing_videos.values()) or sum(self.empty_videos.values()):
            return (f"  fix: extract every part into {self.videos} (cat 20bn-something-something-v2-?? | tar zx), "
                    "then run the check again; `preprocessing ssv2` writes missing videos as rejects")
        if self.problems:
            return (f"  fix: unzip the labels package so that {LABELS_FILE} and the split files are in {self.annotations} "
                    "(or pass their folder explicitly)")
        return "  fix: the JSON files do not match each other; download the labels package again"


def check_release(root: str, storage_options: dict | None = None, annotations: str | None = None,
                  videos: str | None = None) -> ReleaseCheck:  # fmt: skip
    """Verify a downloaded SSv2 tree against its JSON files: the four files present and parseable, every
    train/validation/test id with a non-empty `{id}.webm`, every train/validation template in the labels
    file. Nothing is decoded; counts say what is missing."""
    layout = locate(root, storage_options, annotations, videos)
    problems: list[str] = []
    examples: list[str] = []
    classes: list[str] = []
    try:
        classes = load_classes(layout.labels_url(), storage_options)
    except (FileNotFoundError, ValueError) as exc:
        problems.append(_problem(exc, layout.labels_url()))
    try:
        index = index_videos(layout.videos, storage_options)
    except FileNotFoundError:
        problems.append(f"missing: the video folder {layout.videos}")
        index = {}
    known = set(classes)
    records, missing, empty, unknown, malformed = {}, {}, {}, {}, {}
    for split in SPLIT_FILES:
        url = layout.split_url(split)
        labelled = split in LABELLED_SPLITS
        try:
            table = read_records(url, labelled, storage_options)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(_problem(exc, url))
            continue
        records[split] = len(table.records) + len(table.malformed)
        malformed[split] = len(table.malformed)
        examples.extend(f"{r.source}: {r.reason}" for r in table.malformed[:1])
        missing[split] = empty[split] = unknown[split] = 0
        for record in table.records:
            found = index.get(record.id)
            if found is None:
                missing[split] += 1
                if missing[split] == 1 and index:
                    examples.append(f"{split} id {record.id}: no {record.id}.webm")
            elif found[1] == 0:
                empty[split] += 1
                if empty[split] == 1:
                    examples.append(f"{split} id {record.id}: {record.id}.webm is empty")
            if labelled and classes and class_name(record.template or "") not in known:
                unknown[split] += 1
                if unknown[split] == 1:
                    examples.append(f"{split} id {record.id}: template {record.template!r} not in the labels file")
    return ReleaseCheck(root, layout.annotations, layout.videos, tuple(problems), records, missing, empty, unknown,
                        malformed, len(classes), tuple(examples[:4]))  # fmt: skip


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _problem(exc: BaseException, url: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"missing: {url}"
    return str(exc)
