"""The shard-set contract shared with the data loader: names, manifest schema, load helpers.

Layout of an output root (any fsspec URL):

    {root}/{split}-000000.tar ...      WebDataset shards, 6-digit contiguous numbering
    {root}/{split}.manifest.json       this module's `Manifest`, written last
    {root}/{split}.rejects.jsonl       {"source": ..., "reason": ...} per rejected input

The manifest is the source of truth for which shards exist: a loader should list shards with
`shard_urls`, not by globbing, so leftovers of an older run are never read.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from preprocessing.storage import Store, join

FORMAT = "mvit-shards/1"
_SPLIT_OK = re.compile(r"^[A-Za-z0-9_-]+$")


def check_split(split: str) -> str:
    """Split names become file-name prefixes, so they must be plain."""
    if not _SPLIT_OK.match(split):
        raise ValueError(f"split name {split!r} must match [A-Za-z0-9_-]+")
    return split


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_name(split: str) -> str:
    return f"{split}.manifest.json"


def rejects_name(split: str) -> str:
    return f"{split}.rejects.jsonl"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """One split of a shard set. `classes[i]` is the label name of class index i.

    `class_ids` (an addition to the base contract) holds the dataset's stable class ids in the
    same order: WordNet ids for ImageNet (whose label names are not unique, e.g. two "crane"s),
    label strings for Kinetics.
    """

    dataset: str
    split: str
    modality: str
    classes: list[str]
    num_inputs: int
    num_samples: int
    num_rejected: int
    total_bytes: int
    shards: list[ShardInfo]
    tool_version: str
    settings: dict[str, Any]
    class_ids: list[str] = field(default_factory=list)
    format: str = FORMAT

    def to_json(self) -> str:
        body = asdict(self)
        ordered = {"format": body.pop("format"), **body}
        return json.dumps(ordered, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise ValueError(f"unsupported shard-set format {data.get('format')!r}, expected {FORMAT!r}")
        fields = dict(data)
        fields["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**fields)


def load_manifest(url: str, split: str, storage_options: dict | None = None) -> Manifest:
    """Read `{url}/{split}.manifest.json` (credentials come from the environment, never args)."""
    store = Store(url, dict(storage_options or {}))
    return Manifest.from_dict(json.loads(store.read_bytes(manifest_name(check_split(split)))))


def shard_urls(url: str, manifest: Manifest) -> list[str]:
    """Full URLs of the manifest's shards, in shard-index order."""
    return [join(url, shard.name) for shard in manifest.shards]


def list_shard_urls(url: str, split: str, storage_options: dict | None = None) -> list[str]:
    """Shortcut for a loader: the shard URLs of one split, as recorded in its manifest."""
    return shard_urls(url, load_manifest(url, split, storage_options))
