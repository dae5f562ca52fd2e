"""Evaluate a trained model on a shard split: ``python -m pipeline.evaluate --model REF --config EXP.yaml``.

Runs as a Ray job like training (``ray job submit -- python -m pipeline.evaluate ...``, or a local Ray
when no ``RAY_ADDRESS`` is set): the split is decoded by the data service's decoder actors into K x C
evaluation views per video (``data.sampling.eval_clips`` x ``eval_crops``, or ``--views KxC``), the model
runs on ``trainer.num_workers`` Ray Train workers exactly as a training job validates
(``pipeline.trainer.validation``), and the driver writes a JSON report (top-1/top-5 per video and per view,
accuracy per class, the confusion matrix, every video's top predictions, the data accounting) and a
confusion matrix PNG, and logs them as an MLflow run in ``tracking.experiment``, tagged with the training
run the weights came from when it can be found. Evaluating a job's final model with the job's config
reproduces the job's last validation numbers exactly. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.redact import install_redaction, redact_value
from pipeline.config import ConfigError, ExperimentConfig, build_model_config, load_config, to_container

log = logging.getLogger("pipeline.evaluate")

REPORT_FILE, CONFUSION_FILE = "report.json", "confusion_matrix.png"
# what pipeline.compare reads to tell evaluations from training runs and to place them beside theirs
KIND_TAG, EVALUATES_TAG, VIEWS_TAG = "mvit.kind", "mvit.evaluates", "eval_views"


def parse_views(text: str) -> tuple[int, int]:
    """``KxC`` (clips x crops, e.g. ``10x3``) -> (K, C); crops are 1 (centre) or 3 (both ends and centre)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--views {text!r}: expected CLIPSxCROPS with positive integers, e.g. 10x3")
    clips, crops = int(parts[0]), int(parts[1])
    if crops not in (1, 3):
        raise ConfigError(f"--views {text!r}: crops must be 1 (centre) or 3 (both ends and centre)")
    return clips, crops


@dataclass(frozen=True)
class EvalTarget:
    """What is evaluated on what, decided on the driver before any worker starts."""

    cfg: ExperimentConfig
    split: str
    classes: list[str]
    model: Any  # model_ref.InferenceModel
    tracking_uri: str
    storage_path: str
    storage_fs: Any


def prepare(cfg: ExperimentConfig, ref: str, split: str) -> EvalTarget:
    """Every check that needs no worker: the split, the model reference and whether they fit each other."""
    from pipeline.model_ref import ModelRefError, load_for_inference
    from core.s3 import pyarrow_target
    from pipeline.trainer.job import check_storage, labelled_manifest, tracking_uri_for

    classes = list(labelled_manifest(cfg, split).classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(classes):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but split {split!r} has {len(classes)} classes")
    cfg.model.num_classes = len(classes)
    cfg.data.augment.on_device = cfg.data.augment.on_device_for(cfg.trainer.use_gpu)  # as a job logs it
    storage_path, storage_fs = pyarrow_target(cfg.trainer.storage_path, cfg.data.s3_endpoint_url)
    check_storage(cfg)
    tracking_uri = tracking_uri_for(cfg, storage_path, storage_fs)
    try:
        model = load_for_inference(ref, build_model_config(cfg.model), classes, tracking_uri=tracking_uri,
                                   s3_endpoint_url=cfg.data.s3_endpoint_url, what=f"split {split!r}")
    except ModelRefError as err:
        raise ConfigError(str(err)) from None
    net, sampling, crop = model.config, cfg.data.sampling, cfg.data.augment.crop_size
    if (net.num_frames > 1 and net.num_frames != sampling.num_frames) or net.crop_size != crop:
        raise ConfigError(f"model/data mismatch: the model takes {net.num_frames}x{net.crop_size}^2 clips but the data "
                          f"service makes {sampling.num_frames}x{crop}^2 (data.sampling.num_frames, "
                          "data.augment.crop_size)")
    return EvalTarget(cfg, split, classes, model, tracking_uri, storage_path, storage_fs)


def run_workers(target: EvalTarget) -> Any:
    """The evaluation pass on Ray Train workers; returns rank 0's ``EvalOutcome``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from pipeline.data import build_dataset, ray_train_data_config
    from pipeline.trainer.eval_worker import DATASET, evaluate_per_worker
    from pipeline.trainer.job import connect_ray, fit_job, reserved_gpus, worker_group
    from pipeline.trainer.spec import EvalSpec

    cfg = target.cfg
    connect_ray()
    results = Queue(maxsize=1, actor_options={"num_cpus": 0})  # placed even when the workers hold every CPU
    spec = EvalSpec(to_container(cfg), target.model.config, ray.put(target.model.model.state_dict()),
                    target.classes, target.split, results)
    trainer = TorchTrainer(
        evaluate_per_worker,
        train_loop_config={"spec": spec},
        **worker_group(cfg, elastic=False),  # one pass: no resizing mid-way
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-evaluate-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=target.storage_path,
            storage_filesystem=target.storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.trainer.ray_train_log_level)),
        datasets={DATASET: build_dataset(cfg.data, target.split, train=False, reserved_gpus=reserved_gpus(cfg))},
        dataset_config=ray_train_data_config(cfg.data),
    )
    fit_job(trainer, cfg, "evaluation")
    try:
        return results.get(timeout=60)
    finally:
        results.shutdown()


def training_run_of(ref: str, tracking_uri: str) -> tuple[str | None, str | None]:
    """(run id, experiment id) of the training run whose weights ``ref`` names, or (None, None): the run in a
    ``runs:/`` URI, the source run of a registered model version, or for a job's folder (its final model or a
    checkpoint in ``storage_path/NAME/``) the run tagged with that job's key."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from core.s3 import absolute
    from pipeline.model_ref import mlflow_run_id
    from pipeline.trainer.spec import job_key

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run_id = mlflow_run_id(ref, tracking_uri)
        if run_id is None and not ref.startswith(("runs:/", "models:/")):
            parts = absolute(ref.removeprefix("file://")).rstrip("/").split("/")
            # the job's folder is the reference itself, or up to three levels above it (final_model/, a
            # checkpoint folder, a file in one of those)
            keys = [job_key(parts[i], "/".join(parts[:i])) for i in range(len(parts) - 1, max(len(parts) - 4, 0), -1)]
            experiments = [e.experiment_id for e in client.search_experiments()]
            for key in keys if experiments else []:  # (MLflow's filter has no IN for tags)
                found = client.search_runs(experiments, filter_string=f"tags.`mvit.job_key` = '{key}'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
                if found:
                    run_id = found[0].info.run_id
                    break
        if run_id:
            return run_id, client.get_run(run_id).info.experiment_id
    except MlflowException:
        pass  # the link is a convenience: an evaluation of weights with no known run is still an evaluation
    return None, None


def confusion_png(confusion: list[list[int]], classes: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # each true class's videos as fractions
    n = len(classes)
    size = min(6 + 0.3 * n, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if n <= 60:  # past that the names cannot be read; the JSON report has them
        ax.set_xticks(range(n), classes, rotation=90, fontsize="small")
        ax.set_yticks(range(n), classes, fontsize="small")
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if counts[i, j]:
                        ax.text(j, i, int(counts[i, j]), ha="center", va="center",
                                color="white" if rows[i, j] > 0.5 else "black", fontsize="small")
    ax.set_xlabel("predicted (top-1 of the video's averaged views)")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize="small")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the class's videos")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def record(target: EvalTarget, ref: str, outcome: Any, out: str | None, run_name: str | None) -> dict[str, Any]:
    """Writes the report and the PNG, logs them as an MLflow run and copies them to ``out``."""
    from pipeline.tracking import Tracker, config_hash
    from pipeline.trainer.export import copy_to_storage

    cfg, s = target.cfg, target.cfg.data.sampling
    views = f"{s.eval_clips}x{s.eval_crops}"
    metrics = {f"eval/{k.removeprefix('val/')}": v for k, v in outcome.metrics.items()}
    train_run, train_experiment = training_run_of(ref, target.tracking_uri)
    report = {
        "model": target.model.source, "split": target.split, "views": views, "data_root": redact_value(cfg.data.root),
        "classes": target.classes, "metrics": metrics, "data": outcome.data, "world_size": outcome.world_size,
        "training_run": train_run, **outcome.report,
    }
    tags = {KIND_TAG: "evaluation", "eval_split": target.split, VIEWS_TAG: views, "model_ref": redact_value(ref),
            "config_hash": config_hash(to_container(cfg))}
    if train_run:
        tags[EVALUATES_TAG] = train_run
        tracker_experiment = cfg.tracking.experiment
        if train_experiment is not None:
            from mlflow import MlflowClient

            if MlflowClient(target.tracking_uri).get_experiment(train_experiment).name == tracker_experiment:
                tags["mlflow.parentRunId"] = train_run  # shown under the training run in the MLflow UI
    name = run_name or f"eval-{cfg.name}-{target.split}-{views}"
    # system metrics would be the driver's machine's, not the workers': off for an evaluation's run
    tracker = Tracker(replace(cfg.tracking, log_system_metrics=False), target.tracking_uri, enabled=True)
    run_id = tracker.start(name, None, {**to_container(cfg), "eval": {"model": redact_value(ref),
                                                                         "split": target.split, "views": views}}, tags)
    report["mlflow_run"] = run_id
    with tempfile.TemporaryDirectory(prefix="mvit-eval-") as tmp:
        files = [Path(tmp) / REPORT_FILE, Path(tmp) / CONFUSION_FILE]
        files[0].write_text(json.dumps(report, indent=1) + "\n")
        shown = redact_value(ref)
        confusion_png(outcome.report["confusion"], target.classes, files[1],
                      f"{'...' + shown[-57:] if len(shown) > 60 else shown}\n{target.split}, {views} views: video "
                      f"top-1 {metrics.get('eval/video_top1', float('nan')):.1f}%")
        tracker.log_metrics(metrics, step=0)
        for path in files:
            tracker.log_artifact(str(path), "evaluation")
        tracker.finish()
        if out:
            from core.s3 import storage_options_for

            copy_to_storage(files, out, storage_options_for(out, cfg.data.s3_endpoint_url))
    return report


def evaluate(cfg: ExperimentConfig, ref: str, split: str | None = None, out: str | None = None,
             run_name: str | None = None) -> dict[str, Any]:
    """The whole evaluation: checks, the pass on the cluster, the report. Returns the report."""
    target = prepare(cfg, ref, split or cfg.data.val_split)
    log.info("evaluating %s on %s split %r (%d classes), %dx%d views per video, %d workers", target.model.source,
             redact_value(cfg.data.root), target.split, len(target.classes), cfg.data.sampling.eval_clips,
             cfg.data.sampling.eval_crops, cfg.trainer.num_workers)
    outcome = run_workers(target)
    return record(target, ref, outcome, out, run_name)


def summary(report: dict[str, Any]) -> str:
    m = report["metrics"]
    worst = sorted((c for c in report["per_class"] if c["top1"] is not None), key=lambda c: c["top1"])[:3]
    lines = [f"evaluated {report['model']} on {report['split']} ({report['views']} views per video): "
             f"video top-1 {m.get('eval/video_top1', float('nan')):.2f}%, top-5 {m.get('eval/video_top5', float('nan')):.2f}%"
             f" | view top-1 {m.get('eval/view_top1', float('nan')):.2f}% | {int(m.get('eval/videos', 0))} videos, "
             f"{int(m.get('eval/views', 0))} views, {report['data']['failed']} failed"]
    if worst:
        lines.append("lowest classes: " + ", ".join(f"{c['class']} {c['top1']:.1f}% ({c['videos']})" for c in worst))
    lines.append(f"MLflow run {report['mlflow_run']}"
                 + (f" (evaluates training run {report['training_run']})" if report["training_run"] else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Overrides are key.path=value pairs, as for pipeline/train.py.")
    parser.add_argument("--model", required=True, help="model reference: a final model folder, a checkpoint file or "
                        "folder (local or s3://), runs:/RUN_ID/PATH, models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--config", required=True, help="experiment YAML: the data, its views and, for a bare "
                        "checkpoint, the network")
    parser.add_argument("--split", help="the shard split to evaluate (default: data.val_split)")
    parser.add_argument("--views", help="CLIPSxCROPS per video, e.g. 10x3 (default: data.sampling.eval_clips x "
                        "eval_crops)")
    parser.add_argument("--out", help="also copy report.json and confusion_matrix.png to this folder (local or s3://)")
    parser.add_argument("--run-name", help="MLflow run name (default: eval-NAME-SPLIT-VIEWS)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_redaction()
    from pipeline.trainer.job import JobFailed

    try:
        cfg = load_config(args.config, args.overrides)
        if args.views:
            cfg.data.sampling.eval_clips, cfg.data.sampling.eval_crops = parse_views(args.views)
            cfg.data.validate()
        report = evaluate(cfg, args.model, args.split, args.out, args.run_name)
    except ConfigError as err:
        print(f"error: {redact_value(str(err))}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"error: {redact_value(str(err))}", file=sys.stderr)
        return 1
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
