"""Hostile data in a shard set: manifest entries that name something outside the set, labels outside the
classes, unlabelled samples where labels are needed. Each is refused or counted by name, never trusted.

The shard sets are copies of the suite's ``reliability_shards`` (made by the real preprocessing CLI),
changed the way a crafted or damaged set would be, with manifest sizes and hashes made consistent again
so that only the planted problem is left.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from preprocess_helpers import REPO, cli

from pipeline.config import ConfigError, load_config
from pipeline.trainer.job import run
from tests.train.helpers import demo_overrides

DEMO = REPO / "configs" / "experiment" / "demo.yaml"


def _copy(shards: Path, tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    return root


def _edit_manifest(root: Path, split: str, change: Any) -> None:
    path = root / f"{split}.manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _verify(root: Path, split: str = "train") -> subprocess.CompletedProcess:
    return cli("verify", str(root), "--split", split, check=False)


# ---- names stay inside the root -------------------------------------------------------------------------------

OUTSIDE = {
    "parent folder": "../outside/other.tar",
    "absolute path": "/dev/zero",
    "URL": "s3://another-bucket/train-000000.tar",
    "sub-folder": "sub/train-000000.tar",
    "hidden traversal": "..",
    "compressed": "train-000000.tar.gz",
}


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_a_manifest_shard_name_outside_the_set_is_refused_on_load(reliability_shards: Path, tmp_path: Path,
                                                                   case: str, no_ray_start: None) -> None:  # fmt: skip
    """A manifest naming a shard outside its set (../, absolute, URL, sub-folder) is refused on load: service, verify and job, before any read."""
    from core.manifest import load_manifest
    from pipeline.data.service import build_dataset
    from tests.data.data_helpers import small_config

    name = OUTSIDE[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(reliability_shards / "train-000000.tar", outside / "other.tar")  # a real shard where ../ points
    root = _copy(reliability_shards, tmp_path / "a" / "b")
    _edit_manifest(root, "train", lambda m: m["shards"][0].update(name=name))
    says = f"shard name {name!r} in the manifest is not a plain file name of the shard set"

    with pytest.raises(ValueError, match="not a plain file name"):
        load_manifest(str(root), "train")
    with pytest.raises(ValueError, match="not a plain file name"):  # the data service, before any read task
        build_dataset(small_config(str(root)), "train", train=True)
    verified = _verify(root)
    assert verified.returncode == 1 and says in verified.stdout, verified.stdout + verified.stderr

    cfg = load_config(DEMO, demo_overrides(root, tmp_path / "runs"))
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    message = str(caught.value)
    assert "\n" not in message and "cannot read the 'train' manifest" in message and says in message, message


# ---- labels in range ------------------------------------------------------------------------------------------


def _relabel(shard: Path, labels: dict[str, bytes]) -> None:
    """Rewrite ``shard`` with the ``.cls`` of the given keys replaced (every other byte kept)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            key, _, ext = member.name.partition(".")
            if ext == "cls" and key in labels:
                data = labels[key]
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    shard.write_bytes(out.getvalue())


def test_labels_outside_the_classes_are_failed_samples_by_name(reliability_shards: Path, tmp_path: Path,
                                                               ray_cluster: None, ledger: Any) -> None:  # fmt: skip
    """Samples whose .cls is 999 or -1 in a training split are FAILED with their reason; the rest of the epoch is delivered and checked."""
    from pipeline.trainer.validation import check_epoch_counts, check_epoch_identity
    from tests.data.data_helpers import epoch_through_service, shard_keys

    root = _copy(reliability_shards, tmp_path)
    keys = shard_keys(root, "train")
    shard = root / "train-000000.tar"
    with tarfile.open(shard) as tar:
        first, second = list(dict.fromkeys(m.name.partition(".")[0] for m in tar.getmembers()))[:2]
    _relabel(shard, {first: b"999", second: b"-1"})
    data = shard.read_bytes()

    def consistent(manifest: dict[str, Any]) -> None:  # sizes and hashes match again; only the labels are wrong
        entry = manifest["shards"][0]
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        manifest["total_bytes"] = sum(s["bytes"] for s in manifest["shards"])

    _edit_manifest(root, "train", consistent)
    verified = _verify(root)
    assert f"FAIL train: train-000000.tar/{first}: class index 999 out of range" in verified.stdout, verified.stdout

    delivered, total, batches = epoch_through_service(root)
    failed = dict(total.failures)
    assert set(failed) == {first, second}, failed
    assert "label 999 is outside the split's 3 classes" in failed[first], failed
    assert "unlabelled sample (class -1)" in failed[second], failed
    labels = [int(label) for b in batches for label in b["label"]]
    assert labels and all(0 <= label < 3 for label in labels), labels
    check_epoch_counts(total, "epoch 0")
    assert check_epoch_identity(total, "epoch 0")  # the keys are genuine: the epoch is checked whole
    ledger.account(inputs=keys, delivered=delivered, rejected=failed)


def _unlabelled_csv(raw: Path) -> Path:
    """The synthetic train CSV without its label column, as Kinetics test CSVs come."""
    import csv

    with open(raw / "annotations" / "train.csv", newline="") as source:
        rows = list(csv.DictReader(source))
    path = raw / "annotations" / "test.csv"
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[f for f in rows[0] if f != "label"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, "split": "test"} for row in rows)
    return path


def test_a_split_of_unlabelled_samples_is_refused_for_training_before_any_work(
    reliability_shards: Path, tmp_path: Path, no_ray_start: None
) -> None:
    """A split with unlabelled samples (a Kinetics test CSV) is recorded as such and refused for training and evaluation before any work, with the count."""
    from core.manifest import load_manifest
    from pipeline.data.service import build_dataset
    from tests.data.data_helpers import small_config

    raw = reliability_shards.parent / "raw"
    root = _copy(reliability_shards, tmp_path)
    cli("kinetics", "--csv", str(_unlabelled_csv(raw)), "--videos", str(raw), "--out", str(root), "--short-side", "72",
        "--shard-samples", "4", "--workers", "1", "--no-progress", timeout=600)  # fmt: skip
    manifest = load_manifest(str(root), "test")
    assert manifest.num_unlabeled == manifest.num_samples == 12, manifest
    assert load_manifest(str(root), "train").num_unlabeled == 0
    verified = _verify(root, "test")
    assert verified.returncode == 0, verified.stdout  # unlabelled samples are valid input (for prediction)

    says = "12 of 12 samples are unlabelled (class -1)"
    with pytest.raises(ValueError, match=re.escape(says)):
        build_dataset(small_config(str(root)), "test", train=False)

    for key in ("data.train_split", "data.val_split"):
        cfg = load_config(DEMO, demo_overrides(root, tmp_path / "runs", **{key: "test"}))
        with pytest.raises(ConfigError) as caught:
            run(cfg)
        message = str(caught.value)
        assert "\n" not in message and "split 'test'" in message and says in message, message

