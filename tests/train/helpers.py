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


def demo_overrides(shards: Path, runs: Path, **extra: object) -> list[str]:
    """Overrides that make the demo config a small deterministic test job: storage and a SQLite MLflow
    store in ``runs``, 2 epochs, evaluated each epoch on 1 clip, logged every step, small CPU shares."""
    values: dict[str, object] = {
        "data.root": str(shards),
        "trainer.storage_path": str(runs),
        "tracking.tracking_uri": f"sqlite:///{runs}/mlflow.db",
        "tracking.log_every_steps": 1,
        "tracking.log_system_metrics": False,
        "trainer.epochs": 2,
        "trainer.eval_every_epochs": 1,
        "data.sampling.eval_clips": 1,
        "data.decoder.num_cpus": 0.25,
        "trainer.cpus_per_worker": 0.5,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
