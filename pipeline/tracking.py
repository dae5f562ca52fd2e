"""MLflow tracking for a training job: one run per job, written by rank 0 only.

The run id is stored in every checkpoint, so a job restarted by Ray (worker loss, ``max_failures``)
or resubmitted under the same name reopens the same run and its step axis continues. Parameters are
the flattened resolved config with secrets removed (see ``core.redact``): the value of a secret environment
variable (also one a config took from ``${oc.env:...}``), anything shaped like a credential and a password
inside a URI never reach MLflow, in params, tags, the run name or the experiment name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.redact import redact_mapping, redact_value

log = logging.getLogger(__name__)



@dataclass
class TrackingConfig:
    """Where and how the job is tracked. ``tracking_uri`` empty means ``MLFLOW_TRACKING_URI`` from the
    environment, else a local SQLite file ``sqlite:///<storage>/mlflow.db`` (see ``resolve_uri``)."""

    tracking_uri: str = ""
    experiment: str = "mvit"
    run_name: str = ""  # defaults to the job name
    log_system_metrics: bool = True
    log_every_steps: int = 10
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Raises ``ConfigError`` keyed ``tracking.*``: ``load_config`` names the source of that key."""
        if self.log_every_steps < 1:
            raise ConfigError("must be >= 1", "tracking.log_every_steps", self.log_every_steps)
        if not self.experiment.strip():
            raise ConfigError("must name an MLflow experiment", "tracking.experiment", self.experiment)


def resolve_uri(cfg: TrackingConfig, default_dir: str) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(default_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database file, not into the current directory
    (which for a Ray job is a temporary copy of the working dir). Servers choose their own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").as_uri()
    return None


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON text (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def config_hash(resolved: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit(repo_dir: str | None = None) -> str:
    """The commit the code runs from: git if available, else the RAY job working dir has none."""
    env_commit = os.environ.get("MVIT_GIT_COMMIT")
    if env_commit:
        return env_commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir or os.getcwd(), capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Thin rank-0 wrapper over the MLflow fluent API; on other ranks every call is a no-op.

    Metrics are logged asynchronously (MLflow's ``synchronous=False``): a step then never waits for
    the tracking store (an HTTP round trip to a remote server, a SQLite commit locally: 1.5-3.6% of
    the demo's step when logged every 2 steps, docs/benchmarks.md). ``flush`` waits for every metric
    logged so far and raises the store's error if one failed; the trainer calls it before each
    checkpoint, so the metrics of every step a checkpoint covers are stored, and a restart, which
    redoes the steps after it, logs theirs again.
    """

    def __init__(self, cfg: TrackingConfig, uri: str, enabled: bool) -> None:
        self.cfg = cfg
        self.uri = uri
        self.enabled = enabled
        self.run_id: str | None = None
        self._pending: list[Any] = []  # MLflow RunOperations of metrics not yet known to be stored

    def start(self, run_name: str, resume_run_id: str | None, params: Mapping[str, Any], tags: Mapping[str, str],
              job_key: str = "") -> str | None:
        """Opens the job's run and returns its id; logs params once.

        The run to continue is ``resume_run_id`` (from the checkpoint) or, for a job that failed before
        its first checkpoint, the unfinished run tagged with the same ``job_key``.
        """
        if not self.enabled:
            return None
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        name = redact_value(self.cfg.experiment)
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            mlflow.create_experiment(name, artifact_location=default_artifact_location(self.uri))
        experiment = mlflow.set_experiment(name)
        if not resume_run_id and job_key:
            found = mlflow.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`mvit.job_key` = '{job_key}' and attributes.status != 'FINISHED'",
                order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
            )
            resume_run_id = found[0].info.run_id if found else None
        tags = {**tags, "mvit.job_key": job_key} if job_key else dict(tags)
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=self.cfg.log_system_metrics)
            log.info("resumed MLflow run %s", resume_run_id)
        else:
            run = mlflow.start_run(run_name=redact_value(run_name), log_system_metrics=self.cfg.log_system_metrics)
            flat = flatten(redact_mapping(params))
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps a log_params batch at 100
                mlflow.log_params(dict(items[i : i + 100]))
        # User tags go through the same redaction as params: a tag named like a secret, or holding a
        # password in a URI or an environment secret's value, is stored as ***.
        mlflow.set_tags(redact_mapping({**tags, **self.cfg.tags}))
        self.run_id = run.info.run_id
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            self._pending.append(
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, synchronous=False))

    def flush(self) -> None:
        """Waits until every metric logged so far is stored; raises the tracking store's error if one was
        refused (the asynchronous queue keeps it on the operation, not in the step that logged it)."""
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(path, artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_text(text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            import mlflow

            self.flush()
            if mlflow.active_run() is not None:
                mlflow.end_run(status=status)
