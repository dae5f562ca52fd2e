"""The typed configuration of a training job, loaded from YAML with command-line overrides.

One dataclass per concern (model, data, optim, trainer, tracking), composed in ``ExperimentConfig``.
OmegaConf merges ``configs/experiment/*.yaml`` and ``key.path=value`` overrides onto the schema and
refuses YAML syntax errors, unknown keys, values of the wrong type and out-of-range values before any
work starts; the one-line error names the key and where it was set (the file or the command line).

    cfg = load_config("configs/experiment/demo.yaml", ["trainer.epochs=3", "model.num_classes=5"])
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.data.config import DataConfig
from pipeline.models.mvit import MViTConfig
from pipeline.models.presets import preset_config
from pipeline.tracking import TrackingConfig, redact
from pipeline.train.optim import OptimConfig


def _model_section() -> type:
    """``preset`` plus every ``MViTConfig`` field as an optional override (None = the preset's value)."""
    hints = typing.get_type_hints(MViTConfig)
    fields_ = [("preset", str, field(default="mvit_b_16x4"))]
    fields_ += [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(MViTConfig)]
    return dataclasses.make_dataclass("ModelSection", fields_)


ModelSection = _model_section()


def build_model_config(section: Any) -> MViTConfig:
    """The network a ``model:`` section describes: the preset with the given fields replaced."""
    values = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
    preset = values.pop("preset")
    return preset_config(preset, **{k: v for k, v in values.items() if v is not None})


@dataclass
class TrainerConfig:
    epochs: int = 30
    grad_accum_steps: int = 1  # micro-batches (of data.batch_size rows) per optimiser step
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or "fp32" / "bf16"
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every N steps (0 = only at epoch end)
    num_checkpoints_to_keep: int = 2
    storage_path: str = "runs"  # local dir or s3://bucket/prefix (RunConfig.storage_path)
    max_failures: int = 0  # automatic restarts from the latest checkpoint
    max_steps_per_epoch: int = 0  # cap for smoke runs (0 = the whole epoch)

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accum_steps", "num_workers", "eval_every_epochs",
                     "num_checkpoints_to_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every_steps", "max_failures", "max_steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"trainer.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"trainer.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and not self.gpus_per_worker > 0:
            raise ValueError(f"trainer.gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")
        if not self.storage_path.strip():
            raise ValueError("trainer.storage_path must name a folder or s3:// URL, got ''")


# The job name becomes a directory under trainer.storage_path (checkpoints, final model): one plain
# path component, so a config can never write outside the storage path.
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ExperimentConfig:
    name: str = "mvit"  # the job name: Ray run name, MLflow run name, checkpoint folder
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)  # type: ignore[valid-type]
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not _JOB_NAME.match(self.name) or ".." in self.name:
            raise ValueError(f"name must be a plain folder name ([A-Za-z0-9_.-], no '..'), got {self.name!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def global_batch_size(self) -> int:
        """Rows (views) per optimiser step over all workers; the LR is scaled by it."""
        return self.data.batch_size * self.trainer.grad_accum_steps * self.trainer.num_workers


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


_MODEL_FIELDS = {f.name for f in dataclasses.fields(MViTConfig)}
# A validation message starts with (or names) the dotted keys it is about, e.g. "data.batch_size must be
# >= 1"; that is how a problem found after merging is traced back to the file or the command line.
_KEY_IN_MESSAGE = re.compile(r"(?<![\w.])(?:model|data|optim|trainer|tracking)(?:\.\w+)+")
_TOP_KEY_AT_START = re.compile(r"^(name|seed)\b")


_UNSET = object()


def _set_in(cfg: DictConfig | None, key: str) -> bool:
    return cfg is not None and OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=False) is not _UNSET


def _origin(message: str, path: str | Path | None, file_cfg: DictConfig | None, cli_cfg: DictConfig | None) -> str:
    """Where the value a validation message is about came from: the command line, the file, or defaults."""
    keys = _TOP_KEY_AT_START.findall(message) + _KEY_IN_MESSAGE.findall(message)
    if any(_set_in(cli_cfg, key) for key in keys):
        return "the command line"
    if any(_set_in(file_cfg, key) for key in keys):
        return str(path)
    if not keys:  # no key named: say every source that was given
        return " with ".join(filter(None, [str(path) if path else "", "command-line overrides" if cli_cfg else ""])) \
            or "the schema defaults"
    return f"{path} (where {keys[0]} is not set: the default applies)" if path else "the schema defaults"


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg.keys():
        name = f"{prefix}{key}"
        node = cfg._get_node(key)  # noqa: SLF001 - reading a node never resolves or converts it
        keys += _leaf_keys(node, f"{name}.") if isinstance(node, DictConfig) and len(node) else [name]
    return keys


def _offending_key(schema: DictConfig, source: DictConfig) -> str:
    """The first key of ``source`` that does not merge onto ``schema`` on its own (for errors OmegaConf
    reports without a key, e.g. a section given as a scalar or a tuple of the wrong length)."""
    for key in _leaf_keys(source):
        single = OmegaConf.create()
        OmegaConf.update(single, key, OmegaConf.select(source, key), force_add=True)
        try:
            OmegaConf.merge(schema, single)
        except OmegaConfBaseException:
            return key
    return "?"


def _merge_error(err: OmegaConfBaseException, source: str, schema: DictConfig, cfg: DictConfig) -> ConfigError:
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    key = getattr(err, "full_key", None)
    if not key or key == "None":
        key = _offending_key(schema, cfg)
    return ConfigError(f"invalid config from {source}: key '{key}': {message}")


def _read_yaml(path: str | Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"invalid config from {path}: not valid YAML{where}: {problem}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config from {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"invalid config from {path}: the file must be a mapping of config sections, "
                          f"got a {type(loaded).__name__}")
    return loaded


def _read_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid config from the command line: {item!r} is not a key.path=value override")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config from the command line: {str(err).splitlines()[0]}") from None


def _validate(cfg: ExperimentConfig) -> None:
    """Checks that need the whole merged config (the sections' own checks ran when they were built)."""
    try:
        build_model_config(cfg.model)  # the preset with its overrides: unknown preset, bad sizes
    except KeyError as err:
        raise ValueError(f"model.preset: {err.args[0]}") from None
    except (ValueError, TypeError) as err:
        text = str(err)
        field_name = text.split(" ", 1)[0]
        raise ValueError(f"model.{text}" if field_name in _MODEL_FIELDS else
                         f"model (model.num_frames / model.crop_size / model.*): {text}") from None
    cfg.data.validate()


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Schema <- YAML file <- ``a.b=value`` overrides, validated into an ``ExperimentConfig``.

    Raises ``ConfigError`` (one line, naming the key and whether the file or the command line set it) for
    YAML syntax errors, unknown keys, wrong types and out-of-range values, before any work starts.
    """
    schema = OmegaConf.structured(ExperimentConfig)
    file_cfg = cli_cfg = None
    merged = schema
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        file_cfg = _read_yaml(path)
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as err:
            raise _merge_error(err, str(path), schema, file_cfg) from None
    if overrides:
        cli_cfg = _read_overrides(list(overrides))
        try:
            merged = OmegaConf.merge(merged, cli_cfg)
        except OmegaConfBaseException as err:
            raise _merge_error(err, "the command line", schema, cli_cfg) from None
    try:
        cfg = OmegaConf.to_object(merged)
        _validate(cfg)  # type: ignore[arg-type]
    except OmegaConfBaseException as err:
        message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"invalid config from {_origin(str(key), path, file_cfg, cli_cfg)}: key '{key}': "
                          f"{message}") from None
    except (ValueError, KeyError, TypeError) as err:
        message = str(err.args[0] if isinstance(err, KeyError) and err.args else err).splitlines()[0]
        raise ConfigError(f"invalid config from {_origin(message, path, file_cfg, cli_cfg)}: {message}") from None
    return cfg  # type: ignore[return-value]


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_redacted_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML for people and artifacts (``--print-config``, MLflow's
    ``config/resolved_config.yaml``): keys named like secrets blanked, passwords in URIs and values of
    secret environment variables replaced by ``***`` (``pipeline.tracking.redact``)."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(to_container(cfg))))


def to_container(cfg: ExperimentConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_container(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuilds the typed config from ``to_container`` output (how it travels to Ray workers)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), values))  # type: ignore[return-value]
