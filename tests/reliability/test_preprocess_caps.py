"""Preprocessing caps: an input over the cap on pixels, frames or duration, or over the per-input time
limit, is a reject whose reason names the cap and the measured value; every other input is written; and
memory stays bounded where memory is the risk.

The inputs are those of the findings (issue 13, point 3), scaled down where the bound is what is tested:
an 8192x8192 H.264 file of ~200 KB, a long clip with a single keyframe, a clip whose container states a
long duration, one that states no length at all, a small file that takes minutes to transcode, a
12000x12000 PNG named .jpg, and a 64 MB remote video. The real CLI preprocesses them; peak memory is the
largest peak resident set of any process of the run (the CLI, its workers and their encoder children),
read from ``getrusage(RUSAGE_CHILDREN)`` in a small parent process that starts the CLI and nothing else.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time
import uuid
from csv import DictReader
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import s3fs
from preprocess_helpers import REPO, cli, cli_command, cli_env, shard_samples

from preprocessing.synth import SynthImageNet, SynthKinetics, synth_imagenet, synth_kinetics
from tests.preprocessing.crafted import huge_png, repeated_frame_video

WRITTEN = "written"
_SYNTH = SynthKinetics("", classes=2, per_class=2, val_per_class=0, seconds=1, fps=15, width=96, height=64, seed=11)
LABEL = _SYNTH.label(0)
# The caps of the Kinetics run, scaled down from the defaults where the bound is what is tested (the pixel
# cap keeps its default, 4096x4096); the time limit is far below what the slow input needs (minutes).
CAPS = ("--max-frames", "3000", "--max-seconds", "150", "--item-timeout", "3")
MEMORY_BOUND_MB = 150  # any one process of a local run; ~90 MB measured (the CLI with PyAV, NumPy, fsspec)
S3_MEMORY_BOUND_MB = 210  # the same with s3fs and botocore loaded; ~140 MB measured
REMOTE_INPUT_MB = 64


@dataclass(frozen=True)
class Crafted:
    """A crafted video, its CSV row's id, and the outcome expected: WRITTEN or a regex of the reason."""

    case: str
    youtube_id: str
    make: tuple  # repeated_frame_video's arguments after the path
    expect: str
    suffix: str = "mp4"

    @property
    def clip_id(self) -> str:
        return f"{self.youtube_id}_000000_000010"


CRAFTED = [
    Crafted("huge_frame_size", "hugeFrame01", (2, 8192, 8192),
            r"^over the pixel cap: 8192x8192 = 67108864 pixels \(container\) > --max-pixels 16777216$"),
    Crafted("many_frames_one_keyframe", "manyFrames1", (4000, 1280, 720, 60),
            r"^over the frame cap: 4000 frames \(container\) > --max-frames 3000$"),
    Crafted("long_stated_duration", "longDurat01", (200, 64, 48, 1),
            r"^over the duration cap: 200\.0 s \(container\) > --max-seconds 150$"),
    Crafted("no_stated_length", "noLength001", (3500, 64, 48, 60, "matroska", {"live": "1"}),
            r"^over the frame cap: more than 3000 frames decoded > --max-frames 3000$", suffix="mkv"),
    Crafted("over_the_time_limit", "overTime001", (3000, 4096, 4096, 25),
            r"^over the time limit: still encoding after 3\.\d s > --item-timeout 3 \(stopped\)$"),
    Crafted("at_the_caps", "atTheCaps01", (3, 4096, 4096, 25), WRITTEN),
]  # fmt: skip
BY_CASE = {c.case: c for c in CRAFTED}


def _measured(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int]:
    """Runs ``python -m preprocessing ARGS`` under a small parent that reports the largest peak RSS of
    the run's processes (MB). The parent is what makes the figure the CLI's own: a process started
    straight from pytest inherits pytest's peak as its starting value."""
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
               "sys.exit(code)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", wrapper, *cli_command(*args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, f"CLI failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result, int(re.findall(r"peak_rss_kb=(\d+)", result.stderr)[-1]) // 1024


def _published(out: Path) -> tuple[list[str], dict[str, str]]:
    """(sample keys written, {rejected file stem: reason}) of a local split ``train``."""
    keys = [key for path in sorted(out.glob("train-*.tar")) for key, _ in shard_samples(path)]
    rejects = [json.loads(line) for line in (out / "train.rejects.jsonl").read_text().splitlines()]
    return keys, {Path(r["source"]).stem: r["reason"] for r in rejects}


def _append_rows(csv: Path, ids: list[str]) -> list[str]:
    """Adds a row per youtube id (segment 0-10 s) to a Kinetics CSV; returns every clip id it lists."""
    lines = csv.read_text().splitlines()
    listed = [f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}" for r in DictReader(lines)]
    lines += [f'"{LABEL}",{youtube_id},0,10,train,0' for youtube_id in ids]
    csv.write_text("\n".join(lines) + "\n")
    return listed + [f"{youtube_id}_000000_000010" for youtube_id in ids]


# ---- Kinetics: every cap and the time limit in one run ------------------------------------------


@dataclass(frozen=True)
class KineticsRun:
    raw: Path
    inputs: list[str]  # clip ids
    written: list[str]
    rejects: dict[str, str]  # clip id -> reason
    summary: str
    seconds: float
    marker: str  # an environment variable set for every process of the run


@pytest.fixture(scope="module")
def kinetics_run(tmp_path_factory: pytest.TempPathFactory) -> KineticsRun:
    root = tmp_path_factory.mktemp("caps_kinetics")
    raw, out = root / "raw", root / "shards"
    synth_kinetics(SynthKinetics(str(raw), **{k: v for k, v in _SYNTH.__dict__.items() if k != "out"}))
    for crafted in CRAFTED:
        repeated_frame_video(raw / "train" / f"{crafted.clip_id}.{crafted.suffix}", *crafted.make)
    csv = raw / "annotations" / "train.csv"
    inputs = _append_rows(csv, [c.youtube_id for c in CRAFTED])
    marker = uuid.uuid4().hex
    started = time.monotonic()
    result = cli("kinetics", "--csv", str(csv), "--videos", str(raw / "train"), "--out", str(out), "--short-side", "64",
                 "--shard-samples", "3", "--shard-bytes", "0", "--workers", "2", "--no-progress", *CAPS,
                 env=cli_env(MVIT_CAPS_CASE=marker))  # fmt: skip
    seconds = time.monotonic() - started
    written, rejects = _published(out)
    return KineticsRun(raw, inputs, written, rejects, result.stdout, seconds, marker)


def test_every_video_is_written_or_rejected_over_its_cap(kinetics_run: KineticsRun, ledger: Any) -> None:
    """Videos over the pixel, frame or duration cap or over --item-timeout are rejected; every other video is written"""
    run = kinetics_run
    expected_written = len(run.inputs) - sum(c.expect != WRITTEN for c in CRAFTED)
    assert f"{len(run.inputs)} inputs = {expected_written} written + {len(run.inputs) - expected_written} rejected" in run.summary
    ledger.account(inputs=run.inputs, delivered=run.written, rejected=list(run.rejects))
    assert BY_CASE["at_the_caps"].clip_id in run.written, "a 4096x4096 video is at the default pixel cap, not over it"


@pytest.mark.parametrize("case", [c.case for c in CRAFTED if c.expect != WRITTEN])
def test_a_video_over_a_cap_is_rejected_naming_the_cap_and_the_measured_value(kinetics_run: KineticsRun,
                                                                              case: str) -> None:  # fmt: skip
    """8192x8192 frames, 4000 frames, 200 s, no stated length, minutes of work: each a reject naming cap and value"""
    crafted = BY_CASE[case]
    reason = kinetics_run.rejects.get(crafted.clip_id)
    assert reason is not None, f"{case}: not in rejects.jsonl"
    assert re.search(crafted.expect, reason), f"{case}: reason {reason!r} does not match {crafted.expect!r}"


def test_an_input_over_the_time_limit_is_stopped_at_the_limit(kinetics_run: KineticsRun) -> None:
    """The encode of a small file that needs minutes is killed at --item-timeout: the run ends in seconds, nothing left running"""
    # The over-time input is 3000 frames of 4096x4096: ~40 ms a frame to decode and scale on one core,
    # two minutes in all; stopped after 3 s, the whole run takes a few seconds.
    assert kinetics_run.seconds < 45, f"the run took {kinetics_run.seconds:.0f} s: the encode was not stopped"
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "preprocessing" in " ".join(proc.info["cmdline"] or ()) and \
                    proc.environ().get("MVIT_CAPS_CASE") == kinetics_run.marker:
                left.append(proc)
        except (psutil.Error, OSError):  # gone meanwhile, or not ours to read
            pass
    assert not left, f"processes of the run still running: {left}"


# ---- memory, where memory is the risk -------------------------------------------------------------


def test_a_huge_frame_size_is_refused_before_decoding_with_bounded_memory(kinetics_run: KineticsRun, tmp_path: Path,
                                                                           ledger: Any, record_property: Any) -> None:  # fmt: skip
    """An 8192x8192 H.264 of 200 KB is rejected from its header: no process of the run goes over 150 MB"""
    raw = tmp_path / "raw"
    synth_kinetics(SynthKinetics(str(raw), **{k: v for k, v in _SYNTH.__dict__.items() if k != "out"}))
    huge = BY_CASE["huge_frame_size"]
    shutil.copy(kinetics_run.raw / "train" / f"{huge.clip_id}.mp4", raw / "train")
    csv = raw / "annotations" / "train.csv"
    inputs = _append_rows(csv, [huge.youtube_id])
    out = tmp_path / "shards"
    _, peak = _measured("kinetics", "--csv", str(csv), "--videos", str(raw / "train"), "--out", str(out),
                        "--short-side", "64", "--shard-samples", "4", "--shard-bytes", "0", "--workers", "1",
                        "--no-progress", env=cli_env())  # fmt: skip
    record_property("peak_rss_mb", peak)
    written, rejects = _published(out)
    ledger.account(inputs=inputs, delivered=written, rejected=list(rejects))
    assert re.search(huge.expect, rejects[huge.clip_id])
    # Decoding one such frame takes ~350 MB in the encoder process (measured with --max-pixels raised).
    assert peak < MEMORY_BOUND_MB, f"peak RSS {peak} MB"


def test_a_huge_png_named_jpg_is_rejected_from_its_header_with_bounded_memory(tmp_path: Path, ledger: Any,
                                                                             record_property: Any) -> None:  # fmt: skip
    """A 12000x12000 PNG named .jpg in an ImageNet layout is rejected with its size: no process goes over 150 MB"""
    raw, out = tmp_path / "raw", tmp_path / "shards"
    synth_imagenet(SynthImageNet(str(raw), classes=2, per_class=2, val_per_class=0, quirks=False, size=64))
    wnid = (raw / "LOC_synset_mapping.txt").read_text().split()[0]
    (raw / "train" / wnid / f"{wnid}_bomb.jpg").write_bytes(huge_png(12000, 12000))
    _, peak = _measured("imagenet", "--root", str(raw), "--split", "train", "--out", str(out), "--shard-samples", "4",
                        "--shard-bytes", "0", "--workers", "1", "--no-progress", env=cli_env())  # fmt: skip
    record_property("peak_rss_mb", peak)
    written, rejects = _published(out)
    ledger.account(inputs=[p.stem for p in (raw / "train").rglob("*.*")], delivered=written, rejected=list(rejects))
    assert rejects[f"{wnid}_bomb"] == ("decompression-bomb guard (max_pixels=89478485): over the pixel cap: "
                                       "12000x12000 = 144000000 pixels (PNG header) > --max-pixels 89478485")
    assert peak < MEMORY_BOUND_MB, f"peak RSS {peak} MB (144 Mpx decoded would be 144 MB more at least)"


def _with_free_box(mp4: bytes, size: int) -> bytes:
    """The same MP4 followed by a top-level 'free' box of `size` bytes, which readers skip."""
    return mp4 + struct.pack(">I", size + 8) + b"free" + bytes(size)


def test_a_large_remote_input_is_streamed_with_bounded_memory(s3_bucket: Any, tmp_path: Path, ledger: Any,
                                                               record_property: Any) -> None:  # fmt: skip
    """A 64 MB video on S3 is streamed to a local file, not read into memory: written, no process over 210 MB"""
    raw = tmp_path / "raw"
    synth_kinetics(SynthKinetics(str(raw), classes=1, per_class=2, val_per_class=0, seconds=1, fps=15, width=96,
                                 height=64, seed=12))  # fmt: skip
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    bucket = s3_bucket.url.removeprefix("s3://").split("/")[0]
    clips = sorted((raw / "train").iterdir())
    fs.put(str(raw / "annotations" / "train.csv"), f"{bucket}/raw/train.csv")
    for index, clip in enumerate(clips):
        data = _with_free_box(clip.read_bytes(), REMOTE_INPUT_MB << 20) if index == 0 else clip.read_bytes()
        fs.pipe(f"{bucket}/raw/train/{clip.name}", data)
    out = tmp_path / "shards"
    _, peak = _measured("kinetics", "--csv", f"s3://{bucket}/raw/train.csv", "--videos", f"s3://{bucket}/raw/train",
                        "--out", str(out), "--short-side", "64", "--shard-samples", "4", "--shard-bytes", "0",
                        "--workers", "1", "--no-progress", "--s3-endpoint-url", s3_bucket.endpoint_url,
                        env=cli_env())  # fmt: skip
    record_property("peak_rss_mb", peak)
    written, rejects = _published(out)
    ledger.account(inputs=[clip.stem for clip in clips], delivered=written, rejected=list(rejects))
    assert sorted(written) == sorted(clip.stem for clip in clips) and not rejects
    # Read whole into memory (before the change), the input cost ~4.5x its size: ~580 MB for 128 MB.
    assert peak < S3_MEMORY_BOUND_MB, f"peak RSS {peak} MB for a {REMOTE_INPUT_MB} MB input"
