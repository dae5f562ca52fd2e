"""Why the SSv2 presets turn horizontal flip off, shown on the pipeline's own data path: synthetic
Something-Something v2 (`python -m preprocessing synth ssv2`, classes that differ only in the horizontal
direction of the motion) -> `python -m preprocessing ssv2` -> the decoder actor's training views with
segment sampling (`Decoder`, run in-process) -> a tiny 3-D conv net. With `augment.flip: false` it learns
the classes; with flip on, half of each class's views show the other class's motion under its own label,
so the classes cannot be told apart and held-out accuracy stays near chance."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import decoder_batch, decoder_row, run_cli
from torch import nn

from pipeline.data.config import AugmentConfig, DataConfig, DecoderPoolConfig, SamplingConfig
from pipeline.data.decode import Decoder
from pipeline.data.plan import OK

pytestmark = pytest.mark.slow

EPOCHS = 6  # each epoch draws new segment frames, crops and (with flip on) flips of every training video
PASSES = 10  # training passes over those views


def _rows(root: Path, split: str) -> list[dict]:
    """The split's samples as the read tasks hand them to the decoder."""
    rows = []
    for path in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            names = tar.getnames()
            for key in sorted({n.rsplit(".", 1)[0] for n in names}):
                video = next(n for n in names if n.startswith(f"{key}.") and not n.endswith((".json", ".cls")))
                rows.append(decoder_row(key, tar.extractfile(video).read(), json.loads(tar.extractfile(f"{key}.json").read()),
                                        label=int(tar.extractfile(f"{key}.cls").read()), pos=len(rows)))  # fmt: skip
    return rows


def _views(cfg: DataConfig, rows: list[dict], train: bool, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = Decoder(cfg, "video", train=train)(decoder_batch([{**r, "epoch": epoch} for r in rows]))
    assert (out["status"] == OK).all()
    return torch.from_numpy(np.asarray(out["video"])).float() / 255, torch.from_numpy(np.asarray(out["label"]))


def _held_out_accuracy(shards: Path, flip: bool) -> float:
    cfg = DataConfig(
        root=str(shards), seed=3,
        sampling=SamplingConfig(mode="segment", num_frames=8, eval_clips=1, eval_crops=1),
        augment=AugmentConfig(crop_size=32, eval_short_side=32, mode="jitter", jitter_scales=[32, 40], flip=flip,
                              rand_augment=False, random_erasing=0.0, repeated_aug=1),
        decoder=DecoderPoolConfig(isolate=False),
    )  # fmt: skip
    train_rows, val_rows = _rows(shards, "train"), _rows(shards, "val")
    epochs = [_views(cfg, train_rows, True, e) for e in range(EPOCHS)]
    x_val, y_val = _views(cfg, val_rows, False, 0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(3, 16, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 2),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(PASSES):  # passes over the epochs' views
        for x, y in epochs:
            model.train()
            for batch in torch.randperm(len(x)).split(16):
                loss = nn.functional.cross_entropy(model(x[batch] - 0.5), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(x_val - 0.5).argmax(1) == y_val).float().mean().item()


def test_direction_classes_are_learnt_with_flip_off_and_not_with_flip_on(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    run_cli("synth", "ssv2", "--out", str(raw), "--classes", "2", "--per-class", "24", "--val-per-class", "16",
            "--test", "0", "--size", "64x48", "--seconds", "2")  # fmt: skip
    for split in ("train", "validation"):
        run_cli("ssv2", "--root", str(raw), "--split", split, "--out", str(shards), "--short-side", "40",
                "--no-progress")  # fmt: skip
    labels = json.loads((shards / "val.manifest.json").read_text())
    assert labels["classes"] == ["Pushing something from left to right", "Pushing something from right to left"]
    off, on = _held_out_accuracy(shards, flip=False), _held_out_accuracy(shards, flip=True)
    assert off >= 0.9, f"flip off: held-out accuracy {off:.2f} (chance 0.5)"
    assert on <= 0.75, f"flip on: held-out accuracy {on:.2f}; the flip should erase the only class signal"
