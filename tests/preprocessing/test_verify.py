"""`verify` passes on a good shard set and catches corrupted, truncated, missing or miscounted shards."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from shard_helpers import run_cli

from core.manifest import format_digest, keys_digest, load_manifest
from preprocessing.verify import placement_problem, verify_split


def _make_shards(raw: Path, out: Path) -> str:
    """The set every test here starts from (rerunning it on an existing output resumes); its stdout."""
    return run_cli("kinetics", "--csv", str(raw / "annotations" / "train.csv"), "--videos", str(raw / "train"),
                   "--out", str(out), "--short-side", "64", "--shard-samples", "3", "--no-progress").stdout  # fmt: skip


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({member.name.partition(".")[0] for member in tar.getmembers()})


@pytest.fixture(scope="module")
def good_shards(kinetics_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "good"
    _make_shards(kinetics_raw, out)
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
    assert re.search(r"train-000002.tar: member '[^']+' claims \d+ bytes but the shard ends before them", problems)
    assert "train-000001.tar: missing" in problems
    assert "num_inputs 10 != num_samples 8 + num_rejected 3" in problems
    assert "train.rejects.jsonl: 2 lines, manifest says 3 rejected" in problems


def test_missing_manifest(tmp_path: Path) -> None:
    assert "manifest unreadable" in verify_split(str(tmp_path), "train").problems[0]


def test_wrong_key_digest_is_caught_naming_the_shard(shards: Path) -> None:
    path = shards / "train.manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["shards"][1]
    assert entry["key_digest"] == format_digest(keys_digest(_tar_keys(shards / entry["name"])))
    # Another shard's digest: the shape of a manifest whose shards were swapped or whose keys changed.
    entry["key_digest"] = manifest["shards"][0]["key_digest"]
    path.write_text(json.dumps(manifest, indent=2))
    problems = verify_split(str(shards), "train").problems
    assert len(problems) == 1 and problems[0].startswith("train-000001.tar: key digest "), problems
    assert "sample keys are not the ones the manifest records" in problems[0]


def test_manifest_digests_add_up_to_the_split_and_older_manifests_still_load(shards: Path) -> None:
    manifest = load_manifest(str(shards), "train")
    every_key = [key for shard in manifest.shards for key in _tar_keys(shards / shard.name)]
    assert manifest.split_key_digest() == keys_digest(every_key)
    body = json.loads((shards / "train.manifest.json").read_text())
    for entry in body["shards"]:
        del entry["key_digest"]  # as written before the field existed
    (shards / "train.manifest.json").write_text(json.dumps(body, indent=2))
    assert load_manifest(str(shards), "train").split_key_digest() is None  # unknown, not an error
    assert verify_split(str(shards), "train").ok


def test_journal_records_without_key_digest_make_the_rerun_rebuild_identically(
    kinetics_raw: Path, good_shards: Path, shards: Path
) -> None:
    """Output of a version whose journal had no key digests: the rerun rebuilds those shards (it cannot
    take their digest from the record) and ends byte-identical to a fresh run, digests included."""
    records = sorted((shards / "_state" / "train").glob("*.json"))
    assert len(records) == 3
    for record in records:
        body = json.loads(record.read_text())
        del body["key_digest"]
        record.write_text(json.dumps(body, indent=1) + "\n")
    assert "(0 already complete)" in _make_shards(kinetics_raw, shards)
    for name in ["train.manifest.json", *(f"train-00000{i}.tar" for i in range(3))]:
        assert (shards / name).read_bytes() == (good_shards / name).read_bytes(), name


def test_video_placement_metadata_must_be_a_flag_and_a_time() -> None:
    """`trimmed` / `start_in_source` locate the annotated segment in the stored video; nonsense is named."""
    assert placement_problem({"trimmed": True, "start_in_source": 12.5}) is None
    assert placement_problem({"trimmed": False, "start_in_source": 0}) is None
    assert placement_problem({"segment": [1.0, 2.0]}) is None  # written before the fields existed
    for trimmed, start in (("yes", 0.0), (1, 0.0), (True, -1.0), (True, "0"), (True, True), (False, None)):
        problem = placement_problem({"trimmed": trimmed, "start_in_source": start})
        assert problem is not None and "expected true/false and a time >= 0" in problem
