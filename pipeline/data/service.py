"""Assembling the Ray Datasets that feed training (driver side).

    read (ShardSource: one task per read group, epoch order from the cursor)
      -> repartition(target_num_rows_per_block=S, strict=True)    one block = one unit (batch)
      -> map_batches(Decoder, batch_size=S, ActorPoolStrategy(min, max))   decode + sample + augment
      -> [Ray Train: streaming_split(W, equal=True), order preserved]  unit u -> worker u mod W

``build_datasets(cfg)`` returns ``{"train": ds, "val": ds}`` for ``TorchTrainer(datasets=...)``;
``ray_train_data_config(cfg)`` is the matching ``ray.train.DataConfig`` (order preserved, so the
split hands units out round-robin). Inside a worker, ``pipeline.data.loader.ShardLoader`` reads the
shard Ray Train gives it.
"""

from __future__ import annotations

import logging
import math
import warnings

import ray
import ray.data
import ray.train
from ray.data import ActorPoolStrategy, DataContext, ExecutionOptions

from pipeline.data.config import DataConfig
from pipeline.data.decode import Decoder, decord_has_cuda, pool_gpus_per_actor, views_per_sample
from pipeline.data.plan import DatasetFacts, ShardRef, new_cursor
from pipeline.data.source import ShardSource
from core.manifest import load_manifest, shard_urls
from core.tar_members import member_cap

log = logging.getLogger(__name__)

CONTEXT_KEY = "mvit_data"
"""DataContext config entry under which a dataset carries its ``DatasetFacts`` to the workers."""

_EXTENSIONS = {"video": "mp4", "image": "jpg"}


def build_datasets(cfg: DataConfig, val: bool = True, reserved_gpus: float = 0.0) -> dict[str, ray.data.Dataset]:
    """``{"train": ..., "val": ...}`` (val only when ``val``) for ``TorchTrainer(datasets=...)``.

    ``reserved_gpus``: the training workers' GPUs, which the decoder pools must leave free.
    """
    cluster, cuda = ray.cluster_resources().get("GPU", 0.0), decord_has_cuda()
    gpus = pool_gpus_per_actor(cfg.decoder, cuda, cluster, reserved_gpus)
    datasets = {"train": build_dataset(cfg, cfg.train_split, train=True, decoder_gpus=gpus)}
    if val:  # the validation pool must leave the training pool's shares free as well
        gpus = pool_gpus_per_actor(cfg.decoder, cuda, cluster, reserved_gpus + cfg.decoder.min_actors * gpus)
        datasets["val"] = build_dataset(cfg, cfg.val_split, train=False, decoder_gpus=gpus)
    return datasets


def ray_train_data_config(cfg: DataConfig) -> ray.train.DataConfig:
    """``TorchTrainer(dataset_config=...)``: split every dataset with its order preserved.

    Ray Train replaces each dataset's execution options with these, so preserve_order must be here.
    """
    del cfg  # the same options serve every configuration today
    return ray.train.DataConfig(datasets_to_split="all", execution_options=ingest_options(), enable_shard_locality=False)


def ingest_options() -> ExecutionOptions:
    options = ExecutionOptions()
    options.preserve_order = True
    options.resource_limits = DataContext.get_current().execution_options.resource_limits
    return options


def build_dataset(cfg: DataConfig, split: str, train: bool, decoder_gpus: float | None = None,
                  reserved_gpus: float = 0.0) -> ray.data.Dataset:
    """The Dataset of one split: training views (train=True) or evaluation views.

    ``decoder_gpus``: the GPU share of each decoder actor, as ``build_datasets`` decided it beside the
    training workers; None decides it for this pool alone (``decode.pool_gpus_per_actor``), leaving
    ``reserved_gpus`` (the training workers' GPUs) free.
    """
    cfg.validate()
    storage = cfg.storage_options()
    manifest = load_manifest(cfg.root, split, storage)
    unlabeled = manifest.unlabeled_problem()
    if unlabeled:
        raise ValueError(f"{split}: {unlabeled}")
    if manifest.modality not in _EXTENSIONS:
        raise ValueError(f"{split}: unsupported modality {manifest.modality!r}")
    if manifest.num_samples == 0:
        raise ValueError(f"{split}: the manifest at {cfg.root} lists no samples")
    shards = [ShardRef(url, info.samples, member_cap(info.bytes, info.samples, cfg.member_headroom, cfg.max_member_bytes))
              for url, info in zip(shard_urls(cfg.root, manifest), manifest.shards)]  # fmt: skip
    views = views_per_sample(cfg, manifest.modality, train)
    batch_rows = cfg.batch_size if train else cfg.eval_batch_size
    per_unit = max(1, batch_rows // views)
    cursor = new_cursor()
    source = ShardSource(
        shards,
        extension=_EXTENSIONS[manifest.modality],
        num_classes=len(manifest.classes),
        storage_options=storage,
        seed=cfg.seed,
        per_unit=per_unit,
        permute=train and cfg.shuffle.shards,
        interleave=cfg.shuffle.interleave if train else 1,
        buffer=cfg.shuffle.buffer if train else 0,
        cursor=cursor,
        total_bytes=manifest.total_bytes,
    )
    gpus = decoder_gpus
    if gpus is None:
        gpus = pool_gpus_per_actor(cfg.decoder, decord_has_cuda(), ray.cluster_resources().get("GPU", 0.0),
                                   reserved_gpus)
    log.info(
        "%s: %d samples in %d shards, %d views/sample, %d samples (%d rows) per batch, decoder actors %d..%d on %s",
        split, manifest.num_samples, len(shards), views, per_unit, per_unit * views, cfg.decoder.min_actors,
        cfg.decoder.max_actors, f"GPU ({gpus} each)" if gpus else "CPU",
    )  # fmt: skip
    # Bounded retries everywhere (Ray Data's defaults are unlimited: a read or a batch that kills its
    # process would be replayed forever). A bad sample never kills the actor (``isolation``), so what
    # exhausts these is a lost node or a broken set-up, and the job fails saying so.
    # Ray 2.60 has no named parameters for a task's retries or an actor's restarts yet (ray_remote_args,
    # deprecated for removal in 2.64: docs/versions.md).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning)
        ds = ray.data.read_datasource(source, num_cpus=cfg.read_num_cpus,
                                      ray_remote_args={"max_retries": cfg.read_max_retries})
        ds = ds.repartition(target_num_rows_per_block=per_unit, strict=True)
        ds = ds.map_batches(
            Decoder,
            fn_constructor_kwargs={"cfg": cfg, "modality": manifest.modality, "train": train},
            batch_size=per_unit,
            batch_format="numpy",
            compute=ActorPoolStrategy(
                min_size=cfg.decoder.min_actors, max_size=cfg.decoder.max_actors,
                max_tasks_in_flight_per_actor=cfg.decoder.tasks_in_flight,
            ),
            num_cpus=cfg.decoder.num_cpus,
            num_gpus=gpus,
            resources=dict(cfg.decoder.resources) or None,
            max_restarts=cfg.decoder.max_restarts,  # the rest of **ray_remote_args
            max_task_retries=cfg.decoder.max_restarts,
        )  # fmt: skip
    frames = 1 if manifest.modality == "image" else cfg.sampling.num_frames
    batch_bytes = per_unit * views * 3 * frames * cfg.augment.crop_size**2
    context = ds.context
    context.execution_options.preserve_order = True
    # Ray Data draws progress bars per operator for every execution (every epoch): thousands of lines
    # in a job's log. Off unless asked for; the trainer logs one line per epoch.
    context.enable_progress_bars = cfg.progress_bars
    context.enable_operator_progress_bars = cfg.progress_bars
    context.print_on_execution_start = cfg.progress_bars  # "Starting execution" + the plan, every epoch
    # An epoch whose decoder actors cannot be placed (e.g. after a node loss the trainers took the CPUs)
    # fails after this long instead of waiting forever (Ray Data's default); the loader names what is missing.
    context.wait_for_min_actors_s = int(math.ceil(cfg.decoder.start_timeout_s))
    # A batch must stay one block: the split hands out whole blocks, one unit per worker in turn.
    context.target_max_block_size = max(context.target_max_block_size or 0, 2 * batch_bytes + (1 << 20))
    demand = {"CPU": cfg.decoder.num_cpus, **({"GPU": gpus} if gpus else {}), **cfg.decoder.resources}
    facts = DatasetFacts(manifest.num_samples, per_unit, views, cursor, manifest.modality, train, cfg.seed,
                         key_digest=manifest.split_key_digest(), decoder_resources=tuple(sorted(demand.items())),
                         decoder_min_actors=cfg.decoder.min_actors, batch_timeout_s=cfg.batch_timeout_s)  # fmt: skip
    if facts.key_digest is None:
        log.info("%s: the manifest has no key digests (older preprocessing): epochs are checked by count only", split)
    context.set_config(CONTEXT_KEY, facts)
    return ds
