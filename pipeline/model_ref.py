"""One way to name trained weights, wherever they are: ``resolve(ref) -> ResolvedWeights``.

A model reference is one string. Every command that takes weights (``model.init_from`` of a training
job; later evaluation, prediction and registration) resolves it here, so they accept the same forms and
refuse the same mistakes with the same one line (``ModelRefError``):

- a local path or ``s3://`` URL of a checkpoint *file*: torchvision, PySlowFast, PyTorchVideo or this
  project's state dict (``torch.load(weights_only=True)``), or a ``.safetensors`` file;
- a local path or ``s3://`` URL of a *folder*: a job's final model (``model.safetensors`` +
  ``model_config.json``, ``pipeline.trainer.export``), a DCP checkpoint of a job
  (``train_state.json`` + ``dcp/``, ``pipeline.trainer.checkpoint``), or a folder holding one of those as
  ``final_model/`` or ``model/`` (a job's storage folder, a downloaded MLflow run);
- ``runs:/RUN_ID/PATH``, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` in the job's MLflow tracking
  store, downloaded with MLflow's own artifact API.

What comes back is always the same thing: the weights under this project's names (not yet fitted to a
model: ``fit`` does that, strictly), and when the source says so the ``MViTConfig`` and class names.
Downloads go to a temporary folder that is gone when ``resolve`` returns.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.distributed.checkpoint import CheckpointException  # a BaseException, not an Exception

from core.errors import CheckpointMismatch, one_line
from core.redact import redact_value
from pipeline.models.config import MViTConfig
from pipeline.models.convert import (
    FittedState,
    StateDict,
    check_slowfast_cfg,
    detect_format,
    fit_to_model,
    load_checkpoint_file,
    to_native,
    unwrap_checkpoint,
)
from pipeline.trainer.checkpoint import DCP_DIR  # a DCP checkpoint folder's files
from pipeline.trainer.checkpoint import TRAIN_STATE_FILE as DCP_STATE
from pipeline.trainer.export import CONFIG_FILE as FINAL_CONFIG  # the final model folder's files
from pipeline.trainer.export import WEIGHTS_FILE as FINAL_WEIGHTS

_NESTED = ("final_model", "model")  # where a job's storage folder or an MLflow run keeps the final model
MLFLOW_SCHEMES = ("runs:/", "models:/")
Kind = Literal["file", "final_model", "dcp"]
# MViT fields that change what the weights compute without changing a key or a shape
_UNSEEN_FIELDS = ("pool_mode", "residual_pooling", "dim_mul_in_attention")


class ModelRefError(ValueError):
    """A model reference that cannot be used: its one-line message says which and why."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Weights a reference names, under this project's parameter names, with what is known about them."""

    ref: str  # the reference as given (secrets redacted): what logs and MLflow tags show
    kind: Kind  # what the reference turned out to be
    fmt: str  # the layout the weights were stored in: native, slowfast, pytorchvideo, torchvision, dcp
    state: StateDict
    model_config: MViTConfig | None = None  # from a final model folder's model_config.json
    classes: list[str] | None = None  # idem, index = label
    pyslowfast_cfg: str | None = None  # a PySlowFast file's training config text (what its weights cannot show)

    def describe(self) -> str:
        extra = f", {len(self.classes)} classes" if self.classes else ""
        return f"{self.ref} ({self.kind}, {self.fmt} layout, {len(self.state)} tensors{extra})"


def resolve(ref: str, tracking_uri: str | None = None, s3_endpoint_url: str | None = None) -> ResolvedWeights:
    """Reads the weights ``ref`` names. ``tracking_uri`` is the MLflow store ``runs:/`` and ``models:/`` refer
    to (the job's); ``s3_endpoint_url`` the S3 endpoint (else the environment's, ``core.s3``).

    Raises ``ModelRefError`` (one line) for an empty or unknown kind of reference, a missing path, run or
    model, an unreadable or unsafe file and a folder that holds no weights.
    """
    shown = redact_value(ref.strip()) if isinstance(ref, str) else repr(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise ModelRefError("empty model reference: give a path, an s3:// URL, runs:/RUN_ID/PATH or models:/NAME/VERSION")
    ref = ref.strip()
    try:
        with tempfile.TemporaryDirectory(prefix="mvit-model-ref-") as tmp:
            if ref.startswith(MLFLOW_SCHEMES):
                local = _download_mlflow(ref, shown, tracking_uri, Path(tmp))
            elif ref.startswith(("s3://", "s3a://")):
                local = _download_s3(ref, shown, s3_endpoint_url, Path(tmp))
            elif ("://" in ref and not ref.startswith("file://")) or ref.startswith(("models:", "runs:")):
                raise ModelRefError(f"model reference {shown!r}: unknown scheme {ref.split(':', 1)[0]!r}; use a "
                                    "local path, s3://..., runs:/RUN_ID/PATH, models:/NAME/VERSION or models:/NAME@ALIAS")
            else:
                local = Path(ref.removeprefix("file://")).expanduser()
                if not local.exists():
                    raise ModelRefError(f"model reference {shown!r}: no such file or folder")
            return _read_local(local, shown)
    except ModelRefError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - any unreadable file or folder: one line
        raise ModelRefError(f"model reference {shown!r}: cannot read it: {one_line(err)}") from None


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))(?:/(?P<path>.*))?$")


def _download_mlflow(ref: str, shown: str, tracking_uri: str | None, dst: Path) -> Path:
    """MLflow's own download (``mlflow.artifacts.download_artifacts``) of a run's artifact path, or of a
    registered model version (by number or alias) found with ``MlflowClient`` in the job's store: the
    registry is the tracking store unless ``MLFLOW_REGISTRY_URI`` names another (MLflow's default).

    A ``models:/`` URI is turned into the version's download URI here because MLflow's own resolution of
    it reads the process-wide registry URI, not the one a caller passes.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    where = f" in the MLflow store {redact_value(tracking_uri)!r}" if tracking_uri else ""
    try:
        uri = ref
        if ref.startswith("models:/"):
            match = _MODEL_URI.match(ref.rstrip("/"))
            if match is None or (match["version"] is not None and not match["version"].isdigit()):
                raise ModelRefError(f"model reference {shown!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS "
                                    "(a version number or an alias; stages are not supported)")
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry)
            version = match["version"] or client.get_model_version_by_alias(match["name"], match["alias"]).version
            uri = client.get_model_version_download_uri(match["name"], version)
            uri = uri.rstrip("/") + (f"/{match['path']}" if match["path"] else "")
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri))
    except MlflowException as err:
        raise ModelRefError(f"model reference {shown!r}: not found{where}: {one_line(err, 200)}") from None
    except OSError as err:
        raise ModelRefError(f"model reference {shown!r}: MLflow could not download it: {one_line(err)}") from None


def mlflow_run_id(ref: str, tracking_uri: str | None = None) -> str | None:
    """The MLflow run a ``runs:/`` reference names, or that a registered model version (``models:/``, by
    number or alias) was created from; None for other references or a version with no run."""
    if ref.startswith("runs:/"):
        return ref[len("runs:/"):].split("/", 1)[0] or None
    match = _MODEL_URI.match(ref.rstrip("/")) if ref.startswith("models:/") else None
    if match is None:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)
    version = match["version"] or client.get_model_version_by_alias(match["name"], match["alias"]).version
    return client.get_model_version(match["name"], version).run_id or None


def _download_s3(ref: str, shown: str, endpoint_url: str | None, dst: Path) -> Path:
    """The file, or the whole folder, at ``ref`` copied to ``dst`` with s3fs (the project's endpoint and
    retry policy, ``core.s3.storage_options_for``)."""
    import fsspec

    from core.s3 import storage_options_for

    try:
        fs, path = fsspec.core.url_to_fs(ref, **storage_options_for(ref, endpoint_url))
        path = path.rstrip("/")
        if fs.isfile(path):
            target = dst / Path(path).name
            fs.get_file(path, str(target))
            return target
        if fs.isdir(path):
            target = dst / (Path(path).name or "weights")
            fs.get(path + "/", str(target), recursive=True)
            return target
    except Exception as err:  # noqa: BLE001 - no credentials, endpoint down, access denied: one line
        raise ModelRefError(f"model reference {shown!r}: cannot read it from S3: {one_line(err)}") from None
    raise ModelRefError(f"model reference {shown!r}: no such file or folder in S3")


def _read_local(path: Path, shown: str) -> ResolvedWeights:
    if path.is_file():
        return _read_file(path, shown)
    for folder in (path, *(path / name for name in _NESTED)):
        if (folder / FINAL_WEIGHTS).is_file() and (folder / FINAL_CONFIG).is_file():
            return _read_final_model(folder, shown)
        if (folder / DCP_STATE).is_file() and (folder / DCP_DIR / ".metadata").is_file():
            return ResolvedWeights(shown, "dcp", "dcp", read_dcp_model(folder / DCP_DIR))
    raise ModelRefError(
        f"model reference {shown!r}: the folder holds no weights: expected a final model ({FINAL_WEIGHTS} + "
        f"{FINAL_CONFIG}), a DCP checkpoint ({DCP_STATE} + {DCP_DIR}/), or one of those in final_model/ or model/")


def _read_file(path: Path, shown: str) -> ResolvedWeights:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: dict[str, Any] = load_file(str(path))
        obj: object = state
    else:
        obj = load_checkpoint_file(path)
        state = unwrap_checkpoint(obj)
    fmt = detect_format(state)
    text = obj.get("cfg") if isinstance(obj, dict) and "model_state" in obj else None
    return ResolvedWeights(shown, "file", fmt, to_native(state, fmt),
                           pyslowfast_cfg=text if isinstance(text, str) else None)


def read_final_model(folder: Path) -> tuple[StateDict, MViTConfig, list[str] | None]:
    """A final model folder's weights, network and class names."""
    from safetensors.torch import load_file

    meta = json.loads((folder / FINAL_CONFIG).read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("mvit_config"), dict):
        raise ValueError(f"{FINAL_CONFIG} has no mvit_config mapping")
    cfg = MViTConfig.from_dict(meta["mvit_config"])
    classes = meta.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{FINAL_CONFIG}: 'classes' must be a list of names, got {classes!r:.80}")
    if classes and len(classes) != cfg.num_classes:
        raise ValueError(f"{FINAL_CONFIG}: {len(classes)} class names for a {cfg.num_classes}-class head")
    return load_file(str(folder / FINAL_WEIGHTS)), cfg, list(classes) if classes else None


def _read_final_model(folder: Path, shown: str) -> ResolvedWeights:
    state, cfg, classes = read_final_model(folder)
    return ResolvedWeights(shown, "final_model", "native", state, cfg, classes)


def read_dcp_model(dcp_dir: Path) -> StateDict:
    """The model part of a DCP checkpoint as one full state dict, in this process, with no process group
    (``dcp.load(no_dist=True)``); read as the job resumes, through the safe reader and planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pipeline.trainer.checkpoint import SafeFileSystemReader, SafeLoadPlanner

    metadata = SafeFileSystemReader(str(dcp_dir)).read_metadata()
    model = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    if not model:
        raise ValueError("the DCP checkpoint holds no model tensors")
    target = {"model": model}
    with warnings.catch_warnings():  # DCP warns that it loads in one process without a process group: meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=SafeFileSystemReader(str(dcp_dir)), planner=SafeLoadPlanner(), no_dist=True)
    return {k.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): v for k, v in model.items()}


def head_policy(weights: ResolvedWeights, init_head: str, classes: list[str] | None) -> str:
    """``fit_to_model``'s head policy for a job: ``keep`` stays strict, ``new`` re-initialises the classifier
    when its class count differs (by shape) or, when the weights name their classes, when the names differ."""
    if init_head == "new" and weights.classes and classes and weights.classes != list(classes):
        return "drop"
    return init_head


def check_against(weights: ResolvedWeights, model_cfg: MViTConfig, classes: list[str] | None, init_head: str) -> None:
    """Refuses, with one line, weights that would load but mean something else in this job: a network whose
    config differs where no weight shows it, or a kept classifier whose classes are other ones (same count,
    other names or order)."""
    if weights.pyslowfast_cfg is not None:
        try:
            check_slowfast_cfg({"model_state": {}, "cfg": weights.pyslowfast_cfg}, model_cfg)
        except CheckpointMismatch as err:
            raise ModelRefError(f"model reference {weights.ref!r}: {one_line(err)}") from None
    if weights.model_config is not None:
        differ = [f"{name}={getattr(weights.model_config, name)!r} (this model: {getattr(model_cfg, name)!r})"
                  for name in _UNSEEN_FIELDS if getattr(weights.model_config, name) != getattr(model_cfg, name)]
        if differ:
            raise ModelRefError(f"model reference {weights.ref!r} was trained as another network: {', '.join(differ)}")
    if init_head == "keep" and weights.classes and classes and weights.classes != list(classes):
        same = len(weights.classes) == len(classes)
        raise ModelRefError(
            f"model reference {weights.ref!r} classifies {len(weights.classes)} classes "
            f"({', '.join(weights.classes[:4])}{', ...' if len(weights.classes) > 4 else ''}) "
            f"{'in another order or with other names than' if same else 'but'} the data's {len(classes)} "
            f"({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}); set model.init_head=new to train a "
            "new classifier")


def fit(weights: ResolvedWeights, model: torch.nn.Module, init_head: str = "keep",
        classes: list[str] | None = None, training: bool = True) -> FittedState:
    """``weights`` checked against ``model``'s job (``check_against``) and fitted to it (``fit_to_model``):
    every key of the model, strictly; the classifier re-initialised only as ``init_head`` allows.
    ``training``: the refusal may suggest ``model.init_head=new`` (a job's remedy, not an evaluation's)."""
    check_against(weights, model.cfg, classes, init_head)
    try:
        return fit_to_model(model, weights.state, head_policy(weights, init_head, classes))  # type: ignore[arg-type]
    except CheckpointMismatch as err:
        text = str(err).replace("\n  ", "; ")
        hint = ""
        if training and init_head == "keep" and "head.projection" in text:
            hint = " (a classifier for other classes: set model.init_head=new to re-initialise it)"
        raise ModelRefError(f"model reference {weights.ref!r} does not fit the model: {text[:1500]}{hint}") from None


@dataclass(frozen=True)
class InferenceModel:
    """A reference turned into a network ready to run (eval mode, fp32, CPU), with what it classifies."""

    model: torch.nn.Module  # pipeline.models.mvit.MViT
    config: MViTConfig
    classes: list[str] | None
    source: str  # ``ResolvedWeights.describe()``


# What decides whether a model can take the data's clips and labels: compared before any work starts.
_INPUT_FIELDS = (("num_frames", "frames"), ("crop_size", "crop"), ("in_channels", "channels"),
                 ("num_classes", "classes"))


def _names(classes: list[str]) -> str:
    return f"{len(classes)} classes ({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''})"


def load_for_inference(ref: str, model_cfg: MViTConfig | None = None, classes: list[str] | None = None, *,
                       tracking_uri: str | None = None, s3_endpoint_url: str | None = None,
                       what: str = "the data", compare: bool = True) -> InferenceModel:
    """The network ``ref`` names, its weights loaded strictly, for evaluation, prediction and export.

    The network is the one the reference records (a final model folder, a registered model); a bare
    checkpoint file or a DCP checkpoint records none, so ``model_cfg`` (from an experiment config) builds
    it. When both exist they must agree on what the data feeds the model (frames, crop, channels, class
    count), and class names known on both sides must be the same list: otherwise ``ModelRefError`` says
    which, in one line, before anything is decoded. ``what`` names the other side in that line.
    ``compare=False`` uses ``model_cfg`` only to build a network the reference does not record (the caller
    checks the data against the network itself).
    """
    from pipeline.models.mvit import MViT

    weights = resolve(ref, tracking_uri=tracking_uri, s3_endpoint_url=s3_endpoint_url)
    cfg = weights.model_config or model_cfg
    if cfg is None:
        raise ModelRefError(f"model reference {weights.ref!r} is a {weights.fmt} {weights.kind} that does not say "
                            "which network it is: give --config with the experiment that describes it")
    if compare and weights.model_config is not None and model_cfg is not None:
        differ = [f"{name} {getattr(weights.model_config, field)} (for {what}: {getattr(model_cfg, field)})"
                  for field, name in _INPUT_FIELDS if getattr(weights.model_config, field) != getattr(model_cfg, field)]
        if differ:
            raise ModelRefError(f"model/data mismatch: model reference {weights.ref!r} takes {', '.join(differ)}")
    if weights.classes and classes and list(weights.classes) != list(classes):
        raise ModelRefError(f"model/data mismatch: model reference {weights.ref!r} classifies "
                            f"{_names(weights.classes)}, {what} has {_names(classes)}")
    with torch.device("meta"):
        skeleton = MViT(cfg)
    fitted = fit(weights, skeleton, "keep", training=False)  # strict: every key, every shape
    model = MViT(cfg)
    model.load_state_dict({k: v.float() for k, v in fitted.state.items()})
    return InferenceModel(model.eval(), cfg, weights.classes or (list(classes) if classes else None),
                          weights.describe())


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.model_ref REF``: what a reference resolves to, before a job uses it."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.model_ref",
        description="Resolve a model reference (what model.init_from takes) and say what it holds: a checkpoint "
                    "file or folder (local or s3://), a final model folder, a DCP checkpoint, runs:/RUN_ID/PATH, "
                    "models:/NAME/VERSION or models:/NAME@ALIAS.")
    parser.add_argument("ref", help="the model reference")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of runs:/ and models:/ (default: "
                        "MLFLOW_TRACKING_URI)")
    parser.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL[_S3])")
    args = parser.parse_args(argv)
    try:
        weights = resolve(args.ref, tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                          s3_endpoint_url=args.s3_endpoint_url)
    except ModelRefError as err:
        print(f"error: {redact_value(str(err))}", file=sys.stderr)
        return 2
    print(weights.describe())
    if weights.model_config is not None:
        cfg = weights.model_config
        print(f"network: depth {cfg.depth}, embed_dim {cfg.embed_dim}, {cfg.num_frames}x{cfg.crop_size}^2 input, "
              f"{cfg.num_classes} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
