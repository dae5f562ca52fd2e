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

from core.errors import ConfigError  # the loader's error type: importable from here too
from core.redact import redact_mapping
from pipeline.data.config import DataConfig
from pipeline.models.config import MViTConfig
from pipeline.models.presets import PRESETS, preset_config
from pipeline.tracking import TrackingConfig
from pipeline.trainer.config import OptimConfig, TrainerConfig


# Where the model's starting weights come from; not part of the network (``build_model_config`` skips them).
# init_from: a model reference (``pipeline.model_ref``), None = random initialisation, "" = required (a
# preset's placeholder, refused by the driver); init_head: keep = the classifier loads strictly, new =
# re-initialised when its classes differ from the data's.
_INIT_FIELDS = ("init_from", "init_head")
INIT_HEADS = ("keep", "new")


def _model_section() -> type:
    """``preset`` plus every ``MViTConfig`` field as an optional override (None = the preset's value), and
    where the weights start from (``init_from``, ``init_head``)."""
    hints = typing.get_type_hints(MViTConfig)
    fields_ = [("preset", str, field(default="mvit_b_16x4")), ("init_from", Optional[str], field(default=None)),
               ("init_head", str, field(default="keep"))]
    fields_ += [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(MViTConfig)]
    return dataclasses.make_dataclass("ModelSection", fields_)


ModelSection = _model_section()


def build_model_config(section: Any) -> MViTConfig:
    """The network a ``model:`` section describes: the preset with the given fields replaced."""
    values = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
    preset = values.pop("preset")
    for name in _INIT_FIELDS:
        values.pop(name, None)
    return preset_config(preset, **{k: v for k, v in values.items() if v is not None})


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
            raise ConfigError("must be a plain folder name ([A-Za-z0-9_.-], no '..')", "name", self.name)
        if self.seed < 0:
            raise ConfigError("must be >= 0", "seed", self.seed)

    @property
    def global_batch_size(self) -> int:
        """Rows (views) per optimiser step over all workers; the LR is scaled by it."""
        return self.data.batch_size * self.trainer.grad_accum_steps * self.trainer.num_workers


_UNSET = object()


def _set_in(cfg: DictConfig | None, key: str) -> bool:
    return cfg is not None and OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=False) is not _UNSET


def _origin(key: str | None, path: str | Path | None, file_cfg: DictConfig | None, cli_cfg: DictConfig | None,
            related: tuple[str, ...] = ()) -> str:
    """Where the value of ``key`` (or of a ``related`` key the problem compares it with) came from: the
    command line, the file, or the defaults."""
    if key is None:  # a problem not about one key: name every source that was given
        return " with ".join(filter(None, [str(path) if path else "", "command-line overrides" if cli_cfg else ""])) \
            or "the schema defaults"
    if any(_set_in(cli_cfg, k) for k in (key, *related)):
        return "the command line"
    if any(_set_in(file_cfg, k) for k in (key, *related)):
        return str(path)
    return f"{path} (where {key} is not set: the default applies)" if path else "the schema defaults"


def _leaf_keys(values: Any, prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of a plain nested mapping (``OmegaConf.to_container`` output); an
    empty mapping, a list or a scalar is a leaf."""
    keys = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        keys += _leaf_keys(value, f"{name}.") if isinstance(value, dict) and value else [name]
    return keys


def _offending_key(schema: DictConfig, source: DictConfig) -> str | None:
    """The first key of ``source`` that does not merge onto ``schema`` on its own (for errors OmegaConf
    reports without a key, e.g. a section given as a scalar or a tuple of the wrong length)."""
    for key in _leaf_keys(OmegaConf.to_container(source, resolve=False)):
        single = OmegaConf.create()
        OmegaConf.update(single, key, OmegaConf.select(source, key), force_add=True)
        try:
            OmegaConf.merge(schema, single)
        except OmegaConfBaseException:
            return key
    return None


def _omegaconf_error(err: OmegaConfBaseException, key: str | None) -> ConfigError:
    """A merge or type error of OmegaConf's, keyed by the key it reports (its ``full_key``)."""
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    return ConfigError(f"key '{ConfigError.KEY}': {message}", key) if key else ConfigError(message)


def _reported_key(err: OmegaConfBaseException) -> str | None:
    key = getattr(err, "full_key", None)
    return str(key) if key and str(key) != "None" else None


def _merge_error(err: OmegaConfBaseException, source: str, schema: DictConfig, cfg: DictConfig) -> ConfigError:
    return _omegaconf_error(err, _reported_key(err) or _offending_key(schema, cfg)).at(source)


def _read_yaml(path: str | Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"not valid YAML{where}: {problem}", where=str(path)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0], where=str(path)) from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"the file must be a mapping of config sections, got a {type(loaded).__name__}",
                          where=str(path))
    return loaded


def _read_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r} is not a key.path=value override", where="the command line")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0], where="the command line") from None


def _validate(cfg: ExperimentConfig) -> None:
    """Checks that span sections (each section's own checks ran when OmegaConf built it): the model
    preset with its overrides, and the data section with its shard set."""
    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"{ConfigError.KEY}: unknown MViT preset {ConfigError.VALUE}; available: "
                          f"{', '.join(sorted(PRESETS))}", "model.preset", cfg.model.preset)
    if cfg.model.init_head not in INIT_HEADS:
        raise ConfigError(f"must be one of {', '.join(INIT_HEADS)}", "model.init_head", cfg.model.init_head)
    try:
        model_cfg = build_model_config(cfg.model)  # bad sizes, pooling that does not fit the input
    except ConfigError as err:
        raise err.under("model") from None  # MViTConfig keys its errors by its own field names
    if cfg.optim.freeze_blocks > model_cfg.depth:
        raise ConfigError(f"must be at most the model's depth ({model_cfg.depth})", "optim.freeze_blocks",
                          cfg.optim.freeze_blocks, related=("model.depth",))
    cfg.data.validate()


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Schema <- YAML file <- ``a.b=value`` overrides, validated into an ``ExperimentConfig``.

    Raises ``ConfigError`` (one line, naming the key and whether the file or the command line set it) for
    YAML syntax errors, unknown keys, wrong types and out-of-range values, before any work starts. The
    sections raise ``ConfigError`` with the key; this fills in ``where`` from that key.
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
        key = _reported_key(err)
        raise _omegaconf_error(err, key).at(_origin(key, path, file_cfg, cli_cfg)) from None
    except ConfigError as err:
        raise (err if err.where else err.at(_origin(err.key, path, file_cfg, cli_cfg, err.related))) from None
    except (ValueError, TypeError) as err:  # not a config check's error: still one line, naming the sources
        raise ConfigError(str(err).splitlines()[0] if str(err) else type(err).__name__).at(
            _origin(None, path, file_cfg, cli_cfg)) from None
    return cfg  # type: ignore[return-value]


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_redacted_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML for people and artifacts (``--print-config``, MLflow's
    ``config/resolved_config.yaml``): keys named like secrets blanked; the values of secret environment
    variables (a ``${oc.env:GITHUB_PAT}`` resolves to one), credential shapes and passwords in URIs replaced
    by ``***`` (``core.redact``)."""
    return OmegaConf.to_yaml(OmegaConf.create(redact_mapping(to_container(cfg))))


def to_container(cfg: ExperimentConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_container(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuilds the typed config from ``to_container`` output (how it travels to Ray workers)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), values))  # type: ignore[return-value]
