"""What an export starts from: an ``MViTConfig``, its weights and class names (``LoadedModel``), and the
thin reader of a training job's final model folder (``pipeline/trainer/export.py`` writes it).

The reader is kept apart from the exporters so that any other model reference (an MLflow run, a
registered model, a DCP checkpoint) only has to produce a ``LoadedModel``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from core.errors import ConfigError, credentials_hint, is_client_error, one_line
from core.redact import redact_url
from core.s3 import storage_options_for
from pipeline.models.config import MViTConfig
from pipeline.models.mvit import MViT
from pipeline.trainer.export import CONFIG_FILE, WEIGHTS_FILE



class ServingError(ValueError):
    """A problem the user can fix (a bad model reference, a model/data mismatch, an op that does not
    export), reported as one line before or instead of the export."""


@dataclass(frozen=True)
class LoadedModel:
    """A trained network as every model reference form resolves it: enough to rebuild and run it."""

    config: MViTConfig
    state_dict: dict[str, torch.Tensor]
    classes: tuple[str, ...] | None = None
    source: str = ""  # where it was read from (redacted), for messages and the export's metadata

    def __post_init__(self) -> None:
        if self.classes is not None and len(self.classes) != self.config.num_classes:
            raise ServingError(f"{self.source or 'the model'}: {len(self.classes)} class names for a "
                               f"{self.config.num_classes}-class head")


def read_final_model(url: str, endpoint_url: str | None = None) -> LoadedModel:
    """Reads a final model folder (local path or any fsspec URL, e.g. s3://) into a ``LoadedModel``."""
    shown = redact_url(url)
    not_final = (f"--model {shown} is not a final model folder ({WEIGHTS_FILE} + {CONFIG_FILE}, as a training "
                 "job writes to trainer.storage_path/NAME/final_model)")
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options_for(url, endpoint_url))
        root = root.rstrip("/")
        meta = json.loads(fs.cat_file(f"{root}/{CONFIG_FILE}"))
        weights = fs.cat_file(f"{root}/{WEIGHTS_FILE}")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ServingError(not_final) from None
    except json.JSONDecodeError as err:
        raise ServingError(f"{not_final}: {CONFIG_FILE} is not JSON ({err})") from None
    except Exception as err:  # noqa: BLE001 - storage and S3 client errors become the one line; bugs do not
        if not isinstance(err, (OSError, ValueError, ImportError)) and not is_client_error(err):
            raise
        raise ServingError(f"cannot read --model {shown}: {one_line(err)}{credentials_hint(err)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("mvit_config"), dict):
        raise ServingError(f"{not_final}: {CONFIG_FILE} has no 'mvit_config' mapping")
    try:
        cfg = MViTConfig.from_dict(meta["mvit_config"])
    except (ConfigError, TypeError) as err:
        raise ServingError(f"{shown}/{CONFIG_FILE}: {err}") from None
    try:
        state = load_safetensors(weights)
    except (SafetensorError, ValueError) as err:
        raise ServingError(f"{shown}/{WEIGHTS_FILE} is not a safetensors file: {one_line(err)}") from None
    classes = meta.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ServingError(f"{shown}/{CONFIG_FILE}: 'classes' must be a list of names, got {classes!r:.80}")
    return LoadedModel(cfg, state, tuple(classes) if classes is not None else None, shown)


def _state_mismatch(expected: dict[str, Any], given: dict[str, torch.Tensor]) -> str | None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k} {tuple(given[k].shape)} (the config needs {tuple(expected[k].shape)})"
              for k in expected if k in given and given[k].shape != expected[k].shape]
    problems = [f"{len(v)} {what}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
    return "; ".join(problems) or None


def build_eval_model(loaded: LoadedModel) -> MViT:
    """The network in eval mode, in fp32 on the CPU, with the weights checked key by key against the config
    first (a mismatch is one line naming the keys, not torch's multi-line ``load_state_dict`` error)."""
    with torch.device("meta"):
        expected = MViT(loaded.config).state_dict()
    problem = _state_mismatch(expected, loaded.state_dict)
    if problem:
        raise ServingError(f"{loaded.source or 'the model'}: the weights do not fit its config: {problem}")
    model = MViT(loaded.config)
    model.load_state_dict({k: v.float() for k, v in loaded.state_dict.items()})
    return model.eval()
