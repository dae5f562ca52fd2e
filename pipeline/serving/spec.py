"""The input contract of an exported model (``InputSpec``): tensor layout and size, and how the training
data pipeline turned decoded frames into that tensor (``pipeline.data``: ``normalize`` in device.py,
evaluation views in sampling.py), so that a server can prepare clips without this project.

The final model folder records the network, not the data recipe, so the recipe comes from the
experiment config the model was trained with (``--config``), or else from ``pipeline.data.config``'s
defaults (the Kinetics recipe for video, ``imagenet_defaults()`` for image models).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.data.config import DataConfig, imagenet_defaults
from pipeline.models.config import MViTConfig
from pipeline.serving.model import ServingError

INPUT_NAME = "clip"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class InputSpec:
    """One clip as the model takes it: float32 (B, C, T, H, W), RGB, normalised per channel."""

    frames: int
    crop: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    frame_stride: int  # frames skipped between sampled frames (data.sampling.stride), at target_fps
    target_fps: float  # 0: the video's own rate
    eval_short_side: int  # evaluation: short side resized to this, then centre crop(s) of crop x crop
    eval_clips: int  # evaluation views averaged per video (clips x crops; softmax scores averaged)
    eval_crops: int
    recipe: str  # where the data recipe came from: an experiment config file, or the defaults

    def to_dict(self) -> dict:
        return {
            "name": INPUT_NAME,
            "layout": "NCTHW",
            "dtype": "float32",
            "shape": ["batch", self.channels, self.frames, self.crop, self.crop],
            "color": "RGB",
            "normalization": {
                "mean": list(self.mean), "std": list(self.std),
                "formula": "x = (pixel / 255 - mean[c]) / std[c] on uint8 RGB frames",
            },
            "sampling": {"frames": self.frames, "frame_stride": self.frame_stride, "target_fps": self.target_fps},
            "eval_views": {"short_side": self.eval_short_side, "crop": self.crop, "clips": self.eval_clips,
                           "crops": self.eval_crops, "combine": "mean of softmax over the views"},
            "recipe": self.recipe,
        }  # fmt: skip


def _from_data(cfg: MViTConfig, data: DataConfig, recipe: str) -> InputSpec:
    s, a = data.sampling, data.augment
    return InputSpec(frames=cfg.num_frames, crop=cfg.crop_size, channels=cfg.in_channels, mean=tuple(a.mean),
                     std=tuple(a.std), frame_stride=s.stride, target_fps=s.target_fps,
                     eval_short_side=a.eval_short_side, eval_clips=s.eval_clips, eval_crops=s.eval_crops,
                     recipe=recipe)


def default_recipe(cfg: MViTConfig) -> tuple[DataConfig, str]:
    """The data pipeline's default recipe for this kind of model (image models: T = 1) and where it came
    from. The clip (frames, crop) is the model's: a final model folder records the network, not the
    recipe, so everything else is the defaults'. Prediction decodes with this, export describes it."""
    if cfg.num_frames == 1:
        data, recipe = imagenet_defaults(), "pipeline.data.config.imagenet_defaults()"
    else:
        data, recipe = DataConfig(), "pipeline.data.config defaults (Kinetics)"
    data.sampling.num_frames, data.augment.crop_size = cfg.num_frames, cfg.crop_size
    return data, recipe


def default_input_spec(cfg: MViTConfig) -> InputSpec:
    return _from_data(cfg, *default_recipe(cfg))


def input_spec_from_experiment(cfg: MViTConfig, path: str) -> InputSpec:
    """The recipe of the experiment config at ``path``; refuses (one line) an experiment whose clips
    (frames, crop), channels or class count differ from the model's."""
    from pipeline.config import load_config  # the YAML schema: only when asked for

    exp = load_config(path)
    check_experiment(cfg, exp, path)
    return _from_data(cfg, exp.data, path)


def check_experiment(cfg: MViTConfig, exp: Any, path: str) -> None:
    """Refuses (``ServingError``, one line) an experiment (``pipeline.config.ExperimentConfig``, loaded from
    ``path``) whose data would not fit the model: clips (frames, crop), channels, normalisation channels,
    or a class count that the experiment sets (None: a job takes it from its shard set)."""
    from pipeline.config import build_model_config

    data, trained = exp.data, build_model_config(exp.model)
    pairs = [("data.sampling.num_frames", data.sampling.num_frames, "frames", cfg.num_frames),
             ("data.augment.crop_size", data.augment.crop_size, "crop", cfg.crop_size),
             ("model.in_channels", trained.in_channels, "channels", cfg.in_channels)]
    if exp.model.num_classes is not None:  # None: the job took the class count from the shard set
        pairs.append(("model.num_classes", exp.model.num_classes, "classes", cfg.num_classes))
    for key, value, what, model_value in pairs:
        if value != model_value:
            raise ServingError(f"model/data mismatch: --config {path} has {key}={value} but the model's "
                               f"{what} is {model_value}")
    if len(data.augment.mean) != cfg.in_channels or len(data.augment.std) != cfg.in_channels:
        raise ServingError(f"model/data mismatch: --config {path} normalises {len(data.augment.mean)} channels, "
                           f"the model takes {cfg.in_channels}")


def metadata(spec: InputSpec, classes: tuple[str, ...] | None, cfg: MViTConfig, export: dict) -> dict:
    """Everything a server needs next to the weights: written as the sidecar JSON and, key by key (each
    value JSON text), as the ONNX file's metadata_props / the .pt2 archive's extra file."""
    return {
        "classes": list(classes) if classes is not None else None,
        "input": spec.to_dict(),
        "output": {"name": OUTPUT_NAME, "shape": ["batch", cfg.num_classes], "meaning": "logits (no softmax)"},
        "mvit_config": asdict(cfg),
        "export": export,
    }
