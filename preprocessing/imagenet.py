"""ImageNet-1k (ILSVRC2012 CLS-LOC) layouts -> work items.

Images directly inside `{root}/{split}/` are labelled from `LOC_val_solution.csv`
(`ImageId,PredictionString`, first token = WordNet id) or from the devkit ground truth
(`data/ILSVRC2012_validation_ground_truth.txt` + `data/meta.mat`); images inside
`{root}/{split}/<wnid>/` take their folder's class. That covers `train/<wnid>/*.JPEG`, the flat val
folder and the re-arranged val-in-class-folders layout with one rule.

Class index = position in the sorted WordNet ids (from LOC_synset_mapping.txt, else the devkit, else
the `train/` folder names). Label names come from LOC_synset_mapping.txt or the devkit when given.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

from preprocessing.items import Discovery, Reject, WorkItem, unique_keys
from core.media import IMAGE_SUFFIXES
from core.storage import exists, find_files, join, read_text

log = logging.getLogger(__name__)

SYNSETS_FILE = "LOC_synset_mapping.txt"
VAL_SOLUTION_FILE = "LOC_val_solution.csv"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
_DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"


@dataclass(frozen=True)
class ImageNetSource:
    """`root` holds the split folders; the label files default to well-known names in `root`."""

    root: str
    split: str
    synsets: str | None = None
    val_labels: str | None = None
    devkit: str | None = None

    def resolved(self, storage_options: dict[str, Any] | None) -> ImageNetSource:
        """Fill unset label files with the default files present in `root`."""

        def default(value: str | None, name: str) -> str | None:
            candidate = join(self.root, name)
            return value or (candidate if exists(candidate, storage_options) else None)

        return ImageNetSource(
            self.root,
            self.split,
            default(self.synsets, SYNSETS_FILE),
            default(self.val_labels, VAL_SOLUTION_FILE),
            default(self.devkit, DEVKIT_DIR),
        )


@dataclass(frozen=True)
class Synsets:
    """Sorted WordNet ids and their display names."""

    wnids: list[str]
    names: list[str]


def read_synset_mapping(url: str, storage_options: dict[str, Any] | None = None) -> Synsets:
    """`LOC_synset_mapping.txt`: one `wnid name, synonym, ...` per line."""
    pairs = {}
    for line in read_text(url, storage_options).splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            pairs[wnid] = name.strip() or wnid
    wnids = sorted(pairs)
    return Synsets(wnids, [pairs[w] for w in wnids])


def read_val_solution(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """`LOC_val_solution.csv`: image id -> wnid (first token of PredictionString)."""
    rows = csv.DictReader(io.StringIO(read_text(url, storage_options)))
    return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows if row["PredictionString"].strip()}


def read_devkit(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Synsets, dict[str, str]]:
    """Devkit `data/meta.mat` (leaf synsets, ILSVRC2012_ID -> wnid) and the val ground truth."""
    import fsspec
    import scipy.io

    with fsspec.open(join(url, "data/meta.mat"), "rb", **(storage_options or {})) as f:
        synsets = scipy.io.loadmat(f, squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if int(s["num_children"]) == 0]
    wnid_of_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    name_of = {str(s["WNID"]): str(s["words"]) for s in leaves}
    truth_url = join(url, _DEVKIT_TRUTH)
    truth = read_text(truth_url, storage_options).split() if exists(truth_url, storage_options) else []
    labels = {f"ILSVRC2012_val_{i:08d}": wnid_of_id[int(v)] for i, v in enumerate(truth, start=1)}
    wnids = sorted(name_of)
    return Synsets(wnids, [name_of[w] for w in wnids]), labels


def discover(source: ImageNetSource, storage_options: dict[str, Any] | None = None) -> Discovery:
    source = source.resolved(storage_options)
    images = find_files(join(source.root, source.split), IMAGE_SUFFIXES, storage_options)
    flat = [entry for entry in images if "/" not in entry[1]]
    synsets, flat_labels = _labels(source, bool(flat), storage_options)
    log.info("imagenet %s: %d images, %d classes", source.split, len(images), len(synsets.wnids))
    index = {wnid: i for i, wnid in enumerate(synsets.wnids)}
    found = Discovery(classes=synsets.names, class_ids=synsets.wnids)
    stems = [posixpath.splitext(posixpath.basename(relative))[0] for _, relative, _ in images]
    keys = unique_keys(sorted(set(stems)))
    seen: set[str] = set()
    for (url, relative, size), stem in zip(images, stems):
        if stem in seen:
            found.rejects.append(Reject(url, "duplicate image id in another folder"))
            continue
        seen.add(stem)
        wnid = relative.split("/", 1)[0] if "/" in relative else flat_labels.get(stem)
        if wnid is None:
            found.rejects.append(Reject(url, "no label: image id not in the validation labels"))
        elif wnid not in index:
            found.rejects.append(Reject(url, f"unknown class {wnid!r}: not in the synset list"))
        else:
            label = synsets.names[index[wnid]]
            found.items.append(WorkItem(keys[stem], url, stem, label, index[wnid], size))
    if flat:
        for image_id in sorted(set(flat_labels) - seen):
            found.rejects.append(Reject(image_id, "missing: labelled image has no file"))
    return found


def _labels(
    source: ImageNetSource, needs_flat_labels: bool, storage_options: dict[str, Any] | None
) -> tuple[Synsets, dict[str, str]]:
    """Class list and, for flat folders, image id -> wnid; from whichever label files exist."""
    devkit_synsets, flat_labels = None, {}
    if needs_flat_labels:
        if source.val_labels:
            flat_labels = read_val_solution(source.val_labels, storage_options)
        elif source.devkit:
            devkit_synsets, flat_labels = read_devkit(source.devkit, storage_options)
        else:
            raise FileNotFoundError(
                f"{source.split}/ holds images without class folders: pass --val-labels "
                f"({VAL_SOLUTION_FILE}) or --devkit ({DEVKIT_DIR})"
            )
    if source.synsets:
        return read_synset_mapping(source.synsets, storage_options), flat_labels
    if devkit_synsets is None and source.devkit:
        devkit_synsets, _ = read_devkit(source.devkit, storage_options)
    if devkit_synsets is not None:
        return devkit_synsets, flat_labels
    wnids = _class_folders(join(source.root, "train"), storage_options)
    return Synsets(wnids, list(wnids)), flat_labels


def _class_folders(url: str, storage_options: dict[str, Any] | None) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.isdir(path):
        raise FileNotFoundError(f"no class list: give --synsets ({SYNSETS_FILE}) or --devkit, or provide {url}")
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))
