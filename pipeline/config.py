"""The typed configuration of a training job, loaded from YAML with command-line overrides.

One dataclass per concern (model, data, optim, trainer, tracking), composed in ``ExperimentConfig``.
OmegaConf merges ``configs/experiment/*.yaml`` and ``key.path=value`` overrides onto the schema and
refuses unknown keys and values of the wrong type before any work starts; the error names the key and
the file it came from.

    cfg = load_config("configs/experiment/demo.yaml", ["trainer.epochs=3", "model.num_classes=5"])
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.data.config import DataConfig
from pipeline.models.mvit import MViTConfig
from pipeline.models.presets import preset_config
from pipeline.tracking import TrackingConfig
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



@dataclass
class ExperimentConfig:
    name: str = "mvit"  # the job name: Ray run name, MLflow run name, checkpoint folder
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)  # type: ignore[valid-type]
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def global_batch_size(self) -> int:
        """Rows (views) per optimiser step over all workers; the LR is scaled by it."""
        return self.data.batch_size * self.trainer.grad_accum_steps * self.trainer.num_workers


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Schema <- YAML file <- ``a.b=value`` overrides, validated into an ``ExperimentConfig``."""
    schema = OmegaConf.structured(ExperimentConfig)
    source = "the schema"
    try:
        merged = schema
        if path is not None:
            source = str(path)
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            source = "the command line"
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        source = str(path) + (" with command-line overrides" if overrides else "") if path else source
        cfg = OmegaConf.to_object(merged)
        build_model_config(cfg.model)  # validates the model section (unknown preset, bad values)
        cfg.data.validate()
    except OmegaConfBaseException as err:
        message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
        raise ConfigError(f"invalid config from {source}: key '{getattr(err, 'full_key', '?')}': {message}") from None
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"invalid config from {source}: {err}") from None
    return cfg  # type: ignore[return-value]


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_container(cfg: ExperimentConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_container(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuilds the typed config from ``to_container`` output (how it travels to Ray workers)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), values))  # type: ignore[return-value]
