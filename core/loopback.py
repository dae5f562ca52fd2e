"""Keeps a Ray that this machine starts for itself on 127.0.0.1.

Used by every place that starts a private Ray (the training driver without ``RAY_ADDRESS``,
``python -m preprocessing --ray local``, the local cluster of the demo and the tests, the benchmarks).
"""

from __future__ import annotations

import os
import sys

# Ray 2.60 on Linux replaces a loopback node address (``--node-ip-address 127.0.0.1``,
# ``ray.init(_node_ip_address="127.0.0.1")``) by the machine's routable address
# (``services.resolve_ip_for_localhost``), and its GCS, raylet, agents, client server and every worker's
# gRPC server then listen on that address or on all interfaces. With this variable at 0 Ray uses its
# single-machine mode (the default on macOS and Windows): the node address stays 127.0.0.1 and every
# server binds to it. Its only other effect is that no second node can join, which a private local
# cluster never wants. With it, ``ray.init(address="local")`` needs no ``_node_ip_address`` (which alone
# would not help: Ray resolves it through the same routable-address lookup).
#
# The variable and ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` are Ray internals: ray is pinned to
# the tested minor version in pyproject.toml and tests/test_private_apis.py checks both (docs/versions.md).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def loopback_env() -> dict[str, str]:
    """Environment for a Ray head (and its workers) that must listen on 127.0.0.1 only."""
    return dict(LOOPBACK_ENV)


def keep_ray_on_loopback() -> None:
    """Makes a Ray that this process starts (``ray.init(address="local")``) listen on 127.0.0.1 only.

    Sets ``LOOPBACK_ENV`` in this process's environment (inherited by the Ray processes it starts) and in
    Ray's constants if Ray was already imported (they are read at import time).
    """
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
