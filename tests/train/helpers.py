"""Shard sets for the training tests, made by the real preprocessing CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def preprocess(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "preprocessing", *args], check=True, capture_output=True, text=True)


def synthetic_kinetics_shards(root: Path, classes: int, per_class: int, val_per_class: int, shard_samples: int,
                              fps: int | None = None) -> Path:
    """Synthetic Kinetics videos (96x72, 2 s) -> train and val shards at short side 72 in ``root/shards``."""
    raw, out = root / "raw", root / "shards"
    preprocess("synth", "kinetics", "--out", str(raw), "--classes", str(classes), "--per-class", str(per_class),
               "--val-per-class", str(val_per_class), "--seconds", "2", "--size", "96x72",
               *(["--fps", str(fps)] if fps else []))
    for csv in ("train.csv", "validate.csv"):
        preprocess("kinetics", "--csv", str(raw / "annotations" / csv), "--videos", str(raw), "--out", str(out),
                   "--short-side", "72", "--shard-samples", str(shard_samples), "--workers", "1", "--no-progress")
    return out
