"""Produce one split of a shard set: plan, skip finished shards, encode the rest, write the manifest.

The order of writes is what makes a shard set trustworthy: shards (each atomic) first, then
`{split}.rejects.jsonl`, then `{split}.manifest.json` last. A manifest therefore only exists for a
complete split, and a crashed run is finished by running the same command again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from preprocessing import __version__, isolated
from preprocessing.items import Discovery, Reject
from core.manifest import UNLABELED, Manifest, ShardInfo, check_split, manifest_name, rejects_name
from preprocessing.parallel import ParallelConfig, run_jobs
from preprocessing.shards import (
    Calibration,
    ShardingConfig,
    ShardJob,
    ShardResult,
    calibrate,
    finished_result,
    plan_shards,
    seeded_order,
    write_shard,
)
from core.storage import Store
from preprocessing.transcode import Encoder

log = logging.getLogger(__name__)

CALIBRATION_INPUTS = {"video": 8, "image": 32}


@dataclass(frozen=True)
class SplitJob:
    """One split to produce. `storage_options` are for `out`, `input_options` for the raw inputs;
    `source_settings` = discovery options that change the output (recorded in the manifest);
    `item_timeout` = seconds one input may take to encode before it is stopped and rejected."""

    dataset: str
    split: str
    out: str
    encoder: Encoder
    sharding: ShardingConfig
    storage_options: dict[str, Any] = field(default_factory=dict)
    input_options: dict[str, Any] = field(default_factory=dict)
    source_settings: dict[str, Any] = field(default_factory=dict)
    item_timeout: float | None = isolated.DEFAULT_ITEM_TIMEOUT_S


@dataclass(frozen=True)
class SplitReport:
    manifest: Manifest
    shards_reused: int
    seconds: float

    def summary(self, out: str) -> str:
        m = self.manifest
        return (
            f"{m.dataset}/{m.split}: {m.num_inputs} inputs = {m.num_samples} written + {m.num_rejected} rejected; "
            f"{len(m.shards)} shard{'s' if len(m.shards) != 1 else ''} ({self.shards_reused} already complete), "
            f"{m.total_bytes / 1e6:.1f} MB, "
            f"{self.seconds:.1f}s -> {out} (rejects: {rejects_name(m.split)})"
        )


def run_split(job: SplitJob, discovery: Discovery, parallel: ParallelConfig) -> SplitReport:
    try:
        return _run_split(job, discovery, parallel)
    finally:
        isolated.close()  # this process's encoder child (calibration, in-process shards)


def _run_split(job: SplitJob, discovery: Discovery, parallel: ParallelConfig) -> SplitReport:
    started = time.monotonic()
    split = check_split(job.split)
    store = Store(job.out, job.storage_options)
    store.ensure_root()
    store.remove_stale_temps(lambda name: _belongs_to_split(name, split))

    ordered = seeded_order(discovery.items, job.sharding.seed)
    calibration = Calibration(None, {})
    if job.sharding.shard_bytes is not None:
        count = CALIBRATION_INPUTS[job.encoder.modality]
        log.info("estimating output size from %d inputs", min(count, len(ordered)))
        calibration = calibrate(ordered, job.encoder, job.input_options, count, job.item_timeout)
    rate = calibration.bytes_per_weight
    plans = plan_shards(ordered, split, job.sharding, rate)
    settings = {
        "source": job.source_settings,
        "encoder": job.encoder.settings(),
        "sharding": {**asdict(job.sharding), "estimated_bytes_per_weight_unit": rate},
    }
    shard_jobs = [
        ShardJob(plan, split, store, job.encoder, job.input_options, _fingerprint(settings, split, plan),
                 calibration.for_items(plan.items), job.item_timeout)
        for plan in plans
    ]  # fmt: skip

    results: list[ShardResult] = []
    todo: list[ShardJob] = []
    for shard_job in shard_jobs:
        done = finished_result(shard_job)
        if done is None:
            todo.append(shard_job)
        else:
            results.append(done)
    log.info("%s: %d shards planned, %d already complete", split, len(shard_jobs), len(results))
    units = sum(len(j.plan.items) for j in todo)
    results.extend(run_jobs(write_shard, todo, units, job.encoder.modality, parallel))
    results.sort(key=lambda r: r.index)
    _warn_about_leftovers(store, split, len(plans))

    rejects = sorted([*discovery.rejects, *(r for res in results for r in res.rejects)], key=lambda r: (r.source, r.reason))
    not_written = {r.source for r in rejects}  # discovery's rejects never became items
    unlabeled = sum(item.label_index == UNLABELED and item.source not in not_written
                    for plan in plans for item in plan.items)  # fmt: skip
    manifest = Manifest(
        dataset=job.dataset,
        split=split,
        modality=job.encoder.modality,
        classes=discovery.classes,
        class_ids=discovery.class_ids,
        num_inputs=discovery.num_inputs,
        num_samples=sum(r.samples for r in results),
        num_rejected=len(rejects),
        total_bytes=sum(r.bytes for r in results),
        shards=[ShardInfo(r.name, r.samples, r.bytes, r.sha256, r.key_digest) for r in results],
        tool_version=__version__,
        settings=settings,
        num_unlabeled=unlabeled,
    )
    if manifest.num_inputs != manifest.num_samples + manifest.num_rejected:
        raise AssertionError(f"bookkeeping error: {manifest.num_inputs} inputs != {manifest.num_samples} + {manifest.num_rejected}")
    store.write_bytes(rejects_name(split), _jsonl(rejects))
    store.write_bytes(manifest_name(split), manifest.to_json().encode("utf-8"))
    return SplitReport(manifest, sum(r.reused for r in results), time.monotonic() - started)


def _fingerprint(settings: dict[str, Any], split: str, plan: Any) -> str:
    """Identity of a shard's content: settings + tool version + its inputs, in order."""
    body = {
        "tool_version": __version__,
        "settings": settings,
        "split": split,
        "shard": plan.name,
        "items": [item.fingerprint_fields() for item in plan.items],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _jsonl(rejects: list[Reject]) -> bytes:
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rejects).encode("utf-8")


def _belongs_to_split(name: str, split: str) -> bool:
    """Whether an output object name (shard, journal record, manifest, rejects) is this split's."""
    return re.fullmatch(rf"{re.escape(split)}(-\d{{6}}\.tar(\.json)?|\.manifest\.json|\.rejects\.jsonl)", name) is not None


def _warn_about_leftovers(store: Store, split: str, planned: int) -> None:
    extra = [
        name
        for name in store.list_names(f"{split}-")
        if re.fullmatch(rf"{re.escape(split)}-(\d{{6}})\.tar", name) and int(name[-10:-4]) >= planned
    ]
    if extra:
        log.warning("%d shard(s) from an earlier, larger run are not in the manifest (e.g. %s)", len(extra), extra[0])
