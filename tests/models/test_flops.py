"""The FLOP counter reproduces the paper's per-view GFLOPs and parameter counts for every listed preset."""

from __future__ import annotations

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from pipeline.models.flops import model_stats
from pipeline.models.presets import PRESETS, preset_config
from tests.models.helpers import pytorchvideo_mvit_b_16x4

PAPER_PRESETS = [name for name, p in PRESETS.items() if p.reference.source.startswith("MViT paper")]


def test_every_paper_table_row_has_a_preset():
    assert sorted(PAPER_PRESETS) == sorted(
        ["mvit_s_16x4", "mvit_b_16x4", "mvit_b_32x3", "mvit_b_64x3", "mvit_b_24_32x3",
         "mvit_b_16", "mvit_b_24", "mvit_b_24_wide_320"]
    )


# MViT-S: the paper gives its stage layout (Table 3c) but not its K/V pooling strides, and no public
# config exists (PySlowFast issue #459 asks for it, unanswered). With MViT-B's rule (K/V held at the
# 7x7 grid) it counts 29.95 GFLOPs against the paper's 32.9; no published rule reaches 32.9 within 1%.
# Strict xfail: if a future preset reproduces the figure this test starts failing and must be updated.
_MVIT_S_GAP = pytest.mark.xfail(strict=True, reason="MViT-S K/V pooling schedule is unpublished: 29.95 vs 32.9")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=_MVIT_S_GAP) if n == "mvit_s_16x4" else n for n in PAPER_PRESETS]
)
def test_gflops_match_the_paper(name):
    ref = PRESETS[name].reference
    stats = model_stats(preset_config(name))
    assert abs(stats.gflops - ref.gflops) / ref.gflops <= 0.01, f"{name}: {stats.gflops:.2f} vs {ref.gflops}"


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_params_match_the_paper(name):
    ref = PRESETS[name].reference
    stats = model_stats(preset_config(name))
    params = stats.params - (stats.head_params if ref.params_without_head else 0)
    assert abs(params / 1e6 - ref.params_m) <= 0.1, f"{name}: {params / 1e6:.3f}M vs {ref.params_m}M"


def test_mvit_s_count_stays_at_the_documented_value():
    stats = model_stats(preset_config("mvit_s_16x4"))
    assert round(stats.gflops, 2) == 29.95 and round(stats.params / 1e6, 2) == 26.04


@pytest.mark.parametrize("name", ["mvit_b_16x4", "mvitv2_s_16x4"])
def test_counts_equal_torchvision_published_figures(name):
    (tv,) = PRESETS[name].extra_references
    stats = model_stats(preset_config(name))
    assert stats.params == tv.exact_params
    assert round(stats.gflops, 3) == tv.gflops


def test_counter_agrees_with_fvcore_used_by_pyslowfast():
    """fvcore (PySlowFast's counter) on PyTorchVideo's MViT-B, restricted to the matmul-type ops it
    shares with ours, must give the same total as our meta-device count of our own MViT-B."""
    reference = pytorchvideo_mvit_b_16x4().eval()
    analysis = FlopCountAnalysis(reference, torch.randn(1, 3, 16, 224, 224))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    matmul_like = sum(by_op.get(op, 0) for op in ("conv", "linear", "matmul", "addmm", "bmm", "einsum"))
    ours = model_stats(preset_config("mvit_b_16x4")).gflops
    assert abs(matmul_like / 1e9 - ours) / ours < 1e-3
