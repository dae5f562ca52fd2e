"""The driver of a training job: validate, describe the data, hand everything to Ray Train, report.

``pipeline/train.py`` calls ``main``. Everything that can be wrong with the request (config keys and
types, the shard set, class count) is checked here before any worker starts.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig, build_model_config, load_config, to_container, to_yaml
from pipeline.tracking import config_hash, git_commit, redact_value, resolve_uri

log = logging.getLogger("pipeline.train")


@dataclass(frozen=True)
class DatasetInfo:
    classes: list[str]
    manifests: dict[str, str]  # split -> manifest JSON text
    hashes: dict[str, str]  # split -> sha256 of the manifest


def describe_data(cfg: ExperimentConfig) -> DatasetInfo:
    from preprocessing.manifest import load_manifest

    manifests, hashes, classes = {}, {}, None
    for split in (cfg.data.train_split, cfg.data.val_split):
        try:
            manifest = load_manifest(cfg.data.root, split, cfg.data.storage_options())
        except FileNotFoundError as err:
            raise ConfigError(f"data.root={cfg.data.root!r}: no manifest for split {split!r} ({err}); "
                              "run `python -m preprocessing ...` first or fix data.root") from None
        text = manifest.to_json()
        manifests[split], hashes[split] = text, hashlib.sha256(text.encode()).hexdigest()
        if classes is not None and manifest.classes != classes:
            raise ConfigError(f"splits {cfg.data.train_split!r} and {split!r} have different class lists")
        classes = manifest.classes
    return DatasetInfo(list(classes or []), manifests, hashes)


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _storage(cfg: ExperimentConfig) -> tuple[str, Any]:
    """``RunConfig.storage_path`` and, for S3 behind a custom endpoint, a pyarrow filesystem for it."""
    path = _absolute(cfg.trainer.storage_path)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or cfg.data.s3_endpoint_url
    if path.startswith("s3://") and endpoint:
        import pyarrow.fs

        scheme = "http" if endpoint.startswith("http://") else "https"
        fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[-1], scheme=scheme)
        return path[len("s3://"):], fs
    return path, None


def job_description(cfg: ExperimentConfig, data: DatasetInfo, tracking_uri: str, storage_path: str) -> dict[str, Any]:
    """What every worker needs besides the config: tracking target, tags, texts to log as artifacts."""
    import ray
    import torch

    resolved = to_container(cfg)
    tags = {
        "git_commit": git_commit(str(Path(__file__).resolve().parents[2])),
        "config_hash": config_hash(resolved),
        "dataset_manifest_hash": data.hashes[cfg.data.train_split],
        "val_manifest_hash": data.hashes[cfg.data.val_split],
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "model_preset": cfg.model.preset,
    }
    job_key = hashlib.sha256(f"{cfg.name}\0{storage_path}".encode()).hexdigest()[:16]
    export_dir = f"{storage_path.rstrip('/')}/{cfg.name}/final_model"
    return {
        "tracking_uri": tracking_uri,
        "params": resolved,
        "tags": tags,
        "job_key": job_key,
        "classes": data.classes,
        "texts": {
            "config/resolved_config.yaml": redact_value(to_yaml(cfg)),
            **{f"data/{split}.manifest.json": text for split, text in data.manifests.items()},
        },
        "export_dir": export_dir,
        "storage_options": cfg.data.storage_options() if export_dir.startswith("s3://") else {},
    }


def run(cfg: ExperimentConfig) -> Any:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.data import build_datasets, ray_train_data_config
    from pipeline.train.loop import train_loop_per_worker

    data = describe_data(cfg)
    if cfg.model.num_classes is None:
        cfg.model.num_classes = len(data.classes)
    elif cfg.model.num_classes != len(data.classes):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the shard set at {cfg.data.root} "
                          f"has {len(data.classes)} classes")
    model_cfg = build_model_config(cfg.model)
    sampling, augment = cfg.data.sampling, cfg.data.augment
    if (model_cfg.num_frames > 1 and model_cfg.num_frames != sampling.num_frames) or model_cfg.crop_size != augment.crop_size:
        raise ConfigError(f"the model takes {model_cfg.num_frames}x{model_cfg.crop_size}^2 clips but the data "
                          f"service makes {sampling.num_frames}x{augment.crop_size}^2 (data.sampling.num_frames, "
                          "data.augment.crop_size)")

    storage_path, storage_fs = _storage(cfg)
    default_tracking_dir = storage_path if storage_fs is None and "://" not in storage_path else "~/.mvit"
    tracking_uri = resolve_uri(cfg.tracking, default_tracking_dir)
    job = job_description(cfg, data, tracking_uri, cfg.trainer.storage_path if storage_fs else storage_path)

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:  # plain `python pipeline/train.py`: a local Ray on loopback
            # Logical CPUs, not cores: the train worker, the decoder actors and Ray Data's read and
            # repartition tasks each hold a CPU slot, and on a 2-core laptop they must all fit at once.
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     num_cpus=max(os.cpu_count() or 1, 4))
    datasets = build_datasets(cfg.data)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": to_container(cfg), "job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.trainer.num_workers,
            use_gpu=cfg.trainer.use_gpu,
            resources_per_worker={"CPU": cfg.trainer.cpus_per_worker,
                                  **({"GPU": cfg.trainer.gpus_per_worker} if cfg.trainer.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.trainer.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.trainer.num_checkpoints_to_keep),
        ),
        datasets=datasets,
        dataset_config=ray_train_data_config(cfg.data),
    )
    log.info("training %s (%s) on %d %s worker(s); tracking at %s", cfg.name, cfg.model.preset,
             cfg.trainer.num_workers, "GPU" if cfg.trainer.use_gpu else "CPU", redact_value(tracking_uri))
    result = trainer.fit()
    return result, job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python pipeline/train.py",
        description="Train an MViT on Ray Train (FSDP2), tracked in MLflow. Runs on the Ray cluster in "
                    "RAY_ADDRESS (as set by `ray job submit`), else starts a local Ray.",
        epilog="Overrides are key.path=value pairs, e.g. trainer.epochs=3 model.num_classes=10.",
    )
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/experiment/demo.yaml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(redact_value(to_yaml(cfg)))
            return 0
        result, job = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = result.metrics or {}
    print(f"\nfinished {cfg.name}: epoch {metrics.get('epoch')}, step {metrics.get('step')}, "
          f"val video top-1 {metrics.get('val/video_top1', float('nan')):.1f}%, "
          f"view top-1 {metrics.get('val/view_top1', float('nan')):.1f}%")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    print(f"final model: {job['export_dir']}")
    print(f"MLflow: mlflow ui --backend-store-uri '{redact_value(job['tracking_uri'])}'  (experiment "
          f"{cfg.tracking.experiment!r}); compare runs: python -m pipeline.compare --experiment "
          f"{cfg.tracking.experiment} --tracking-uri '{redact_value(job['tracking_uri'])}'")
    return 0
