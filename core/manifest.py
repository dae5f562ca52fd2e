"""The shard-set contract shared with the data loader: names, manifest schema, load helpers.

Layout of an output root (any fsspec URL):

    {root}/{split}-000000.tar ...      WebDataset shards, 6-digit contiguous numbering
    {root}/{split}.manifest.json       this module's `Manifest`, written last
    {root}/{split}.rejects.jsonl       {"source": ..., "reason": ...} per rejected input

The manifest is the source of truth for which shards exist: a loader should list shards with
`shard_urls`, not by globbing, so leftovers of an older run are never read.

It is also the truth about which samples exist: each shard entry carries `key_digest`, an
order-independent digest of its sample keys (`keys_digest`). Summed over the shards it is the digest
of the whole split, which the data service compares with what an epoch delivered, so a sample that
was duplicated while another was lost is caught, not only a wrong count.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from core.storage import Store, join

FORMAT = "mvit-shards/1"
# Split names and sample keys become file and tar member names: no path can hide in them.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+\.tar$")

UNLABELED = -1
"""Class index of a sample without a label (e.g. the Kinetics test split): valid input for prediction,
never for training or evaluation."""
_DIGEST_TEXT = re.compile(r"^[0-9a-f]{16}$")
_DIGEST_MOD = 2**64


def check_split(split: str) -> str:
    """Split names become file-name prefixes, so they must be plain."""
    if not _SAFE_NAME.match(split):
        raise ValueError(f"split name {split!r} must match [A-Za-z0-9_-]+")
    return split


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_name(split: str) -> str:
    return f"{split}.manifest.json"


def rejects_name(split: str) -> str:
    return f"{split}.rejects.jsonl"


def check_shard_name(name: object) -> str:
    """A manifest's shard name must be a plain ``NAME.tar`` of the shard set: never a path (``/``,
    ``..``), an absolute path, a URL or a compressed tar, since readers open ``{root}/{name}`` and a
    crafted manifest would otherwise make them open whatever it names. Every reader of a manifest (the
    data service, the training driver, ``verify``) gets this check through ``load_manifest``."""
    if not isinstance(name, str) or not _SHARD_NAME.match(name):
        raise ValueError(f"shard name {name!r} in the manifest is not a plain file name of the shard set "
                         "(expected NAME.tar, NAME of letters, digits, _ and -)")
    return name


def is_sample_key(key: str) -> bool:
    """Whether ``key`` can be a sample key written by preprocessing (``[A-Za-z0-9_-]+``).

    Keys are also tar member prefixes, so the rule keeps them from naming paths; the data service
    uses it to tell a real key from a placeholder it made up for a sample it never reached.
    """
    return bool(_SAFE_NAME.match(key))


def sample_key_hash(key: str) -> int:
    """The 64-bit identity of a sample key, shared by preprocessing and the data service.

    Preprocessing records per-shard sums of these (`keys_digest`) in the manifest and the data
    service sums the same hashes over what an epoch delivered: both sides must use this one function,
    or the comparison means nothing. sha256 makes it the same in every process, Python version and
    language, and spreads keys uniformly, so two different key sets collide with probability ~2**-64.
    """
    return int.from_bytes(hashlib.sha256(b"mvit-sample-key\0" + key.encode("utf-8")).digest()[:8], "little")


def keys_digest(keys: Iterable[str]) -> int:
    """Order-independent digest of a multiset of keys: the sum of their hashes mod 2**64.

    A sum (not a hash of the sorted list) so that digests of parts add up to the digest of the whole:
    shards add up to a split, and workers' partial epochs add up to the epoch, in any order. A repeated
    key counts twice, so a duplicate plus a loss changes the digest.
    """
    return sum(sample_key_hash(key) for key in keys) % _DIGEST_MOD


def add_digests(digests: Iterable[int]) -> int:
    """The digest of the union (as multisets) of the key sets the ``digests`` stand for."""
    return sum(digests) % _DIGEST_MOD


def format_digest(digest: int) -> str:
    """The manifest's text form of a digest: 16 lowercase hex digits."""
    return f"{digest % _DIGEST_MOD:016x}"


def parse_digest(text: str) -> int:
    if not isinstance(text, str) or not _DIGEST_TEXT.match(text):
        raise ValueError(f"key digest {text!r} is not 16 lowercase hex digits")
    return int(text, 16)


@dataclass(frozen=True)
class ShardInfo:
    """One shard's manifest entry. ``key_digest`` (``format_digest(keys_digest(keys))`` of the samples
    written in the shard) is None in manifests written before it existed: the digest is then unknown."""

    name: str
    samples: int
    bytes: int
    sha256: str
    key_digest: str | None = None

    def __post_init__(self) -> None:
        check_shard_name(self.name)
        if self.key_digest is not None:
            parse_digest(self.key_digest)


@dataclass(frozen=True)
class Manifest:
    """One split of a shard set. `classes[i]` is the label name of class index i.

    `class_ids` (an addition to the base contract) holds the dataset's stable class ids in the
    same order: WordNet ids for ImageNet (whose label names are not unique, e.g. two "crane"s),
    label strings for Kinetics.

    `num_unlabeled`: samples written with class `UNLABELED` (a Kinetics test CSV has no labels); such a
    split serves prediction only. None in manifests written before the count was recorded.
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
    num_unlabeled: int | None = None
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.num_unlabeled is not None and not (isinstance(self.num_unlabeled, int)
                                                   and 0 <= self.num_unlabeled <= self.num_samples):
            raise ValueError(f"num_unlabeled {self.num_unlabeled!r} is not a count of this split's samples")

    def unlabeled_problem(self) -> str | None:
        """Why this split cannot be trained or evaluated on (None: it can, as far as the manifest says)."""
        if not self.num_unlabeled:
            return None
        return (f"{self.num_unlabeled} of {self.num_samples} samples are unlabelled (class {UNLABELED}): a split "
                "for prediction, not for training or evaluation")

    def split_key_digest(self) -> int | None:
        """Digest of every sample key of the split, or None when a shard entry lacks its digest."""
        if any(shard.key_digest is None for shard in self.shards):
            return None
        return add_digests(parse_digest(shard.key_digest) for shard in self.shards)

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
