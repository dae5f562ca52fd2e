"""The reliability suite: fault injection, bad input and security cases.

Every test here is one *case* of the table in docs/reliability.md (``tests/cases.py`` keeps the table, the
summary and the ``ledger`` fixture; marked tests elsewhere are cases too). This file holds the suite's own
fixtures: the shards its data cases read and the fault-injecting S3 proxy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults import FaultProxy


@pytest.fixture(scope="session")
def reliability_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kinetics-layout synthetic videos cut into shards by the real CLI: 3 classes x 4 train, x 2 val."""
    from tests.train.helpers import synthetic_kinetics_shards

    return synthetic_kinetics_shards(tmp_path_factory.mktemp("reliability_data"), classes=3, per_class=4,
                                     val_per_class=2, shard_samples=4, fps=15)

@pytest.fixture
def no_ray_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if the driver gets as far as starting or joining Ray: what it refuses, it refuses first."""
    import ray

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the driver started Ray before refusing")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def fault_proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy (``faults.FaultProxy``) in front of the session's moto S3 server.

    Point clients at ``fault_proxy.url`` (s3fs ``endpoint_url``, ``--s3-endpoint-url``,
    ``data.s3_endpoint_url``); set up the test's bucket through ``s3_server`` directly. Stopped after
    the test.
    """
    with FaultProxy(s3_server) as proxy:
        yield proxy
