"""Helpers of the reliability cases that run the preprocessing CLI: the command, shard contents, S3 listings."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "preprocessing", *args]


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment (fake AWS credentials once ``s3_server`` ran) plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m preprocessing ARGS`` in a fresh interpreter, exactly as a user runs it."""
    result = subprocess.run(cli_command(*args), cwd=REPO, env=env or cli_env(), capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"CLI failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def published(root: Path) -> dict[str, bytes]:
    """The objects a shard set publishes at final names (shards, manifests, rejects), by name."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()} if root.exists() else {}


def s3_objects(url: str, storage_options: dict[str, Any]) -> dict[str, bytes]:
    """Every object under an ``s3://bucket/prefix`` URL, by name relative to the prefix."""
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    fs.invalidate_cache()
    root = url.removeprefix("s3://").rstrip("/")
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def shard_samples(data: bytes | Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: payload}) of every sample of an intact shard, in tar order."""
    import io

    fileobj = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")
    samples: dict[str, dict[str, bytes]] = {}
    with fileobj, tarfile.open(fileobj=fileobj) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def shard_keys(root: Path, split: str) -> dict[str, list[str]]:
    """Shard name -> its sample keys in tar order, for every shard of a local split."""
    return {p.name: [key for key, _ in shard_samples(p)] for p in sorted(root.glob(f"{split}-*.tar"))}
