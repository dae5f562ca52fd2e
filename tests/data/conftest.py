"""Fixtures of the data-service tests: real shard sets made by the preprocessing CLI, and a small
local Ray instance (loopback only) shared by the session.

The shard sets are tiny on purpose (2 cores shared with other suites): 3 classes x 4 training
videos and 3 x 2 validation videos of 2 s at 15 fps, 64 px short side, 3 samples per shard.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_helpers import run_cli

CLASSES, PER_CLASS, VAL_PER_CLASS = 3, 4, 2


def make_kinetics_shards(raw: Path, out: str, *extra: str) -> None:
    for split, csv in (("train", "train.csv"), ("val", "validate.csv")):
        run_cli("kinetics", "--csv", str(raw / "annotations" / csv), "--videos", str(raw / split),
                "--out", out, "--short-side", "64", "--shard-samples", "3", "--workers", "1", "--no-progress",
                *extra)  # fmt: skip


@pytest.fixture(scope="session")
def kinetics_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("k_raw")
    run_cli("synth", "kinetics", "--out", str(raw), "--classes", str(CLASSES), "--per-class", str(PER_CLASS),
            "--val-per-class", str(VAL_PER_CLASS), "--seconds", "2", "--fps", "15", "--size", "96x64")  # fmt: skip
    return raw


@pytest.fixture(scope="session")
def kinetics_shards(kinetics_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k_shards")
    make_kinetics_shards(kinetics_source, str(out))
    return out


@pytest.fixture(scope="session")
def corrupt_shards(kinetics_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A copy of the training shards with two damaged videos inside valid tars: one truncated to its
    first 300 bytes, one overwritten with noise. Returns (root, damaged keys)."""
    out = tmp_path_factory.mktemp("k_corrupt")
    damaged = []
    for path in sorted(kinetics_shards.iterdir()):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.name in ("train-000000.tar", "train-000002.tar"):
            how = "truncate" if path.name.endswith("0.tar") else "noise"
            data, key = damage_first_video(data, how)
            damaged.append(key)
        (out / path.name).write_bytes(data)
    return out, damaged


def damage_first_video(tar_bytes: bytes, how: str) -> tuple[bytes, str]:
    """Rewrite a shard with its first .mp4 member damaged; member order and names are kept."""
    src = tarfile.open(fileobj=io.BytesIO(tar_bytes))
    out = io.BytesIO()
    damaged = None
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src.getmembers():
            payload = src.extractfile(member).read()
            if damaged is None and member.name.endswith(".mp4"):
                damaged = member.name[: -len(".mp4")]
                payload = payload[:300] if how == "truncate" else bytes((i * 7919 + 13) % 251 for i in range(len(payload)))
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            dst.addfile(info, io.BytesIO(payload))
    assert damaged is not None
    return out.getvalue(), damaged
