"""MLflow tracking for a training job: one run per job, written by rank 0 only.

The run id is stored in every checkpoint, so a job restarted by Ray (worker loss, ``max_failures``)
or resubmitted under the same name reopens the same run and its step axis continues. Parameters are
the flattened resolved config with secrets removed (see ``core.redact``): the value of a secret environment
variable (also one a config took from ``${oc.env:...}``), anything shaped like a credential and a password
inside a URI never reach MLflow, in params, tags, the run name or the experiment name.

``register_final_model`` puts a finished job's final model into the MLflow Model Registry
(``tracking.register_as``; also ``python -m pipeline.register``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError, one_line
from core.redact import redact_mapping, redact_value

log = logging.getLogger(__name__)

JOB_KEY_TAG = "mvit.job_key"  # the tag that ties a run to its job (name + storage), see Tracker.start
MODEL_ARTIFACT_PATH = "model"  # where a job logs its final model in its run (pipeline.trainer.loop)
EXAMPLE_FILE = "input_example.npz"  # the registered version's input example, beside the weights
RESOLVED_CONFIG = "config/resolved_config.yaml"  # the job's config as its run keeps it (pipeline.trainer.job)

# MLflow refuses a registered model name with '/' or ':' or one that a path normalises to another name;
# this is that rule narrowed to names that need no quoting in models:/NAME@ALIAS, a search filter or a shell.
_REGISTRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,255}")
_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")  # MLflow's alias rule ([\w-], at most 255)
_VERSION_LIKE = re.compile(r"[vV][0-9]+")  # MLflow reserves these aliases (and "latest") for versions


def registry_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a registered model's name here, else None."""
    if not _REGISTRY_NAME.fullmatch(name):
        return ("must be a registered model name: 1-256 characters of letters, digits, '_', '.' and '-', "
                "starting with a letter, digit or '_'")
    return None


def alias_problem(alias: str) -> str | None:
    """Why ``alias`` cannot be a registered model alias (MLflow's rules), else None."""
    if not _ALIAS.fullmatch(alias):
        return "must be a model alias: 1-255 characters of letters, digits, '_' and '-'"
    if alias.lower() == "latest" or _VERSION_LIKE.fullmatch(alias):
        return "is reserved by MLflow for version numbers (latest, v1, V2, ...): choose another alias"
    return None


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
    register_as: str = ""  # a Model Registry name for the finished job's final model; "" = not registered
    register_alias: str = ""  # an alias set on that version (e.g. candidate); needs register_as

    def __post_init__(self) -> None:
        """Raises ``ConfigError`` keyed ``tracking.*``: ``load_config`` names the source of that key. The
        registry names are checked here so that a job does not train for hours to be refused at the end."""
        if self.log_every_steps < 1:
            raise ConfigError("must be >= 1", "tracking.log_every_steps", self.log_every_steps)
        if not self.experiment.strip():
            raise ConfigError("must name an MLflow experiment", "tracking.experiment", self.experiment)
        problem = registry_name_problem(self.register_as) if self.register_as else None
        if problem:
            raise ConfigError(problem, "tracking.register_as", self.register_as)
        if self.register_alias and not self.register_as:
            raise ConfigError("needs tracking.register_as (the registered model that gets the alias)",
                              "tracking.register_alias", self.register_alias, related=("tracking.register_as",))
        problem = alias_problem(self.register_alias) if self.register_alias else None
        if problem:
            raise ConfigError(problem, "tracking.register_alias", self.register_alias)


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


# -- Model Registry --------------------------------------------------------------------------------


class RegistryError(RuntimeError):
    """A final model that could not be registered, in one line; from ``register_final_model`` and
    ``register_job_model`` the line ends with the command that registers it by hand (``hand_command``)."""


@dataclass(frozen=True)
class Registered:
    """A model version made from a run's final model."""

    name: str
    version: str
    run_id: str
    alias: str = ""
    created: bool = True  # False: this run's final model was already that version (registering is idempotent)

    def describe(self) -> str:
        alias = f" (alias @{self.alias}: models:/{self.name}@{self.alias})" if self.alias else ""
        again = "" if self.created else ", already registered"
        return f"models:/{self.name}/{self.version}{alias} from runs:/{self.run_id}/{MODEL_ARTIFACT_PATH}{again}"


def hand_command(tracking_uri: str, name: str, alias: str = "", run_id: str | None = None) -> str:
    """The ``python -m pipeline.register`` line that does what failed, with the store's secrets redacted."""
    alias_arg = f" --alias {alias}" if alias else ""
    return (f"python -m pipeline.register --model runs:/{run_id or 'RUN_ID'}/{MODEL_ARTIFACT_PATH} --name {name}"
            f"{alias_arg} --tracking-uri '{redact_value(tracking_uri)}'")


def _client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` on the job's store; the registry is that store unless ``MLFLOW_REGISTRY_URI`` names
    another (MLflow's default, and what ``pipeline.model_ref`` reads ``models:/`` from)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)


def find_job_run(tracking_uri: str, experiment: str, job_key: str) -> str:
    """The id of the finished run of the job ``job_key`` (the latest to finish, if a job ran more than once
    under the same name and storage with its checkpoints gone). Raises ``RegistryError`` without a run id."""
    name = redact_value(experiment)  # as Tracker.start named it
    try:
        client = _client(tracking_uri)
        found = client.get_experiment_by_name(name)
        runs = [] if found is None else client.search_runs(
            [found.experiment_id], f"tags.`{JOB_KEY_TAG}` = '{job_key}' and attributes.status = 'FINISHED'",
            order_by=["attributes.end_time DESC"], max_results=1)
    except Exception as err:  # noqa: BLE001 - a store that cannot be asked: one line, nothing lost
        raise RegistryError(f"cannot search the MLflow store for the job's run: {one_line(err)}") from None
    if not runs:
        raise RegistryError(f"no finished run tagged {JOB_KEY_TAG}={job_key} in experiment {name!r}")
    return runs[0].info.run_id


def register_job_model(tracking_uri: str, cfg: TrackingConfig, job_key: str) -> Registered:
    """``tracking.register_as`` for a finished job: its run found by the job's key, then registered."""
    try:
        run_id = find_job_run(tracking_uri, cfg.experiment, job_key)
    except RegistryError as err:
        command = hand_command(tracking_uri, cfg.register_as, cfg.register_alias)
        raise RegistryError(f"{err}; register it by hand: {command} (RUN_ID: the run tagged {JOB_KEY_TAG}={job_key})"
                            ) from None
    return register_final_model(tracking_uri, run_id, cfg.register_as, cfg.register_alias)


def register_final_model(tracking_uri: str, run_id: str, name: str, alias: str = "") -> Registered:
    """Registers the final model a job logged in run ``run_id`` (``model/``: ``model.safetensors`` +
    ``model_config.json``) as a version of ``name``, and points ``alias`` at it.

    The version's source is that folder itself, so ``models:/NAME/VERSION`` downloads the job's own files
    (what ``pipeline.model_ref`` reads as a final model), no copy of the weights. Two files are added to it
    first, because MLflow registers a ``runs:/`` folder only as an MLflow Model (``mlflow.register_model``
    looks for its ``MLmodel``): ``MLmodel`` without a flavour, whose signature and metadata state the input
    contract (the same one ``pipeline.export`` writes into ONNX files), and ``input_example.npz``, one clip of
    the model's shape (see ``example_clip``). Class names and the network config go on the version as tags.
    Registering the same run under the same name again returns the version it already has.

    Raises ``RegistryError`` (one line, with the command that retries it); the run is never changed
    beyond those two added files.
    """
    from mlflow.exceptions import MlflowException

    from pipeline.trainer.export import CONFIG_FILE, WEIGHTS_FILE

    try:
        client = _client(tracking_uri)
        with tempfile.TemporaryDirectory(prefix="mvit-register-") as tmp:
            cfg, classes = _describe_final_model(client, run_id, Path(tmp))
            extra = Path(tmp) / "extra"
            _write_mlflow_model(client, run_id, cfg, classes, extra)
            client.log_artifacts(run_id, str(extra), MODEL_ARTIFACT_PATH)
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
        known = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                 if v.source in (source, f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}")]
        if known:
            version, created = max(known, key=lambda v: int(v.version)).version, False
        else:
            try:
                client.create_registered_model(name)
            except MlflowException as err:
                if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            shape = [-1, *cfg.input_shape]
            tags = {"classes": json.dumps(classes), "num_classes": str(cfg.num_classes),
                    "input_shape": json.dumps(shape), "model_config": json.dumps(dataclasses.asdict(cfg))}
            description = (f"MViT final model of run {run_id}: float32 clips {tuple(shape)} (NCTHW, normalised) -> "
                           f"logits for {cfg.num_classes} classes. Files: {WEIGHTS_FILE} + {CONFIG_FILE} "
                           "(pipeline.model_ref reads models:/ references), MLmodel (signature and input recipe), "
                           f"{EXAMPLE_FILE} (one clip).")
            version = client.create_model_version(name, source, run_id=run_id, tags=tags,
                                                  description=description).version
            created = True
        if alias:
            client.set_registered_model_alias(name, alias, version)
    except Exception as err:  # noqa: BLE001 - whatever the store or the run's files refuse: one line
        raise RegistryError(f"registering runs:/{run_id}/{MODEL_ARTIFACT_PATH} as {name!r} failed: "
                            f"{one_line(err)}; the run and its files are kept; register it by hand: "
                            f"{hand_command(tracking_uri, name, alias, run_id)}") from None
    return Registered(name, str(version), run_id, alias, created)


def _describe_final_model(client: Any, run_id: str, tmp: Path) -> tuple[Any, list[str] | None]:
    """The network config and class names of the run's final model; refuses a run that has none."""
    from pipeline.models.config import MViTConfig
    from pipeline.trainer.export import CONFIG_FILE, WEIGHTS_FILE

    logged = {Path(a.path).name for a in client.list_artifacts(run_id, MODEL_ARTIFACT_PATH)}
    if not {WEIGHTS_FILE, CONFIG_FILE} <= logged:
        raise ValueError(f"the run has no final model: {MODEL_ARTIFACT_PATH}/ holds {sorted(logged) or 'nothing'}, "
                         f"not {WEIGHTS_FILE} + {CONFIG_FILE}")
    meta = json.loads(Path(client.download_artifacts(run_id, f"{MODEL_ARTIFACT_PATH}/{CONFIG_FILE}", str(tmp)))
                      .read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("mvit_config"), dict):
        raise ValueError(f"{MODEL_ARTIFACT_PATH}/{CONFIG_FILE} has no mvit_config mapping")
    classes = meta.get("classes")
    return MViTConfig.from_dict(meta["mvit_config"]), list(classes) if classes else None


def _input_spec(client: Any, run_id: str, cfg: Any, tmp: Path) -> Any:
    """The data recipe the model was trained with, from the run's resolved config when it has one (a job's run
    does), else ``pipeline.data``'s defaults for this kind of model; the recipe field says which."""
    from pipeline.serving.model import ServingError
    from pipeline.serving.spec import default_input_spec, input_spec_from_experiment

    if RESOLVED_CONFIG not in {a.path for a in client.list_artifacts(run_id, str(Path(RESOLVED_CONFIG).parent))}:
        return default_input_spec(cfg)
    path = client.download_artifacts(run_id, RESOLVED_CONFIG, str(tmp))
    try:
        spec = input_spec_from_experiment(cfg, path)
    except (ConfigError, ServingError) as err:
        log.warning("runs:/%s/%s does not describe the final model's input (%s): the input recipe registered is "
                    "pipeline.data's default", run_id, RESOLVED_CONFIG, one_line(err))
        return default_input_spec(cfg)
    return dataclasses.replace(spec, recipe=f"runs:/{run_id}/{RESOLVED_CONFIG}")


def example_clip(input_shape: tuple[int, ...], mean: Any, std: Any) -> Any:
    """One clip of the model's input shape (1, C, T, H, W), float32, normalised with the training recipe.

    Its frames are a colour ramp that moves diagonally (a synthetic clip, not a video: what the model says
    about it means nothing). It shows a caller the exact tensor the network takes and runs as is; being
    smooth, it compresses to 54 KB at 3x16x224^2, where noise takes 8.9 MB and MLflow's own input example
    (JSON) 49 MB: so the example is this file, and the shape is also in MLflow's signature."""
    import numpy as np

    c, t, h, w = input_shape
    ramp = (np.arange(t)[:, None, None] * 4 + np.arange(h)[None, :, None] + np.arange(w)[None, None, :]) * 4
    frames = np.stack([(ramp + 85 * i) % 256 for i in range(c)]).astype(np.float32) / 255
    mean_, std_ = (np.asarray(v, np.float32)[:, None, None, None] for v in (mean, std))
    return ((frames - mean_) / std_)[None].astype(np.float32)


def _write_mlflow_model(client: Any, run_id: str, cfg: Any, classes: list[str] | None, out: Path) -> None:
    """``MLmodel`` (signature, and the input contract as metadata) and the input example, into ``out``."""
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline.serving.spec import INPUT_NAME, OUTPUT_NAME, metadata
    from pipeline.trainer.export import CONFIG_FILE, WEIGHTS_FILE

    out.mkdir(parents=True)
    spec = _input_spec(client, run_id, cfg, out.parent)
    np.savez_compressed(out / EXAMPLE_FILE, **{INPUT_NAME: example_clip(cfg.input_shape, spec.mean, spec.std)})
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *cfg.input_shape), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.num_classes), OUTPUT_NAME)]))
    files = {"weights": WEIGHTS_FILE, "config": CONFIG_FILE, "input_example": EXAMPLE_FILE,
             "read_with": "pipeline.model_ref (models:/NAME/VERSION)"}
    info = metadata(spec, tuple(classes) if classes else None, cfg, {"format": "mvit final model", **files})
    Model(artifact_path=MODEL_ARTIFACT_PATH, run_id=run_id, signature=signature, metadata=info).save(
        str(out / "MLmodel"))
