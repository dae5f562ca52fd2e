"""Ray Train's torch backend, with torch.distributed kept on loopback for single-machine jobs.

Ray Train makes rank 0 host torch's rendezvous store (``TCPStore``, unauthenticated) at
MASTER_ADDR:MASTER_PORT, and torch binds it to every network interface whatever MASTER_ADDR says. On a
local cluster (MASTER_ADDR 127.0.0.1: ``python pipeline/train.py`` or ``scripts/demo.sh``) that would be
the one port of the job open beyond this machine. ``LoopbackTorchConfig`` runs
``pipeline.local_cluster.bind_torch_store_to_loopback`` on every worker before the process group is set
up, which keeps the store and gloo's sockets on loopback; on a multi-node cluster (any other
MASTER_ADDR) it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from pipeline.local_cluster import bind_torch_store_to_loopback


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
