"""`verify` passes on a good shard set and catches corrupted, truncated, missing or miscounted shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from shard_helpers import run_cli

from preprocessing.verify import verify_split


@pytest.fixture(scope="module")
def good_shards(kinetics_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "good"
    run_cli("kinetics", "--csv", str(kinetics_raw / "annotations" / "train.csv"), "--videos", str(kinetics_raw / "train"),
            "--out", str(out), "--short-side", "64", "--shard-samples", "3", "--no-progress")  # fmt: skip
    return out


@pytest.fixture
def shards(good_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(good_shards, copy)
    return copy


def test_good_set_passes_with_every_sample_decoded(shards: Path) -> None:
    report = verify_split(str(shards), "train", decode_per_shard=100)
    assert report.ok, report.problems
    assert (report.shards, report.samples, report.decoded) == (3, 8, 8)
    result = run_cli("verify", str(shards), "--split", "train")
    assert result.returncode == 0 and "train: OK: 3 shards, 8 samples, 3 decoded" in result.stdout


def test_flipped_byte_is_caught_by_the_cli(shards: Path) -> None:
    shard = shards / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a sample's payload: the tar still parses
    shard.write_bytes(bytes(data))
    result = run_cli("verify", str(shards), "--split", "train", check=False)
    assert result.returncode == 1
    assert "FAIL train: train-000001.tar: sha256" in result.stdout


def test_corrupted_video_payload_fails_decoding(shards: Path) -> None:
    shard = shards / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    start = data.index(b"ftyp") - 4  # first MP4 payload in the shard
    data[start : start + 400] = bytes(400)
    shard.write_bytes(bytes(data))
    problems = verify_split(str(shards), "train").problems
    assert any("sha256" in p for p in problems)
    assert any("does not decode" in p or "decoded" in p for p in problems), problems


def test_truncated_missing_and_miscounted(shards: Path) -> None:
    shard = shards / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    (shards / "train-000001.tar").unlink()
    manifest = json.loads((shards / "train.manifest.json").read_text())
    manifest["num_rejected"] += 1
    (shards / "train.manifest.json").write_text(json.dumps(manifest))
    problems = "\n".join(verify_split(str(shards), "train").problems)
    assert "train-000002.tar: 5000 bytes" in problems
    assert "train-000002.tar: unreadable tar" in problems or "train-000002.tar: 1 samples" in problems
    assert "train-000001.tar: missing" in problems
    assert "num_inputs 10 != num_samples 8 + num_rejected 3" in problems
    assert "train.rejects.jsonl: 2 lines, manifest says 3 rejected" in problems


def test_missing_manifest(tmp_path: Path) -> None:
    assert "manifest unreadable" in verify_split(str(tmp_path), "train").problems[0]
