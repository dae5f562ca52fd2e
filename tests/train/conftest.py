"""A tiny real shard set for the training tests (3 classes x 4 training videos, 2 val videos each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "preprocessing", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("train_raw")
    out = tmp_path_factory.mktemp("train_shards")
    _cli("synth", "kinetics", "--out", str(raw), "--classes", "3", "--per-class", "4", "--val-per-class", "2",
         "--seconds", "2", "--fps", "15", "--size", "96x72")
    for csv in ("train.csv", "validate.csv"):
        _cli("kinetics", "--csv", str(raw / "annotations" / csv), "--videos", str(raw), "--out", str(out),
             "--short-side", "72", "--shard-samples", "4", "--workers", "1", "--no-progress")
    return out
