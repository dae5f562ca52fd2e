"""Synthetic raw datasets, generated once per session by the tool's own `synth` command code."""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing.synth import SynthImageNet, SynthKinetics, synth_imagenet, synth_kinetics

# Small enough to keep the suite fast on 2 cores, long enough (30 frames) to span two GOPs of 16.
KINETICS = dict(classes=3, per_class=3, val_per_class=1, seconds=2, fps=15, width=96, height=64)


@pytest.fixture(scope="session")
def kinetics_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Flat CVDF layout, mp4/mkv/webm mixed, one CSV row without a file, one undecodable file."""
    root = tmp_path_factory.mktemp("kinetics_raw")
    synth_kinetics(SynthKinetics(str(root), **KINETICS, containers=("mp4", "mkv", "webm"), missing=1, corrupt=1))
    return root


@pytest.fixture(scope="session")
def kinetics_per_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kinetics_per_class")
    synth_kinetics(SynthKinetics(str(root), **KINETICS, layout="per-class", seed=1))
    return root


@pytest.fixture(scope="session")
def kinetics_full_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kinetics_full")
    synth_kinetics(SynthKinetics(str(root), **KINETICS, full_videos=True, seed=2))
    return root


@pytest.fixture(scope="session")
def imagenet_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train with the CMYK / grayscale / PNG-named-.JPEG quirks and one truncated JPEG; flat val."""
    root = tmp_path_factory.mktemp("imagenet_raw")
    synth_imagenet(SynthImageNet(str(root), classes=3, per_class=4, val_per_class=2, corrupt=1))
    return root
