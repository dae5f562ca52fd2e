"""Finding this test run's own processes by their command line (Ray sets it to ``ray::Class.method``)."""

from __future__ import annotations

import os

import psutil


def local_processes(marker: str) -> list[psutil.Process]:
    """Processes whose command line has ``marker``, in this PID namespace only: a namespace cluster's
    nodes (tests/cluster, scripts/netns-cluster) run their own Ray in their own PID namespaces, and a
    test must never signal those."""
    ours = os.readlink("/proc/self/ns/pid")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or ()):
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/pid") == ours:
                    found.append(proc)
            except OSError:  # gone meanwhile
                pass
    return found
