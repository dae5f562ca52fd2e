"""The data-loading service: WebDataset shards -> Ray Data -> decoder actors -> uint8 batches per worker.

Modules, in the order data flows through them:

- ``config``     ``DataConfig`` (+ ``ShuffleConfig``, ``SamplingConfig``, ``AugmentConfig``,
                 ``DecoderPoolConfig``): the ``data:`` section of an experiment.
- ``plan``       the epoch plan as arithmetic: shard order per (seed, epoch), batches ("units") per
                 worker, resume positions; the ``EpochCursor`` actor that tells each execution
                 which epoch and position to read.
- ``source``     ``ShardSource``: a Ray ``Datasource`` reading shard groups with webdataset.
- ``sampling``   frame indices (train clip, eval clips) and view parameters (crop boxes, flips,
                 RandAugment ops, erasing), drawn from a generator seeded by (seed, epoch, key, view).
- ``transforms`` applying a view to decoded frames with torchvision's uint8 ops.
- ``decode``     ``Decoder``: the ``map_batches`` actor class (Decord for video, Pillow for JPEG),
                 decode-context choice (GPU/CPU).
- ``service``    ``build_datasets`` / ``build_dataset`` / ``ray_train_data_config`` (driver side).
- ``loader``     ``ShardLoader`` (worker side): batches per epoch, resume state, ``EpochStats``.
- ``device``     ``normalize``, ``mix_batch`` (mixup/cutmix -> soft targets), ``soft_cross_entropy``.
- ``device_augment``  ``render_on_device``, ``augment_on_device``: the decoder's crops resized and flipped,
                 then RandAugment and erasing batched, on the training device (``augment.on_device``),
                 from the parameters the decoder drew.

Driver::

    datasets = build_datasets(cfg.data)
    trainer = TorchTrainer(train_fn, datasets=datasets, dataset_config=ray_train_data_config(cfg.data), ...)

Worker::

    loader = ShardLoader.for_train_worker("train", device=device)
    for batch in loader.epoch(epoch, position):
        x = normalize(batch["video"], mean, std)
        x, targets = mix_batch(x, batch["label"], num_classes, cfg.data.augment, batch["mix_seed"])
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.data.config import (
    AugmentConfig,
    DataConfig,
    DecoderPoolConfig,
    SamplingConfig,
    ShuffleConfig,
    imagenet_defaults,
)

# Ray, torch and the decoders load only when the service itself is used, so that importing the
# config schema (e.g. from pipeline.config) stays cheap.
_LAZY = {
    "EpochStats": "pipeline.data.loader",
    "ShardLoader": "pipeline.data.loader",
    "build_dataset": "pipeline.data.service",
    "build_datasets": "pipeline.data.service",
    "ray_train_data_config": "pipeline.data.service",
    "mix_batch": "pipeline.data.device",
    "normalize": "pipeline.data.device",
    "soft_cross_entropy": "pipeline.data.device",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(["AugmentConfig", "DataConfig", "DecoderPoolConfig", "SamplingConfig", "ShuffleConfig",
                  "imagenet_defaults", *_LAZY])  # fmt: skip
