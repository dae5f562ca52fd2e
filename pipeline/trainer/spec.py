"""What the driver hands every Ray Train worker: the ``JobSpec``.

It is decided once, on the driver (which checked the config and read the manifests), and travels to
the workers in ``train_loop_config``, so no worker re-reads a manifest or re-resolves a URI, and every
rank of every restart works from the same facts. Plain values only: it is pickled by Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class InitWeights:
    """The weights a job starts from (``model.init_from``), resolved and fitted to the model on the driver.

    ``weights`` is a Ray object reference to the fitted state dict without the ``reinitialized`` keys (those
    keep the model's fresh values): every rank reads the same object, whatever node it runs on, and no
    worker touches the reference's storage or MLflow store again.
    """

    source: str  # ``ResolvedWeights.describe()``: the reference (redacted) and what it was
    weights: Any  # ray.ObjectRef[dict[str, torch.Tensor]]
    reinitialized: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobSpec:
    experiment: dict[str, Any]  # the resolved ExperimentConfig as plain values (``pipeline.config.to_container``)
    tracking_uri: str  # MLflow: tracking.tracking_uri, else MLFLOW_TRACKING_URI, else a SQLite file in storage
    job_key: str  # identifies the job (name + storage) across restarts and resubmissions: one MLflow run
    classes: list[str]  # class names, from the shard set's manifest (index = label)
    tags: dict[str, str] = field(default_factory=dict)  # MLflow tags: commit, hashes, versions, preset
    texts: dict[str, str] = field(default_factory=dict)  # MLflow artifact path -> text (config, manifests)
    export_dir: str = ""  # where the final model is copied (storage_path/NAME/final_model)
    export_storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for export_dir
    init: InitWeights | None = None  # model.init_from; None = random initialisation

    def config(self) -> Any:
        """The typed ``ExperimentConfig`` again, built (and validated) in the worker."""
        from pipeline.config import from_container

        return from_container(self.experiment)


def job_key(name: str, storage_path: str) -> str:
    """What identifies a job across restarts and resubmissions (its MLflow run is tagged ``mvit.job_key``):
    its name and where it keeps checkpoints, so a job's folder (``storage_path/name``) leads to its run."""
    import hashlib

    return hashlib.sha256(f"{name}\0{storage_path}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvalSpec:
    """What the driver of an evaluation (``pipeline.evaluate``) hands every Ray Train worker: the network,
    its weights (a Ray object reference to the full fp32 state dict, read by every rank), the experiment
    (data recipe, precision) and where rank 0 puts the result (a ``ray.util.queue.Queue`` the driver owns)."""

    experiment: dict[str, Any]
    model_config: Any  # pipeline.models.config.MViTConfig
    weights: Any  # ray.ObjectRef[dict[str, torch.Tensor]]
    classes: list[str]
    split: str
    results: Any  # ray.util.queue.Queue

    def config(self) -> Any:
        from pipeline.config import from_container

        return from_container(self.experiment)
