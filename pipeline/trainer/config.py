"""The trainer's sections of an experiment config: ``trainer:`` (cluster shape, cadence, storage) and
``optim:`` (AdamW or SGD and the schedule). Plain dataclasses with no torch, so the experiment schema
(``pipeline.config``) can be loaded and checked on a machine, or in a process, that never trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from core.errors import ConfigError


@dataclass
class OptimConfig:
    # "adamw" (the MViT Kinetics and ImageNet recipes) or "sgd" (momentum, no Nesterov: PySlowFast's SSv2
    # recipes); betas and eps are AdamW's, momentum SGD's
    name: str = "adamw"
    lr: float = 1.6e-3  # at reference_batch_size; scaled linearly with the global batch
    reference_batch_size: int = 512
    min_lr: float = 1.6e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 30.0
    # where the linear warmup starts, at reference_batch_size like lr and min_lr (PySlowFast's
    # WARMUP_START_LR); None = from 1/1000 of lr
    warmup_start_lr: Optional[float] = None
    momentum: float = 0.9
    clip_grad_norm: float | None = 1.0  # None disables clipping
    # Fine-tuning. layer_decay: the LR of layer l (0 = patch embedding, cls token and position embeddings;
    # block i = i + 1; the final norm and head = depth + 1) is scaled by layer_decay ** (depth + 1 - l);
    # 1.0 = off. freeze_blocks / freeze_epochs: the embedding and the first freeze_blocks blocks take no
    # update (LR 0) in epochs 0 .. freeze_epochs - 1; 0 = off.
    layer_decay: float = 1.0
    freeze_blocks: int = 0
    freeze_epochs: int = 0

    def __post_init__(self) -> None:
        """Raises ``ConfigError`` keyed ``optim.*``: ``load_config`` names the source of that key."""
        if not self.lr > 0:
            raise ConfigError("must be > 0", "optim.lr", self.lr)
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"must be in [0, optim.lr={self.lr}]", "optim.min_lr", self.min_lr, related=("optim.lr",))
        if self.name not in ("adamw", "sgd"):
            raise ConfigError("must be 'adamw' or 'sgd'", "optim.name", self.name)
        if self.warmup_start_lr is not None and not 0 <= self.warmup_start_lr <= self.lr:
            raise ConfigError(f"must be in [0, optim.lr={self.lr}] (or null: lr / 1000)", "optim.warmup_start_lr",
                              self.warmup_start_lr, related=("optim.lr",))
        if not 0 <= self.momentum < 1:
            raise ConfigError("must be in [0, 1)", "optim.momentum", self.momentum)
        if self.reference_batch_size < 1:
            raise ConfigError("must be >= 1", "optim.reference_batch_size", self.reference_batch_size)
        for name in ("warmup_epochs", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError("must be >= 0", f"optim.{name}", getattr(self, name))
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("must both be in [0, 1)", "optim.betas", list(self.betas))
        if not self.eps > 0:
            raise ConfigError("must be > 0", "optim.eps", self.eps)
        if not 0 < self.layer_decay <= 1:
            raise ConfigError("must be in (0, 1] (1.0 = no layer-wise decay)", "optim.layer_decay", self.layer_decay)
        for name in ("freeze_blocks", "freeze_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError("must be >= 0", f"optim.{name}", getattr(self, name))
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError("must be > 0 (or null for no clipping)", "optim.clip_grad_norm", self.clip_grad_norm)


@dataclass
class TrainerConfig:
    epochs: int = 30
    grad_accum_steps: int = 1  # micro-batches (of data.batch_size rows) per optimiser step
    num_workers: int = 1
    # Elastic: fewer than num_workers (down to this) when nodes are lost, more again when they return
    # (Ray Train's elastic mode); None = a fixed size of num_workers
    min_workers: Optional[int] = None
    resize_check_s: float = 60.0  # how often a running elastic group looks for room to grow
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu
    # custom Ray resources each worker requests: pins the workers to a node group, e.g.
    # {mvit_gpu_node: 0.01} for k8s/base/ray-train.yaml's GPU workers
    worker_resources: dict[str, float] = field(default_factory=dict)
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or "fp32" / "bf16"
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every N steps (0 = only at epoch end)
    num_checkpoints_to_keep: int = 2
    storage_path: str = "runs"  # local dir or s3://bucket/prefix (RunConfig.storage_path)
    max_failures: int = 0  # automatic restarts from the latest checkpoint
    # Preemption notices (a node drained by Ray: spot reclaim, eviction): checked every N optimiser steps
    # (0 = never; null = about every preemption_check_every_s seconds, from the ranks' mean step time);
    # on one, checkpoint and wait for the node to go, up to preemption_wait_s past its deadline
    preemption_check_every_steps: Optional[int] = None
    preemption_check_every_s: float = 2.0
    preemption_wait_s: float = 60.0
    max_steps_per_epoch: int = 0  # cap for smoke runs (0 = the whole epoch)
    # Ray Train's own log lines (worker-group start, every report, every checkpoint): WARNING keeps its
    # warnings and failures; INFO or DEBUG to see everything it does.
    ray_train_log_level: str = "WARNING"

    def __post_init__(self) -> None:
        """Raises ``ConfigError`` keyed ``trainer.*``: ``load_config`` names the source of that key."""
        for name in ("epochs", "grad_accum_steps", "num_workers", "eval_every_epochs",
                     "num_checkpoints_to_keep"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", f"trainer.{name}", getattr(self, name))
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"must be in [1, trainer.num_workers={self.num_workers}] (or null: a fixed size)",
                              "trainer.min_workers", self.min_workers, related=("trainer.num_workers",))
        for name in ("resize_check_s", "preemption_wait_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError("must be >= 0", f"trainer.{name}", getattr(self, name))
        if not self.preemption_check_every_s > 0:
            raise ConfigError("must be > 0", "trainer.preemption_check_every_s", self.preemption_check_every_s)
        for name in ("checkpoint_every_steps", "max_failures", "max_steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ConfigError("must be >= 0", f"trainer.{name}", getattr(self, name))
        if self.preemption_check_every_steps is not None and self.preemption_check_every_steps < 0:
            raise ConfigError("must be >= 0 (0 = never), or null for a check about every "
                              "trainer.preemption_check_every_s", "trainer.preemption_check_every_steps",
                              self.preemption_check_every_steps, related=("trainer.preemption_check_every_s",))
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError("must be auto, fp32 or bf16", "trainer.precision", self.precision)
        if not self.cpus_per_worker > 0:
            raise ConfigError("must be > 0", "trainer.cpus_per_worker", self.cpus_per_worker)
        if self.use_gpu and not self.gpus_per_worker > 0:
            raise ConfigError("must be > 0 with use_gpu", "trainer.gpus_per_worker", self.gpus_per_worker)
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or not amount > 0:
                raise ConfigError("must map custom resource names (not CPU/GPU: see trainer.cpus_per_worker, "
                                  "trainer.gpus_per_worker) to amounts > 0", "trainer.worker_resources",
                                  dict(self.worker_resources))
        if not self.storage_path.strip():
            raise ConfigError("must name a folder or s3:// URL", "trainer.storage_path", self.storage_path)
        if self.ray_train_log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL", "trainer.ray_train_log_level",
                              self.ray_train_log_level)

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def worker_range(self) -> tuple[int, int]:
        """``ScalingConfig.num_workers`` of an elastic group: (min, max)."""
        return (self.min_workers or self.num_workers, self.num_workers)
