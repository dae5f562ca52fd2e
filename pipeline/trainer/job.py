"""The driver of a training job: validate, describe the data, hand everything to Ray Train, report.

``pipeline/train.py`` calls ``main``. Everything that can be wrong with the request (config keys and
types, the shard set, class count) is checked here before any worker starts.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import one_line
from core.redact import WORKER_SETUP_HOOK, install_redaction, redact_value
from core.s3 import pyarrow_target, storage_options_for
from pipeline.config import (
    ConfigError,
    ExperimentConfig,
    build_model_config,
    load_config,
    to_container,
    to_redacted_yaml,
)
from pipeline.tracking import RESOLVED_CONFIG, config_hash, git_commit, resolve_uri
from pipeline.trainer.spec import InitWeights, JobSpec, job_key

log = logging.getLogger("pipeline.trainer")


@dataclass(frozen=True)
class DatasetInfo:
    classes: list[str]
    manifests: dict[str, str]  # split -> manifest JSON text
    hashes: dict[str, str]  # split -> sha256 of the manifest
    samples: dict[str, int]  # split -> samples
    shards: dict[str, int]  # split -> shards


def labelled_manifest(cfg: ExperimentConfig, split: str) -> Any:
    """The manifest of ``split`` under ``data.root`` (``core.manifest.Manifest``), for a job that trains or
    scores on it: a missing or unreadable manifest, or a split without labels, is one ``ConfigError`` line."""
    from core.manifest import load_manifest

    try:
        manifest = load_manifest(cfg.data.root, split, cfg.data.storage_options())
    except FileNotFoundError as err:
        raise ConfigError(f"data.root={redact_value(cfg.data.root)!r}: no manifest for split {split!r} "
                          f"({redact_value(str(err))}); run `python -m preprocessing ...` first or fix "
                          "data.root") from None
    except Exception as err:  # noqa: BLE001 - no credentials, endpoint down, access denied: stop here
        raise ConfigError(f"data.root={redact_value(cfg.data.root)!r}: cannot read the {split!r} manifest: "
                          f"{one_line(err)}") from None
    unlabeled = manifest.unlabeled_problem()
    if unlabeled:
        raise ConfigError(f"data.root={redact_value(cfg.data.root)!r}: split {split!r}: {unlabeled}")
    return manifest


def describe_data(cfg: ExperimentConfig) -> DatasetInfo:
    manifests, hashes, samples, shards, classes = {}, {}, {}, {}, None
    for split in (cfg.data.train_split, cfg.data.val_split):
        manifest = labelled_manifest(cfg, split)
        text = manifest.to_json()
        manifests[split], hashes[split] = text, hashlib.sha256(text.encode()).hexdigest()
        samples[split], shards[split] = manifest.num_samples, len(manifest.shards)
        if classes is not None and manifest.classes != classes:
            raise ConfigError(f"splits {cfg.data.train_split!r} and {split!r} have different class lists")
        classes = manifest.classes
    return DatasetInfo(list(classes or []), manifests, hashes, samples, shards)


# The check before the job starts asks once more on a failure, not the job's ten times with backoff:
# a dead endpoint must be reported in seconds (the job's own filesystem keeps its patient retries).
_CHECK_ATTEMPTS = 2
_CHECK_REQUEST_TIMEOUT_S = 10.0


def check_storage(cfg: ExperimentConfig) -> None:
    """Fails before Ray starts when ``trainer.storage_path`` cannot be used: no credentials, an endpoint
    that refuses connections, a missing bucket, or a local folder that cannot be created.

    Ray Train would only find out when it first writes there (after the workers started and, for S3,
    after its retries); this checks the same place, through the same kind of pyarrow filesystem the job
    uses (``core.s3.pyarrow_target``) with few attempts and a short timeout.
    """
    shown = redact_value(cfg.trainer.storage_path)
    try:
        path, fs = pyarrow_target(cfg.trainer.storage_path, cfg.data.s3_endpoint_url, max_attempts=_CHECK_ATTEMPTS,
                                  request_timeout_s=_CHECK_REQUEST_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - e.g. an endpoint URL pyarrow cannot use
        raise ConfigError(f"trainer.storage_path={shown!r}: storage not usable: {one_line(err)}") from None
    if fs is None and "://" not in path:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"trainer.storage_path={shown!r}: cannot create the folder: {one_line(err)}") from None
        return
    try:
        import pyarrow.fs

        root = path
        if fs is None:
            fs, root = pyarrow.fs.FileSystem.from_uri(path)
        bucket = root.strip("/").split("/", 1)[0]
        info = fs.get_file_info(bucket)
    except Exception as err:  # noqa: BLE001 - any failure here means Ray could not write checkpoints there
        raise ConfigError(f"trainer.storage_path={shown!r}: storage not reachable: {one_line(err)}") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"trainer.storage_path={shown!r}: bucket {bucket!r} does not exist or is not accessible")


@dataclass(frozen=True)
class InitPlan:
    """``model.init_from`` resolved and fitted on the driver: what the workers will load."""

    source: str
    state: dict[str, Any]  # the fitted tensors, re-initialised keys left out
    reinitialized: tuple[str, ...]
    adapted: tuple[str, ...]

    def tags(self) -> dict[str, str]:
        return {"init_from": self.source, "init_reinitialized": ",".join(self.reinitialized) or "none",
                "init_adapted": str(len(self.adapted))}


def resolve_init(cfg: ExperimentConfig, model_cfg: Any, classes: list[str], tracking_uri: str) -> InitPlan | None:
    """Resolves ``model.init_from`` (``pipeline.model_ref``) and fits it to the job's model, built on the meta
    device (no memory, no compute), before any worker starts: a bad reference or weights that do not fit
    stop the job here with one line."""
    if cfg.model.init_from is None:
        return None
    if not cfg.model.init_from.strip():
        raise ConfigError("model.init_from is empty: this config needs the weights to start from (a path, s3://, "
                          "runs:/RUN_ID/PATH or models:/NAME/VERSION), or null to start from random weights")
    import torch

    from pipeline.model_ref import ModelRefError, fit, resolve
    from pipeline.models.mvit import MViT

    try:
        weights = resolve(cfg.model.init_from, tracking_uri=tracking_uri, s3_endpoint_url=cfg.data.s3_endpoint_url)
        with torch.device("meta"):
            model = MViT(model_cfg)
        fitted = fit(weights, model, cfg.model.init_head, classes)
    except ModelRefError as err:
        raise ConfigError(f"model.init_from: {err}") from None
    reinit = set(fitted.reinitialized)
    plan = InitPlan(weights.describe(), {k: v for k, v in fitted.state.items() if k not in reinit},
                    fitted.reinitialized, fitted.adapted)
    log.info("model.init_from: %s; re-initialised: %s%s", plan.source, ", ".join(plan.reinitialized) or "nothing",
             "".join(f"; {line}" for line in plan.adapted[:4]) + (" ..." if len(plan.adapted) > 4 else ""))
    return plan


def _storage(cfg: ExperimentConfig) -> tuple[str, Any]:
    """``RunConfig.storage_path`` and filesystem (S3 requests retried and bounded: see ``core.s3``)."""
    return pyarrow_target(cfg.trainer.storage_path, cfg.data.s3_endpoint_url)


def tracking_uri_for(cfg: ExperimentConfig, storage_path: str, storage_fs: Any) -> str:
    """The job's MLflow store: ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file
    beside local checkpoints (``~/.mvit`` when they go to object storage)."""
    local = storage_fs is None and "://" not in storage_path
    return resolve_uri(cfg.tracking, storage_path if local else "~/.mvit")


def job_spec(cfg: ExperimentConfig, data: DatasetInfo, tracking_uri: str, storage_path: str) -> JobSpec:
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
    export_dir = f"{storage_path.rstrip('/')}/{cfg.name}/final_model"
    return JobSpec(
        experiment=resolved,
        tracking_uri=tracking_uri,
        job_key=job_key(cfg.name, storage_path),
        classes=data.classes,
        tags=tags,
        texts={
            RESOLVED_CONFIG: to_redacted_yaml(cfg),
            **{f"data/{split}.manifest.json": text for split, text in data.manifests.items()},
        },
        export_dir=export_dir,
        export_storage_options=storage_options_for(export_dir, cfg.data.s3_endpoint_url),
    )


def connect_ray() -> None:
    """Joins the cluster in ``RAY_ADDRESS`` (as ``ray job submit`` sets it), else starts a local Ray on
    loopback, with what every process of a job needs: the planted fault plan, if any, and the redaction
    of secrets in worker logs. Training and evaluation jobs start the same way."""
    import ray

    if ray.is_initialized():
        return
    from core import faults

    # A planted fault plan (fire drills, the reliability suite) must reach every process of the job,
    # also on a cluster whose workers did not start with it in their environment.
    plan = os.environ.get(faults.ENV)
    runtime_env: dict[str, Any] = {"env_vars": {faults.ENV: plan}} if plan else {}
    runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK  # secrets out of every worker's log records
    if plan:
        faults.parse(plan)  # a malformed plan stops here, before any worker starts
        log.warning("fault plan %s=%s is active: faults will be planted in this job", faults.ENV, plan)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)
    else:  # plain `python pipeline/train.py`: a local Ray on loopback
        from core.loopback import keep_ray_on_loopback

        keep_ray_on_loopback()  # every Ray port on 127.0.0.1 (Ray would also listen on other interfaces)
        # Logical CPUs, not cores: the train worker, the decoder actors and Ray Data's read and
        # repartition tasks each hold a CPU slot, and on a 2-core laptop they must all fit at once.
        # The dashboard (on 127.0.0.1) serves Ray's state API, which Ray Train's PlacementGroupCleaner
        # asks every second; without it the job's log gets one warning a second.
        ray.init(address="local", include_dashboard=True, num_cpus=max(os.cpu_count() or 1, 4),
                 runtime_env=runtime_env)


def reserved_gpus(cfg: ExperimentConfig) -> float:
    """The GPUs the training workers take, which the decoder pools must leave free."""
    return cfg.trainer.num_workers * cfg.trainer.gpus_per_worker if cfg.trainer.use_gpu else 0.0


def worker_group(cfg: ExperimentConfig, elastic: bool) -> dict[str, Any]:
    """``TorchTrainer``'s scaling and torch configs for the job's Ray Train workers (``elastic``: the size range
    of ``trainer.min_workers``, else ``trainer.num_workers`` exactly); training and evaluation jobs share them."""
    import ray.train

    from pipeline.trainer.distributed import LoopbackTorchConfig

    return {
        "scaling_config": ray.train.ScalingConfig(
            num_workers=cfg.trainer.worker_range if elastic else cfg.trainer.num_workers,
            elastic_resize_monitor_interval_s=cfg.trainer.resize_check_s,
            use_gpu=cfg.trainer.use_gpu,
            resources_per_worker={"CPU": cfg.trainer.cpus_per_worker,
                                  **({"GPU": cfg.trainer.gpus_per_worker} if cfg.trainer.use_gpu else {}),
                                  **cfg.trainer.worker_resources},
        ),
        # TorchConfig that keeps torch.distributed on loopback when every rank is on 127.0.0.1
        "torch_config": LoopbackTorchConfig(backend="nccl" if cfg.trainer.use_gpu else "gloo"),
    }


def fit_job(trainer: Any, cfg: ExperimentConfig, kind: str = "training") -> Any:
    """``trainer.fit()``; a job that failed for good raises ``JobFailed`` with ``failure_summary``'s line."""
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray Train wraps every cause; summarised for the user below
        raise JobFailed(failure_summary(cfg, err, kind)) from err
    if result.error is not None:
        raise JobFailed(failure_summary(cfg, result.error, kind))
    return result


def run(cfg: ExperimentConfig) -> Any:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.data import build_datasets, ray_train_data_config
    from pipeline.trainer.checkpoint import retention
    from pipeline.trainer.loop import train_loop_per_worker

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

    # "auto" becomes a boolean here, where it is known whether the trainers use GPUs: the decoder actors
    # and the workers (through the job spec) then agree on where RandAugment and erasing run
    augment.on_device = augment.on_device_for(cfg.trainer.use_gpu)
    storage_path, storage_fs = _storage(cfg)
    check_storage(cfg)
    tracking_uri = tracking_uri_for(cfg, storage_path, storage_fs)
    init = resolve_init(cfg, model_cfg, data.classes, tracking_uri)
    job = job_spec(cfg, data, tracking_uri, cfg.trainer.storage_path if storage_fs else storage_path)
    if init is not None:
        job = replace(job, tags={**job.tags, **init.tags()})

    connect_ray()
    if init is not None:  # one copy in the object store for every rank of every attempt
        job = replace(job, init=InitWeights(init.source, ray.put(init.state), init.reinitialized))
    datasets = build_datasets(cfg.data, reserved_gpus=reserved_gpus(cfg))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        **worker_group(cfg, cfg.trainer.elastic),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=retention(cfg.trainer.num_checkpoints_to_keep),
            logging_config=ray.train.LoggingConfig(log_level=cfg.trainer.ray_train_log_level),
        ),
        datasets=datasets,
        dataset_config=ray_train_data_config(cfg.data),
    )
    log.info(start_line(cfg, model_cfg, data, tracking_uri))
    result = fit_job(trainer, cfg)
    if cfg.tracking.register_as:  # here, after success: a registry that fails costs no training
        from pipeline.tracking import RegistryError, register_job_model

        try:
            registered = register_job_model(tracking_uri, cfg.tracking, job.job_key)
        except RegistryError as err:
            raise RegistrationFailed(f"training job {cfg.name!r} finished and its final model is in "
                                     f"{redact_value(job.export_dir)!r}, but {err}") from None
        log.info("registered the final model: %s", registered.describe())
    return result, job


def start_line(cfg: ExperimentConfig, model_cfg: Any, data: DatasetInfo, tracking_uri: str) -> str:
    """The job's first line: what trains on what, and where it is tracked."""
    from pipeline.models.flops import model_stats

    stats = model_stats(model_cfg)  # on the meta device: no memory, no real compute
    t, v = cfg.data.train_split, cfg.data.val_split
    return (f"training {cfg.name}: {cfg.model.preset} {model_cfg.num_frames}x{model_cfg.crop_size}^2, "
            f"{stats.params_m:.2f}M params, {stats.gflops:.2f} GFLOPs/view | world size {cfg.trainer.num_workers}"
            f"{' (elastic, down to %d)' % cfg.trainer.min_workers if cfg.trainer.elastic else ''} "
            f"({'GPU' if cfg.trainer.use_gpu else 'CPU'}), global batch {cfg.global_batch_size} | {t} "
            f"{data.samples[t]} samples in {data.shards[t]} shards, {v} {data.samples[v]} in {data.shards[v]}, "
            f"{len(data.classes)} classes | {cfg.trainer.epochs} epochs | MLflow {redact_value(tracking_uri)} "
            f"(experiment {cfg.tracking.experiment!r})")


class JobFailed(RuntimeError):
    """The job started and failed for good (its automatic restarts, if any, used up)."""


class RegistrationFailed(RuntimeError):
    """The job succeeded (its run and final model are kept) but ``tracking.register_as`` could not register
    the final model; rerunning the job, or the command in the message, registers it."""


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failure|Exit)\b.*:")
# A rank whose peer died fails inside the collective it was waiting on, and a rank that found a checkpoint
# another rank failed to download finds it incomplete: consequences, not the cause, so such errors are
# reported only when no rank failed otherwise.
_COLLATERAL = re.compile(r"gloo|nccl|ProcessGroup|Connection closed by peer|Connection reset by peer|"
                         r"IncompleteCheckpointDownload|should have been created by another process", re.IGNORECASE)


# A worker Ray Train lost (its process, or its whole node, died) fails Ray Train's health check, whose error
# describes the worker: ``A worker health check failed. Worker info: Worker(... metadata=ActorMetadata(...
# node_id='<hex>', node_ip='10.0.0.3', ...)`` (ray/train/v2/_internal/execution/worker_group/worker_group.py).
_WORKER_NODE_IP = re.compile(r"node_ip='([^']+)'")
_WORKER_NODE_ID = re.compile(r"node_id='([0-9a-f]+)'")


def _lost_worker_node(err: BaseException) -> str:
    """`` on node IP (node id ABC...)`` for a worker whose health check failed (Ray's description of the
    worker names its node), else ``""``: a lost node is named in the one line, not only in Ray's log."""
    if getattr(err, "health_check_failure", None) is None:
        return ""
    text = str(err)
    ip, node_id = _WORKER_NODE_IP.search(text), _WORKER_NODE_ID.search(text)
    if ip is None:
        return ""
    return f" on node {ip.group(1)}" + (f" (node id {node_id.group(1)[:12]})" if node_id else "")


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _raised_line(err: BaseException) -> str:
    """The last ``SomeError: message`` line of ``err``'s text (a worker's error text ends with the
    traceback of what it raised), else its last line."""
    lines = [line.strip() for line in redact_value(str(err)).splitlines() if line.strip()]
    raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if raised:
        return raised[-1]
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__


def failure_summary(cfg: ExperimentConfig, err: BaseException, kind: str = "training") -> str:
    """One line for the user: which job (``kind``: training or evaluation), how many restarts were allowed,
    and the root cause.

    Ray's error carries every failed worker's whole traceback, which buries the cause; this picks
    the controller's error, or the first rank whose error is not a collective that lost its peer.
    """
    cause = _innermost(err)
    if getattr(cause, "controller_failure", None) is not None:
        where, detail = "controller", _raised_line(_innermost(cause.controller_failure))
    elif getattr(cause, "worker_failures", None):
        ranked = [(rank, _raised_line(_innermost(e)), e) for rank, e in sorted(cause.worker_failures.items())]
        rank, detail, error = next(((r, d, e) for r, d, e in ranked if not _COLLATERAL.search(d)), ranked[0])
        where = f"rank {rank}{_lost_worker_node(error)}"
    else:
        where, detail = "", _raised_line(cause)
    return (f"{kind} job {cfg.name!r} failed (automatic restarts allowed: trainer.max_failures="
            f"{cfg.trainer.max_failures}; checkpoints stay in {redact_value(cfg.trainer.storage_path)!r}, and "
            f"rerunning the same job resumes from the latest one): {where + ': ' if where else ''}{detail[:1500]}")


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
    install_redaction()  # every log record and an uncaught exception's traceback, secrets scrubbed
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_redacted_yaml(cfg))
            return 0
        result, job = run(cfg)
    except ConfigError as err:
        print(f"error: {redact_value(str(err))}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"error: {redact_value(str(err))}", file=sys.stderr)
        return 1
    except RegistrationFailed as err:
        print(f"error: {redact_value(str(err))}", file=sys.stderr)
        return 3
    metrics = result.metrics or {}
    print(f"\nfinished {cfg.name}: epoch {metrics.get('epoch')}, step {metrics.get('step')}, "
          f"val video top-1 {metrics.get('val/video_top1', float('nan')):.1f}%, "
          f"view top-1 {metrics.get('val/view_top1', float('nan')):.1f}%")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    print(f"final model: {job.export_dir}")
    print(f"MLflow: mlflow ui --backend-store-uri '{redact_value(job.tracking_uri)}'  (experiment "
          f"{cfg.tracking.experiment!r}); compare runs: python -m pipeline.compare --experiment "
          f"{cfg.tracking.experiment} --tracking-uri '{redact_value(job.tracking_uri)}'")
    return 0
