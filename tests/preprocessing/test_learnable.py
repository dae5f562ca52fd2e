"""The synthetic data carries a real class signal: a tiny model trained on the tool's shards beats chance.

This is what makes synthetic demos meaningful: a pipeline bug that scrambles labels, frames or
pixels would show up here as chance-level accuracy on held-out data.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from shard_helpers import read_samples, run_cli
from torch import nn

from core.manifest import list_shard_urls
from preprocessing.synth import SynthImageNet, SynthKinetics, synth_imagenet, synth_kinetics

pytestmark = pytest.mark.slow


def _fit_and_score(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor]) -> float:
    torch.manual_seed(0)
    (x_train, y_train), (x_val, y_val) = train, val
    mean = x_train.mean()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        model.train()
        for batch in torch.randperm(len(x_train)).split(16):
            loss = nn.functional.cross_entropy(model(x_train[batch] - mean), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(x_val - mean).argmax(1) == y_val).float().mean().item()


def _video_tensors(out: Path, split: str, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    clips, labels = [], []
    for sample in read_samples(list_shard_urls(str(out), split)):
        with av.open(io.BytesIO(sample["mp4"])) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        clips.append(np.stack(decoded[:frames]))
        labels.append(sample["cls"])
    return torch.tensor(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 255, torch.tensor(labels)


def test_tiny_video_model_learns_motion_classes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    raw, out = tmp_path / "raw", tmp_path / "shards"
    # 4 classes: classes 0 and 3 are both disks, told apart only by their motion direction.
    synth_kinetics(SynthKinetics(str(raw), classes=4, per_class=12, val_per_class=6, seconds=2, fps=8, width=64, height=48))
    for csv_name, videos in (("train.csv", "train"), ("validate.csv", "val")):
        run_cli("kinetics", "--csv", str(raw / "annotations" / csv_name), "--videos", str(raw / videos),
                "--out", str(out), "--short-side", "32", "--no-progress")  # fmt: skip
    model = nn.Sequential(
        nn.Conv3d(3, 16, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip
    accuracy = _fit_and_score(model, _video_tensors(out, "train", 16), _video_tensors(out, "val", 16))
    assert accuracy >= 0.6, f"held-out accuracy {accuracy:.2f} (chance 0.25)"


def _image_tensors(out: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for sample in read_samples(list_shard_urls(str(out), split)):
        image = Image.open(io.BytesIO(sample["jpg"])).resize((32, 32), Image.Resampling.BILINEAR)
        images.append(np.asarray(image))
        labels.append(sample["cls"])
    return torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255, torch.tensor(labels)


def test_tiny_image_model_learns_shape_and_stripe_classes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    raw, out = tmp_path / "raw", tmp_path / "shards"
    synth_imagenet(SynthImageNet(str(raw), classes=4, per_class=24, val_per_class=8, size=48))
    for split in ("train", "val"):
        run_cli("imagenet", "--root", str(raw), "--split", split, "--out", str(out), "--max-side", "48", "--no-progress")
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip
    accuracy = _fit_and_score(model, _image_tensors(out, "train"), _image_tensors(out, "val"))
    assert accuracy >= 0.6, f"held-out accuracy {accuracy:.2f} (chance 0.25)"
