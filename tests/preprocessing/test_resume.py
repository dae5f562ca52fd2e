"""Determinism and crash-resume: a SIGKILLed run, rerun, must equal an uninterrupted run byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shard_helpers import REPO, cli_env, output_files, read_manifest, run_cli


def _kinetics_args(raw: Path, out: Path, *extra: str) -> list[str]:
    return ["kinetics", "--csv", str(raw / "annotations" / "train.csv"), "--videos", str(raw / "train"),
            "--out", str(out), "--no-progress", *extra]  # fmt: skip


def _finished_shards(out: Path) -> list[Path]:
    return sorted(out.glob("train-*.tar")) if out.exists() else []


def test_resume_after_sigkill_is_byte_identical(kinetics_raw: Path, tmp_path: Path) -> None:
    # Upscaling to a 256 short side makes each one-clip shard take long enough to be killed between.
    args = ("--short-side", "256", "--shard-samples", "1", "--workers", "2")
    reference = tmp_path / "reference"
    run_cli(*_kinetics_args(kinetics_raw, reference, *args))
    expected = output_files(reference)
    assert len([n for n in expected if n.endswith(".tar")]) == 9

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "preprocessing", *_kinetics_args(kinetics_raw, out, *args)],
        cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(_finished_shards(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its worker processes, no cleanup of any kind
    process.wait()
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _finished_shards(out)}
    assert 2 <= len(survivors) < 9, "the run must have been killed in the middle"
    assert not (out / "train.manifest.json").exists(), "no manifest for an unfinished split"
    for name in survivors:  # whatever is published under a final name is complete and correct
        assert (out / name).read_bytes() == expected[name]

    rerun = run_cli(*_kinetics_args(kinetics_raw, out, *args))
    assert f"({len(survivors)} already complete)" in rerun.stdout
    assert output_files(out) == expected, "resumed output must equal the uninterrupted run byte for byte"
    for name, identity in survivors.items():  # finished shards were skipped, not rewritten
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == identity
    assert list((out / "_state" / "tmp").iterdir()) == [], "partial files of the killed run are cleaned up"


def test_two_runs_are_identical_whatever_the_parallelism(imagenet_raw: Path, tmp_path: Path) -> None:
    common = ["imagenet", "--root", str(imagenet_raw), "--split", "train", "--shard-samples", "4", "--no-progress"]
    run_cli(*common, "--out", str(tmp_path / "a"), "--workers", "2")
    run_cli(*common, "--out", str(tmp_path / "b"), "--workers", "1")
    first, second = output_files(tmp_path / "a"), output_files(tmp_path / "b")
    assert len(first) == 4 + 2 and first == second  # 13 inputs in shards of 4, manifest, rejects


def test_changed_settings_rebuild_every_shard(kinetics_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli(*_kinetics_args(kinetics_raw, out, "--short-side", "64", "--shard-samples", "5"))
    before = output_files(out)
    again = run_cli(*_kinetics_args(kinetics_raw, out, "--short-side", "64", "--shard-samples", "5"))
    assert "(2 already complete)" in again.stdout and output_files(out) == before
    changed = run_cli(*_kinetics_args(kinetics_raw, out, "--short-side", "64", "--shard-samples", "5", "--crf", "30"))
    assert "(0 already complete)" in changed.stdout
    assert read_manifest(out, "train")["settings"]["encoder"]["crf"] == 30
    assert output_files(out)["train-000000.tar"] != before["train-000000.tar"]
