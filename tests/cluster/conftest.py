"""The multi-node namespace cluster (pipeline/netns_cluster.py) for the tests in this folder.

One cluster per test module, built by ``start`` and always torn down by ``stop``: after the module's last
test, and also when a test fails or the run is interrupted (``start`` itself tears down what it built if
it fails half way). Needs root: without it (or without ``ip``/``unshare``, or where namespaces cannot be
created) the tests that need a cluster fail, with the one-line reason, and are never skipped.

- ``netns_cluster``: a head with 0 CPUs, a GPU-group worker and a CPU-group worker.
- ``netns_s3_cluster``: the shape the job across nodes needs (docs/cluster.md): a head with 0 CPUs, two
  GPU-group and two CPU-group workers of 1 CPU each, and the S3 node (moto, bucket ``mvit``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline import netns_cluster as nc


def _started(**kwargs: object) -> nc.NetnsCluster:
    try:
        return nc.start(**kwargs)  # type: ignore[arg-type]
    except nc.NetnsError as err:
        pytest.fail(f"cannot start the namespace cluster: {err}", pytrace=False)


@pytest.fixture(scope="module")
def netns_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nc.NetnsCluster]:
    state_file = tmp_path_factory.mktemp("netns-cluster") / "state.json"
    cluster = _started(workers=2, gpu_workers=1, object_store_mb=256, state_file=state_file)
    try:
        yield cluster
    finally:
        cluster.stop(grace_s=5.0)


@pytest.fixture(scope="module")
def netns_s3_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nc.NetnsCluster]:
    state_file = tmp_path_factory.mktemp("netns-s3-cluster") / "state.json"
    cluster = _started(workers=4, gpu_workers=2, cpus_per_worker=1, object_store_mb=256, state_file=state_file,
                       s3=True)
    try:
        yield cluster
    finally:
        cluster.stop(grace_s=5.0)
