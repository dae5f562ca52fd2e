"""Finding this test run's own processes by their command line (Ray sets it to ``ray::Class.method``)."""

from __future__ import annotations

import os

import psutil


def local_processes(marker: str) -> list[psutil.Process]:
    """This test process's descendants whose command line has ``marker``, in its PID namespace.

    The session's Ray (``ray.init(address="local")`` in tests/conftest.py) starts its raylet as a child of
    this process, and the raylet starts every worker, also those of a job submitted to it from a
    subprocess: all are descendants. Another test session on the machine, or a namespace cluster's nodes
    (tests/cluster, scripts/netns-cluster, in their own PID namespaces), run Ray processes that are not,
    and a test must never count or signal those."""
    ours = os.readlink("/proc/self/ns/pid")
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(marker in part for part in proc.cmdline()) and os.readlink(f"/proc/{proc.pid}/ns/pid") == ours:
                found.append(proc)
        except (psutil.Error, OSError):  # gone meanwhile
            pass
    return found
