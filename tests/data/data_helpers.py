"""Helpers for the data-service tests: a small config, W loaders driven in threads, shard contents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import ray.data

from pipeline.data.config import AugmentConfig, DataConfig, DecoderPoolConfig, SamplingConfig
from pipeline.data.loader import EpochStats, ShardLoader

REPO = Path(__file__).resolve().parents[2]
_COLUMNS = ("key", "data", "label", "meta", "kind", "pos", "unit", "epoch", "error")  # source.READ_SCHEMA


def decoder_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """A batch as ``map_batches`` hands it to the decoder: one numpy column per field of the read schema."""
    return {c: np.array([r[c] for r in rows], dtype=object) for c in _COLUMNS}


def decoder_row(key: str, data: bytes, meta: dict[str, Any], kind: int = 0, label: int = 1, pos: int = 0) -> dict[str, Any]:
    """One read row (``kind`` 0 = a sample; a BROKEN row carries the error "lost")."""
    return {"key": key, "data": data, "label": label, "meta": json.dumps(meta), "kind": kind, "pos": pos, "unit": 0,
            "epoch": 0, "error": "lost" if kind == 2 else ""}  # fmt: skip


def run_cli(*args: str) -> str:
    """``python -m preprocessing ARGS`` in a subprocess (the tool as users run it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "preprocessing", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"preprocessing {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def small_config(root: str, **overrides: Any) -> DataConfig:
    """The recipe's switches all on, at test size: 8 frames x 48 px, 2 views, batches of 4 rows."""
    cfg = DataConfig(
        root=root,
        batch_size=4,
        eval_batch_size=6,
        seed=7,
        prefetch_batches=1,
        sampling=SamplingConfig(num_frames=8, stride=2, eval_clips=3, eval_crops=1),
        augment=AugmentConfig(crop_size=48, eval_short_side=48, jitter_scales=[56, 72], repeated_aug=2),
        decoder=DecoderPoolConfig(min_actors=1, max_actors=2, num_cpus=1.0),
    )
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


def run_epoch(
    ds: ray.data.Dataset, world_size: int, epoch: int, position: int = 0, stop_after: int | None = None
) -> tuple[list[list[dict[str, Any]]], list[EpochStats], list[dict[str, int]]]:
    """Split ``ds`` into ``world_size`` order-preserving parts and read one epoch on each in a thread,
    as Ray Train workers would. Returns per rank: batches (numpy copies), stats, and the resume state
    after ``stop_after`` batches (None = the whole epoch)."""
    return run_epochs(ds, world_size, [epoch], position, stop_after)[epoch]


def run_epochs(
    ds: ray.data.Dataset, world_size: int, epochs: list[int], position: int = 0, stop_after: int | None = None,
    plan: bool = False,
) -> dict[int, tuple[list[list[dict[str, Any]]], list[EpochStats], list[dict[str, int]]]]:
    """``run_epoch`` for several epochs read one after the other by the same workers (the first from
    ``position``), with ``ShardLoader.plan(epochs)`` when ``plan``: {epoch: what run_epoch returns}."""
    iterators = ds.streaming_split(world_size, equal=True) if world_size > 1 else [ds.iterator()]
    results = {e: ([[] for _ in range(world_size)], [None] * world_size, [None] * world_size) for e in epochs}
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            loader = ShardLoader(iterators[rank], rank=rank, world_size=world_size, prefetch_batches=1)
            if plan:
                loader.plan(epochs)
            for epoch in epochs:
                batches, stats, states = results[epoch]
                for batch in loader.epoch(epoch, position if epoch == epochs[0] else 0):
                    batches[rank].append({k: (v.numpy().copy() if hasattr(v, "numpy") else v)
                                          for k, v in batch.items()})  # fmt: skip
                    if stop_after is not None and len(batches[rank]) == stop_after:
                        states[rank] = loader.state()
                stats[rank] = loader.stats
                states[rank] = states[rank] or loader.state()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    if errors:
        raise errors[0]
    return results


def epoch_through_service(root: str | Path, split: str = "train") -> tuple[list[str], EpochStats, list[dict[str, Any]]]:
    """One training epoch of ``split`` read through the real service on one decoder actor: the keys
    delivered (first view of each sample), the epoch's merged stats and the batches."""
    from pipeline.data.service import build_dataset

    cfg = small_config(str(root))
    cfg.decoder.min_actors = cfg.decoder.max_actors = 1
    batches, stats, _ = run_epoch(build_dataset(cfg, split, train=True), 1, epoch=0)
    delivered = [vid for b in batches[0] for vid, view in zip(b["video_id"], b["view"]) if view == 0]
    return delivered, EpochStats.merge(stats), batches[0]


def first_sample(root: Path, split: str = "train") -> tuple[str, bytes, dict[str, Any]]:
    """Key, video bytes and metadata of the first sample of a split's first shard."""
    with tarfile.open(root / f"{split}-000000.tar") as tar:
        key = tar.getnames()[0].rsplit(".", 1)[0]
        return key, tar.extractfile(f"{key}.mp4").read(), json.loads(tar.extractfile(f"{key}.json").read())


def shard_keys(root: Path, split: str) -> list[str]:
    """Sample keys of a split read straight from its tars (independent of the service)."""
    keys = []
    for path in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            keys += [m.name[: -len(".cls")] for m in tar.getmembers() if m.name.endswith(".cls")]
    return keys


def shard_video(root: Path, split: str, key: str) -> bytes:
    for path in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            names = tar.getnames()
            if f"{key}.mp4" in names:
                return tar.extractfile(f"{key}.mp4").read()
    raise KeyError(key)


def delivered(batches: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(video_id, view) of every row delivered, in order."""
    return [(vid, int(view)) for b in batches for vid, view in zip(b["video_id"], b["view"])]


def rows_by_id(batches: list[dict[str, Any]]) -> dict[tuple[str, int], np.ndarray]:
    return {(vid, int(view)): video for b in batches for vid, view, video in zip(b["video_id"], b["view"], b["video"])}
