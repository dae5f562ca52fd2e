"""The consolidated final model: what a user takes away from a finished job.

``model.safetensors`` holds the full (unsharded) weights under this project's names, next to
``model_config.json`` (the ``MViTConfig`` that rebuilds the network, plus the class names); when the
network is one torchvision can build (video MViT with separable position embeddings),
``torchvision_state_dict.pt`` holds the same weights in torchvision's layout.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.errors import CheckpointMismatch
from pipeline.models.convert import to_torchvision
from pipeline.models.config import MViTConfig

# The folder's two files: every reader (pipeline.model_ref, pipeline.serving) names them from here.
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "model_config.json"


def export_model(weights: dict[str, torch.Tensor], cfg: MViTConfig, out_dir: Path,
                 classes: Sequence[str] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    written = [out_dir / WEIGHTS_FILE, out_dir / CONFIG_FILE]
    save_file(tensors, str(written[0]))
    meta = {"mvit_config": dataclasses.asdict(cfg), "classes": list(classes) if classes else None}
    written[1].write_text(json.dumps(meta, indent=2) + "\n")
    try:
        tv = to_torchvision(tensors, cfg)
    except CheckpointMismatch:
        return written  # image models and non-conv pooling have no torchvision counterpart
    path = out_dir / "torchvision_state_dict.pt"
    torch.save(tv, path)
    written.append(path)
    return written


def copy_to_storage(files: Sequence[Path], url: str, storage_options: dict) -> None:
    """Copies the exported files to ``url`` (a local folder or s3://...) through fsspec."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    fs.makedirs(root, exist_ok=True)
    for path in files:
        fs.put_file(str(path), f"{root.rstrip('/')}/{path.name}")
