"""Q/K/V pooling options of MHPA: conv / max / avg pooling, explicit padding, the norm after pooling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models.convert import CheckpointMismatch, load_weights, to_torchvision
from pipeline.models.flops import model_stats
from pipeline.models.mvit import MViT, block_specs
from pipeline.models.presets import preset_config
from tests.models.helpers import tiny_config

# torch's avg_pool3d needs every pooled axis at least as long as the kernel: 8 frames give T=4 >= 3.
FRAMES = 8


def _clip(batch: int = 2, frames: int = FRAMES) -> torch.Tensor:
    return torch.randn(batch, 3, frames, 32, 32, generator=torch.Generator().manual_seed(3))


def _pool_modules(model: MViT) -> dict[str, nn.Module]:
    return {
        f"blocks.{i}.attn.pool_{x}": getattr(block.attn, f"pool_{x}")
        for i, block in enumerate(model.blocks)
        for x in "qkv"
        if getattr(block.attn, f"pool_{x}") is not None
    }


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mode", ["conv", "max", "avg"])
def test_every_pool_mode_runs_forward_and_backward(version, mode):
    torch.manual_seed(0)
    model = MViT(tiny_config(version, pool_mode=mode, num_frames=FRAMES))
    out = model(_clip())
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    pools = _pool_modules(model)
    assert pools, "the tiny config pools Q and K/V"
    expected = {"conv": nn.Conv3d, "max": nn.MaxPool3d, "avg": nn.AvgPool3d}[mode]
    assert all(type(m) is expected for m in pools.values())
    # The norm after pooling stays in every mode (pool_norm defaults to True).
    assert all(model.get_submodule(name.replace(".pool_", ".norm_")) is not None for name in pools)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_max_and_avg_pooling_have_no_parameters(mode):
    conv = MViT(tiny_config(2, num_frames=FRAMES))
    model = MViT(tiny_config(2, pool_mode=mode, num_frames=FRAMES))
    assert all(not list(m.parameters()) for m in _pool_modules(model).values())
    pool_weights = sum(m.weight.numel() for m in _pool_modules(conv).values())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in conv.parameters()) - pool_weights
    assert not any(".attn.pool_" in k for k in model.state_dict())
    assert any(".attn.norm_k." in k for k in model.state_dict())


@pytest.mark.parametrize("mode", ["conv", "max", "avg"])
def test_pool_norm_false_leaves_out_the_norms(mode):
    model = MViT(tiny_config(1, pool_mode=mode, pool_norm=False, num_frames=FRAMES))
    assert not any(".attn.norm_" in k for k in model.state_dict())
    assert model(_clip()).shape == (2, 7)


def _recorded_grids(model: MViT, clip: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The (T, H, W) each pooling module actually produced, read off its output tensor."""
    grids: dict[str, tuple[int, ...]] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: grids.__setitem__(name, tuple(out.shape[2:])))
        for name, module in _pool_modules(model).items()
    ]
    with torch.no_grad():
        model(clip)
    for handle in handles:
        handle.remove()
    return grids


def _predicted_grids(model: MViT) -> dict[str, tuple[int, ...]]:
    predicted = {}
    for i, spec in enumerate(model.specs):
        predicted[f"blocks.{i}.attn.pool_q"] = spec.q_grid
        predicted[f"blocks.{i}.attn.pool_k"] = predicted[f"blocks.{i}.attn.pool_v"] = spec.kv_grid
    return predicted


@pytest.mark.parametrize("mode", ["conv", "max", "avg"])
def test_explicit_padding_changes_the_kv_grid_exactly_as_torch_pools(mode):
    # One scale stage: Q is never pooled, so K/V pooling may take any padding up to kernel // 2.
    kv_grids = {}
    for padding in [None, (0, 0, 0), (1, 0, 1), (0, 1, 0)]:
        model = MViT(tiny_config(1, pool_mode=mode, num_frames=FRAMES, stage_starts=(), pool_padding=padding))
        recorded = _recorded_grids(model, _clip(1))
        assert recorded == {k: v for k, v in _predicted_grids(model).items() if k in recorded}
        kv_grids[padding] = recorded["blocks.0.attn.pool_k"]
    assert kv_grids == {None: (4, 4, 4), (0, 0, 0): (2, 3, 3), (1, 0, 1): (4, 3, 4), (0, 1, 0): (2, 4, 3)}


@pytest.mark.parametrize("mode", ["conv", "max", "avg"])
def test_even_kernel_needs_the_padding_that_keeps_q_on_the_skip_grid(mode):
    with pytest.raises(ValueError, match=r"pool_kernel \(1, 2, 2\).*skip connection gives"):
        tiny_config(1, pool_mode=mode, pool_kernel=(1, 2, 2))  # kernel // 2 padding: Q grid 5x5, skip 4x4
    model = MViT(tiny_config(1, pool_mode=mode, pool_kernel=(1, 2, 2), pool_padding=(0, 0, 0)))
    recorded = _recorded_grids(model, _clip(1, frames=4))
    assert "blocks.1.attn.pool_q" in recorded
    assert recorded == {k: v for k, v in _predicted_grids(model).items() if k in recorded}
    assert [s.input_grid for s in model.specs] == [(2, 8, 8), (2, 8, 8), (2, 4, 4), (2, 4, 4)]


def test_explicit_default_padding_is_the_same_model():
    torch.manual_seed(0)
    implicit = MViT(tiny_config(1))
    explicit = MViT(tiny_config(1, pool_padding=(1, 1, 1)))
    assert block_specs(implicit.cfg) == block_specs(explicit.cfg)
    explicit.load_state_dict(implicit.state_dict(), strict=True)
    clip = _clip(frames=4)
    with torch.no_grad():
        assert torch.equal(implicit.eval()(clip), explicit.eval()(clip))


def test_image_padding_given_for_h_and_w_gets_no_temporal_padding():
    cfg = tiny_config(1, num_frames=1, patch_kernel=(1, 7, 7), patch_stride=(1, 4, 4), patch_padding=(3, 3),
                      pool_kernel=(3, 3), pool_padding=(1, 1), sep_pos_embed=False)
    assert cfg.pool_kernel == (1, 3, 3) and cfg.pool_padding == (0, 1, 1) and cfg.patch_padding == (0, 3, 3)
    assert MViT(cfg)(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(pool_mode="Max"), r"pool_mode must be one of 'conv', 'max', 'avg', got 'Max'"),
        (dict(pool_mode="conv_unshared"), r"pool_mode must be one of 'conv', 'max', 'avg'"),
        (dict(pool_padding=(0, -1, 1)), r"pool_padding must be >= 0 on every axis, got \(0, -1, 1\)"),
        (dict(pool_padding=(1, 2, 1)), r"pool_padding \(1, 2, 1\) exceeds half of pool_kernel \(3, 3, 3\)"),
        (dict(pool_padding=(1, 1, 1, 1)), r"expected 1, 2 or 3 integers"),
        (dict(pool_padding=(0, 1, 1)), r"pool_padding \(0, 1, 1\): block 0's K/V pooling.*leaves no tokens"),
        (dict(pool_mode="avg"), r"pool_mode 'avg' needs every pooled token grid at least as large"),
    ],
)
def test_bad_pool_settings_are_refused_when_the_config_is_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(1, **overrides)  # 4 frames: a T=2 grid, shorter than the temporal kernel 3


def test_conv_mode_counts_are_unchanged_and_max_avg_pooling_adds_no_flops():
    conv = model_stats(preset_config("mvit_b_16x4"))
    assert conv.params == 36_610_672 and round(conv.gflops, 3) == 70.599
    for mode in ("max", "avg"):
        stats = model_stats(preset_config("mvit_b_16x4", pool_mode=mode))
        assert stats.params < conv.params
        # Same grids, so every matmul is the same; only the pooling convolutions are gone.
        others = {op: f for op, f in stats.by_op.items() if "convolution" not in op}
        assert others == {op: f for op, f in conv.by_op.items() if "convolution" not in op}
        assert 0 < stats.gflops < conv.gflops


DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def _as_written(value: float, figure: str) -> str:
    """``value`` rounded to as many decimals as the documented ``figure`` shows."""
    return f"{value:.{len(figure.partition('.')[2])}f}"


def test_the_documented_max_avg_pooling_figures_are_what_the_code_counts():
    """docs/models.md gives MViT-B 16x4's parameters and GFLOPs under max/avg pooling beside the conv
    ones; each figure must be the project's own count (pipeline.models.flops) rounded as written, for
    both modes, so a change to either the page or the model fails here."""
    text = " ".join(DOCS_PAGE.read_text().split())
    found = re.search(r"MViT-B 16x4 then has ([\d.]+)M parameters and ([\d.]+) GFLOPs instead of ([\d.]+)M / "
                      r"([\d.]+)", text)
    assert found, f"{DOCS_PAGE} no longer states MViT-B 16x4's max/avg pooling figures in the form this test reads"
    params, gflops, conv_params, conv_gflops = found.groups()
    figures = {"conv": (conv_params, conv_gflops), "max": (params, gflops), "avg": (params, gflops)}
    for mode, documented in figures.items():
        stats = model_stats(preset_config("mvit_b_16x4", pool_mode=mode))
        counted = (_as_written(stats.params / 1e6, documented[0]), _as_written(stats.gflops, documented[1]))
        assert counted == documented, f"pool_mode={mode}: the code counts {counted}, the page says {documented}"


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_torchvision_export_refuses_models_it_cannot_build(mode):
    pooled = MViT(tiny_config(1, pool_mode=mode, num_frames=FRAMES))
    with pytest.raises(CheckpointMismatch, match="norm without a conv"):
        to_torchvision(pooled.state_dict())
    unnormed = MViT(tiny_config(1, pool_mode=mode, pool_norm=False, num_frames=FRAMES))
    with pytest.raises(CheckpointMismatch, match=f"pool_mode='{mode}'"):
        to_torchvision(unnormed.state_dict(), unnormed.cfg)


def test_torchvision_export_of_conv_pooling_checks_norms_and_padding():
    no_norm = MViT(tiny_config(1, pool_norm=False))
    with pytest.raises(CheckpointMismatch, match="conv without a norm"):
        to_torchvision(no_norm.state_dict())
    padded = tiny_config(1, num_frames=FRAMES, stage_starts=(), pool_padding=(0, 0, 0))
    with pytest.raises(CheckpointMismatch, match=r"pool_padding=\(0, 0, 0\)"):
        to_torchvision(MViT(padded).state_dict(), padded)
    default = MViT(tiny_config(1))
    assert to_torchvision(default.state_dict(), default.cfg).keys() == to_torchvision(default.state_dict()).keys()


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_max_and_avg_checkpoints_round_trip(mode):
    torch.manual_seed(0)
    source = MViT(tiny_config(2, pool_mode=mode, num_frames=FRAMES)).eval()
    target = MViT(tiny_config(2, pool_mode=mode, num_frames=FRAMES)).eval()
    assert load_weights(target, source.state_dict()) == "native"
    with torch.no_grad():
        assert torch.equal(target(_clip()), source(_clip()))
    with pytest.raises(CheckpointMismatch, match="missing.*attn.pool_"):
        load_weights(MViT(tiny_config(2, num_frames=FRAMES)), source.state_dict())
