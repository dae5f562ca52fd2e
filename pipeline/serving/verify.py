"""Each written export is loaded back from its file and run beside the eager model on the same random
clips; the logits must agree within ``ATOL + RTOL * |eager|`` element-wise (``numpy.allclose``).

Why 1e-4 (fp32): both sides compute in fp32 but with different kernels (onnxruntime's MLAS GEMMs and
fused LayerNorm / Attention against torch's), so summation order differs; each reduction then differs by
a few ulps (fp32 epsilon 1.2e-7) times its length, and those differences pass through every block. The
measured gap is about 3e-7 on the tiny test models and 1.4e-6 for MViT-B 16x4 at full size (docs/serving.md);
1e-4 leaves two orders of magnitude for deeper and wider networks while anything actually wrong (a
mis-mapped op, a dropped bias or mask, a wrong pooling) moves logits by 1e-2 or more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.models.config import MViTConfig
from pipeline.serving.exporters import example_clips
from pipeline.serving.spec import INPUT_NAME

ATOL = 1e-4
RTOL = 1e-4
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BatchCheck:
    batch: int
    max_abs_diff: float
    top1_agree: bool  # informative: a near-tie may flip within tolerance
    passed: bool


@dataclass(frozen=True)
class Verification:
    runtime: str
    atol: float
    rtol: float
    checks: tuple[BatchCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.checks)

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "atol": self.atol, "rtol": self.rtol, "passed": self.passed,
                "checks": [asdict(c) for c in self.checks], "input": "N(0, 1) clips, seed = batch size"}


def onnx_runner(path: Path, spinning: bool = True) -> Runner:
    """``spinning=False`` stops onnxruntime's idle worker threads from busy-waiting between calls, which
    would otherwise take the cores from anything else running in the process (the eager model in a
    benchmark that interleaves them)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda clips: session.run(None, {INPUT_NAME: clips})[0]


def program_runner(path: Path) -> Runner:
    module = torch.export.load(str(path)).module()

    def run(clips: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(clips)).numpy()

    return run


def verify(model: nn.Module, cfg: MViTConfig, run: Runner, runtime: str, batches: Sequence[int]) -> Verification:
    checks = []
    for batch in batches:
        clips = example_clips(cfg, batch, seed=batch)
        with torch.no_grad():
            want = model(clips).numpy()
        got = run(clips.numpy())
        if got.shape != want.shape:
            checks.append(BatchCheck(batch, float("inf"), False, False))
            continue
        checks.append(BatchCheck(batch, float(np.abs(got - want).max()),
                                 bool((got.argmax(-1) == want.argmax(-1)).all()),
                                 bool(np.allclose(got, want, rtol=RTOL, atol=ATOL))))
    return Verification(runtime, ATOL, RTOL, tuple(checks))
