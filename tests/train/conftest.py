"""A tiny real shard set for the training tests (3 classes x 4 training videos, 2 val videos each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import synthetic_kinetics_shards


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_kinetics_shards(tmp_path_factory.mktemp("train_data"), classes=3, per_class=4, val_per_class=2,
                                     shard_samples=4, fps=15)
