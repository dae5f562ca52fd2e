"""Delivery into Ray Train: the datasets handed to a TorchTrainer, read with get_dataset_shard."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from data_helpers import shard_keys, small_config


def _train_fn(config: dict[str, Any]) -> None:
    import ray.train

    from pipeline.data.loader import ShardLoader

    rank = ray.train.get_context().get_world_rank()
    record: dict[str, Any] = {}
    train, val = ShardLoader.for_train_worker("train"), ShardLoader.for_train_worker("val")
    for epoch in range(2):
        record[f"train{epoch}"] = [[vid for vid in b["video_id"]] for b in train.epoch(epoch)]
        record[f"stats{epoch}"] = train.stats.to_dict()
    record["val"] = [[f"{vid}/{int(view)}" for vid, view in zip(b["video_id"], b["view"])] for b in val.epoch(0)]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_torch_trainer_workers_read_their_own_equal_splits(
    kinetics_shards: Path, tmp_path: Path, ray_cluster: None
) -> None:
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.loader import EpochStats
    from pipeline.data.service import build_datasets, ray_train_data_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module
    cfg = small_config(str(kinetics_shards))
    cfg.decoder.max_actors = 1
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets=build_datasets(cfg),
        dataset_config=ray_train_data_config(cfg),
        run_config=RunConfig(name="data-split", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train_keys = set(shard_keys(kinetics_shards, "train"))
    for epoch in range(2):
        parts = [{k for batch in rank[f"train{epoch}"] for k in batch} for rank in ranks]
        assert len(ranks[0][f"train{epoch}"]) == len(ranks[1][f"train{epoch}"])
        assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == train_keys
        total = EpochStats.merge([EpochStats(**{**r[f"stats{epoch}"], "failures": []}) for r in ranks])
        assert total.complete and total.samples == len(train_keys)
    views = sorted(v for rank in ranks for batch in rank["val"] for v in batch)
    assert views == sorted(f"{k}/{v}" for k in shard_keys(kinetics_shards, "val") for v in range(3))
