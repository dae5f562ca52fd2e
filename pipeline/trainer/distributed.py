"""Ray Train's torch backend, with torch.distributed kept on loopback for single-machine jobs.

Ray Train makes rank 0 host torch's rendezvous store (``TCPStore``, unauthenticated) at
MASTER_ADDR:MASTER_PORT, and torch binds it to every network interface whatever MASTER_ADDR says. On a
local cluster (MASTER_ADDR 127.0.0.1: ``python pipeline/train.py`` or ``scripts/demo.sh``) that would be
the one port of the job open beyond this machine. ``LoopbackTorchConfig`` runs
``bind_torch_store_to_loopback`` on every worker before the process group is set
up, which keeps the store and gloo's sockets on loopback; on a multi-node cluster (any other
MASTER_ADDR) it changes nothing.

Neither library has a public hook for this, so it rests on three internals, all guarded by
tests/test_private_apis.py and listed in docs/versions.md (torch and Ray are pinned to the tested minor
versions): ``ray.train.torch.config._TorchBackend`` (subclassed: the only place that runs code on every
worker before ``init_process_group``), the worker group's ``execute``, and
``torch.distributed.rendezvous._create_c10d_store`` (wrapped: where ``env://`` and ``tcp://`` rendezvous
create the store; ``_agent_store_serves`` is read when present).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_loopback_stores: list = []  # the pre-created servers must outlive the call that made them


def bind_torch_store_to_loopback() -> None:
    """Run in each Ray Train worker before its process group is set up
    (``pipeline.trainer.distributed.LoopbackTorchConfig``): the torch.distributed rendezvous store of a job
    whose rank 0 is on 127.0.0.1 listens on 127.0.0.1 only.

    Ray Train makes rank 0 host torch's ``TCPStore`` at MASTER_ADDR:MASTER_PORT, and torch binds that
    server to every interface whatever MASTER_ADDR says (it has no bind-address option; the store is
    unauthenticated). When MASTER_ADDR is a loopback address (a local single-node cluster), this creates
    the store's server first on a socket bound to that address (``master_listen_fd``, multi-tenant), and
    torch's own store creation then shares it. Any other MASTER_ADDR (a real cluster) is left alone, and
    if torch's internals differ from what this expects, nothing is changed.
    """
    try:
        import importlib

        from torch.distributed import TCPStore

        # The module, not ``torch.distributed.rendezvous`` the function of the same name.
        rendezvous = importlib.import_module("torch.distributed.rendezvous")
    except ImportError:
        return
    original = getattr(rendezvous, "_create_c10d_store", None)
    agent_store_serves = getattr(rendezvous, "_agent_store_serves", lambda hostname, port: False)
    if original is None or getattr(original, "_mvit_loopback", False):
        return

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):  # noqa: ANN001, ANN202
        if hostname in _LOOPBACK_HOSTS and "GLOO_SOCKET_IFNAME" not in os.environ:
            # Every rank is on this machine: gloo's own listeners (created right after the store) go on
            # the loopback interface too, instead of the address the host name resolves to.
            loopback = _loopback_interface()
            if loopback:
                os.environ["GLOO_SOCKET_IFNAME"] = loopback
        if rank == 0 and hostname in _LOOPBACK_HOSTS and not agent_store_serves(hostname, port):
            family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
                sock.listen(1024)
                store = TCPStore(hostname, port, world_size, True, timeout, multi_tenant=True,
                                 master_listen_fd=sock.fileno(), use_libuv=use_libuv)
                _loopback_stores.append((sock, store))
            except Exception as err:  # noqa: BLE001 - never fail the job over this: torch's default applies
                sock.close()
                print(f"warning: torch.distributed store not bound to loopback ({err})", file=sys.stderr)
        return original(hostname, port, rank, world_size, timeout, use_libuv)

    create_store._mvit_loopback = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create_store


def _loopback_interface() -> str | None:
    """The name of the network interface holding 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return None


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        worker_group.execute(bind_torch_store_to_loopback)
        super().on_start(worker_group, backend_config)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group stays on loopback when all ranks are on 127.0.0.1."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend
