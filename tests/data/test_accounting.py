"""Epoch accounting without Ray: the key digest shared with preprocessing, what a worker's batch adds to
``EpochStats`` (pads, views, failures with and without a key), and merging workers' stats."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from pipeline.data.loader import EpochStats, ShardLoader
from pipeline.data.plan import FAILED, OK, PAD, DatasetFacts
from pipeline.data.service import CONTEXT_KEY
from core.manifest import (
    Manifest,
    ShardInfo,
    add_digests,
    format_digest,
    keys_digest,
    parse_digest,
    sample_key_hash,
)


def test_key_digest_is_stable_order_independent_and_counts_repeats() -> None:
    # Pinned: the manifests on disk and every data-service process must keep agreeing on this value.
    expected = int.from_bytes(hashlib.sha256(b"mvit-sample-key\0abc_123").digest()[:8], "little")
    assert sample_key_hash("abc_123") == expected
    keys = ["a", "b", "c", "d"]
    assert keys_digest(keys) == keys_digest(reversed(keys))
    assert keys_digest(keys) == add_digests([keys_digest(keys[:1]), keys_digest(keys[1:])])
    assert keys_digest([]) == 0
    assert keys_digest(["a", "a", "c", "d"]) != keys_digest(keys)  # "b" lost, "a" twice: same count, caught
    assert parse_digest(format_digest(keys_digest(keys))) == keys_digest(keys)
    assert len(format_digest(5)) == 16
    for bad in ("ABCDEF0123456789", "123", "g" * 16, None):
        with pytest.raises(ValueError):
            parse_digest(bad)  # type: ignore[arg-type]


def _manifest(*digests: str | None) -> Manifest:
    shards = [ShardInfo(f"train-{i:06d}.tar", 1, 10, "ab" * 32, d) for i, d in enumerate(digests)]
    return Manifest("kinetics", "train", "video", ["x"], len(shards), len(shards), 0, 10 * len(shards), shards,
                    "0", {})  # fmt: skip


def test_split_digest_is_the_sum_of_shard_digests_or_unknown() -> None:
    a, b = format_digest(keys_digest(["k1", "k2"])), format_digest(keys_digest(["k3"]))
    assert _manifest(a, b).split_key_digest() == keys_digest(["k1", "k2", "k3"])
    assert _manifest(a, None).split_key_digest() is None
    with pytest.raises(ValueError):
        ShardInfo("train-000000.tar", 1, 10, "ab" * 32, "not a digest")


class _Context:
    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def get_config(self, key: str) -> Any:
        return self.info if key == CONTEXT_KEY else None


class _Iterator:
    """Just enough of a Ray ``DataIterator`` for ``ShardLoader`` to read the dataset's info."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.context = _Context(info)

    def get_context(self) -> _Context:
        return self.context


def _rows(entries: list[tuple[str, int, int]]) -> dict[str, np.ndarray]:
    """Decoder output rows from (key, status, view)."""
    n = len(entries)
    return {
        "video_id": np.array([k for k, _, _ in entries], dtype=object),
        "status": np.array([s for _, s, _ in entries]),
        "view": np.array([v for _, _, v in entries]),
        "error": np.array(["boom" if s == FAILED else "" for _, s, _ in entries], dtype=object),
        "video": np.zeros((n, 3, 1, 2, 2), dtype=np.uint8),
        "label": np.zeros(n, dtype=np.int64),
    }


def test_a_batch_adds_first_views_of_keyed_samples_to_the_fingerprint() -> None:
    no_cursor: Any = None  # _collect never talks to the epoch cursor
    info = DatasetFacts(4, per_unit=3, views=2, cursor=no_cursor, modality="video", train=True, seed=1, key_digest=12345)
    loader = ShardLoader(_Iterator(info), rank=0, world_size=1)  # type: ignore[arg-type]
    assert loader.split_digest == 12345
    stats = EpochStats(0, 0, 4, expected_digest=12345)
    rows = _rows([
        ("good", OK, 0), ("good", OK, 1),  # two views: one sample
        ("bad", FAILED, 0), ("bad", FAILED, 1),  # does not decode, but its key is known
        ("train-000001.tar#2", FAILED, 0), ("train-000001.tar#2", FAILED, 1),  # never read: no key
        ("", PAD, 0), ("", PAD, 0),
    ])  # fmt: skip
    batch = loader._collect(rows, stats, epoch=0, step=0)
    assert batch["video_id"] == ["good", "good"] and batch["video"].shape[0] == 2
    assert (stats.samples, stats.views, stats.failed, stats.unkeyed, stats.pad_rows) == (1, 2, 2, 1, 2)
    assert stats.fingerprint == keys_digest(["good", "bad"])
    assert [key for key, _ in stats.failures] == ["bad", "train-000001.tar#2"]
    assert not stats.identity_checkable  # an unkeyed failure: the fingerprint cannot match the manifest


def test_merge_adds_workers_parts_and_refuses_other_epochs_or_datasets() -> None:
    digest = keys_digest(["a", "b", "c"])
    parts = [EpochStats(2, 0, 3, samples=2, fingerprint=keys_digest(["a", "c"]), expected_digest=digest),
             EpochStats(2, 0, 3, failed=1, fingerprint=keys_digest(["b"]), expected_digest=digest)]  # fmt: skip
    total = EpochStats.merge(parts)
    assert total.complete and total.fingerprint == total.expected_digest == digest
    assert total.identity_checkable
    assert EpochStats(**total.to_dict()) == total  # what Ray Train reports and tests rebuild
    assert "data/unkeyed" in total.as_metrics()
    with pytest.raises(ValueError):
        EpochStats.merge([parts[0], EpochStats(2, 0, 3, expected_digest=None)])
    with pytest.raises(ValueError):
        EpochStats.merge([parts[0], EpochStats(3, 0, 3, expected_digest=digest)])
    resumed = EpochStats.merge([EpochStats(2, 1, 2, expected_digest=None)])
    assert not resumed.identity_checkable


def _part(epoch: int, start: int, expected: int, keys: list[str], failed: list[str] = ()) -> EpochStats:
    stats = EpochStats(epoch, start, expected)
    stats.samples, stats.failed = len(keys), len(failed)
    stats.fingerprint = keys_digest([*keys, *failed])
    return stats


def test_an_epoch_resumed_on_another_world_size_is_checked_whole_with_its_carry() -> None:
    """The merged figures at a checkpoint (the carry) plus the resumed part equal the whole epoch, so the
    identity check covers an epoch resumed after a restart or an elastic resize, and still catches a duplicate."""
    keys = [f"k{i:02d}" for i in range(10)]
    digest = keys_digest(keys)
    first = EpochStats.merge([_part(3, 0, 10, keys[0:2], failed=["k02"]), _part(3, 0, 10, keys[3:4])])
    carry = first.carry()
    assert carry == {"position": 4, "samples": 3, "failed": 1, "unkeyed": 0, "fingerprint": keys_digest(keys[:4])}
    # resumed at 4 on one worker, checkpointed again at 7, then resumed at 7 on three workers
    middle = _part(3, 4, 6, keys[4:7])
    carry2 = middle.carry(carry)
    assert carry2["position"] == 7 and carry2["samples"] == 6
    last = EpochStats.merge([_part(3, 7, 3, keys[7:8]), _part(3, 7, 3, keys[8:9]), _part(3, 7, 3, keys[9:10])])
    assert not last.identity_checkable  # alone, the rest of an epoch cannot be checked
    whole = last.with_carry(carry2, digest)
    assert whole.start == 0 and whole.expected == 10 and whole.complete and whole.identity_checkable
    assert whole.fingerprint == digest and (whole.samples, whole.failed) == (9, 1)
    wrong = _part(3, 7, 3, ["k00", "k08", "k09"])  # k07 lost, k00 twice: the counts agree, the identity does not
    assert wrong.with_carry(carry2, digest).complete
    assert wrong.with_carry(carry2, digest).fingerprint != digest
    # a carry that does not end where the epoch resumed is not used (counts only, as without one)
    assert last.with_carry(carry, digest) is last
    with pytest.raises(ValueError, match="carry from position 0 for an epoch resumed at 4"):
        middle.carry(first.carry() | {"position": 0})
