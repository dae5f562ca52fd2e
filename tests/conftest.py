"""Session-wide fixtures shared by all test packages.

`s3_server` runs moto's S3 in a thread on 127.0.0.1 (the same approach as s3fs's own test suite),
with fake credentials in the environment and real AWS config files hidden, so no test can reach a
real account or any other network address.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import av  # noqa: F401  # import PyAV before anything loads decord: decord's bundled libav breaks PyAV's libvpx
import pytest

# the reliability cases' table, summary and ledger (tests/cases.py), installed here so they see every test
from tests.cases import (  # noqa: F401
    ledger,
    pytest_collection_finish,
    pytest_collection_modifyitems,
    pytest_runtest_logreport,
    pytest_terminal_summary,
)

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


class S3Location(NamedTuple):
    """An empty `s3://bucket/prefix` on the test server and the fsspec options to reach it."""

    url: str
    storage_options: dict[str, Any]
    endpoint_url: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on 127.0.0.1; fake AWS credentials are set for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _FAKE_AWS_ENV.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> S3Location:
    """A fresh bucket per test; returns (s3://bucket/prefix, storage_options, endpoint_url)."""
    import s3fs

    options = {"endpoint_url": s3_server}
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(bucket)
    fs.invalidate_cache()
    return S3Location(f"s3://{bucket}/shards", options, s3_server)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[None]:
    """A private local Ray instance on 127.0.0.1 (never an existing cluster), small object store.

    Started after the S3 test server so its workers inherit the fake credentials in the environment.
    """
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    from core.loopback import keep_ray_on_loopback

    keep_ray_on_loopback()  # every port of the test cluster on 127.0.0.1
    # The dashboard serves Ray's state API: Ray Train's PlacementGroupCleaner asks it every second, and the
    # no-hang cases read Ray's own task and actor records from it.
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_port=_free_port(),
             object_store_memory=300 * 2**20, log_to_driver=False, configure_logging=False)  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()
