"""Helpers for the preprocessing tests: run the CLI for real, read shards back with webdataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import webdataset as wds

REPO = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m preprocessing ARGS` in a fresh interpreter, exactly as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "preprocessing", *args],
        cwd=REPO,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"CLI failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def output_files(root: Path) -> dict[str, bytes]:
    """Every published object of a shard set (shards, manifests, rejects), by name."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def read_manifest(root: Path, split: str) -> dict[str, Any]:
    return json.loads((root / f"{split}.manifest.json").read_text())


def read_rejects(root: Path, split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (root / f"{split}.rejects.jsonl").read_text().splitlines()]


def read_samples(urls: list[str]) -> list[dict[str, Any]]:
    """Samples as the loader sees them (webdataset), with .cls and .json decoded."""
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample["cls"] = int(sample["cls"])
        sample["json"] = json.loads(sample["json"])
        samples.append(sample)
    return samples
