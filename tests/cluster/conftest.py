"""The multi-node namespace cluster (pipeline/netns_cluster.py) for the tests in this folder.

One cluster per test module (a head with 0 CPUs, a GPU-group worker and a CPU-group worker, each in its
own network namespace), built by ``start`` and always torn down by ``stop``: after the module's last
test, and also when a test fails or the run is interrupted (``start`` itself tears down what it built if
it fails half way). Needs root; without it ``start`` raises NetnsError with a one-line reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline import netns_cluster as nc


@pytest.fixture(scope="module")
def netns_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nc.NetnsCluster]:
    state_file = tmp_path_factory.mktemp("netns-cluster") / "state.json"
    cluster = nc.start(workers=2, gpu_workers=1, object_store_mb=256, state_file=state_file)
    try:
        yield cluster
    finally:
        cluster.stop(grace_s=5.0)
