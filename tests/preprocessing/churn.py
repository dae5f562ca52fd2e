"""Encodes under memory churn: the regression test for x264's MB-tree bug (tests/preprocessing/test_units.py)
and the measurement of how often the bug shows, which sizes that test (benchmarks/x264_churn.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from preprocessing.synth import SynthKinetics, synth_kinetics
from preprocessing.transcode import VideoEncoder

X264_OPTION = b" mbtree=0 "  # as x264 writes it into the option string it stores in every stream

# Rounds of the churn test (8 clips each, 240 encodes, ~40 s). With MB-tree back on, `python
# benchmarks/x264_churn.py` ran this loop in 5 fresh processes (seeds 0-4): 50-90 of the 240 encodes
# differed from their clip's usual output in every run (21-38%), so the test fails with the bug back;
# with 64 encodes and less heap growth it had passed about a quarter of the time.
CHURN_ROUNDS = 30


def churn_clips(root: Path) -> list[str]:
    """Eight 3 s clips of 480x360 (the inputs the bug was found on)."""
    synth_kinetics(SynthKinetics(str(root), classes=4, per_class=2, val_per_class=0, seconds=3, fps=25, width=480,
                                 height=360))  # fmt: skip
    return sorted(str(p) for p in (root / "train").iterdir())


def churn_encodes(clips: list[str], rounds: int, seed: int = 0) -> dict[str, list[bytes]]:
    """Every clip encoded ``rounds`` times, in a new shuffled order each round, while the heap grows by a
    random-size buffer before each encode (held, never freed), so later encoder buffers land on fresh or
    reused memory: uninitialised memory read by the encoder then differs between encodes. Returns each
    clip's encoded bytes, one entry per encode."""
    encoder = VideoEncoder()
    rng = np.random.default_rng(seed)
    outputs: dict[str, list[bytes]] = {clip: [] for clip in clips}
    held = []
    for _ in range(rounds):
        for clip in rng.permutation(clips):
            held.append(bytearray(int(rng.integers(1, 200_000))))
            outputs[str(clip)].append(encoder.transcode(str(clip))[0])
    return outputs


def odd_encodes(outputs: dict[str, list[bytes]]) -> int:
    """Encodes whose bytes differ from their clip's most common output."""
    odd = 0
    for encodes in outputs.values():
        digests = [hashlib.sha256(data).digest() for data in encodes]
        odd += len(digests) - max(digests.count(d) for d in set(digests))
    return odd
