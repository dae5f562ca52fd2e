"""Behaviour of the model itself: shapes, options, gradient checkpointing, torch.compile."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.mvit import MViT, MViTConfig, block_specs
from pipeline.models.presets import PRESETS, build_preset, preset_config
from tests.models.helpers import tiny_config


def test_mvit_b_block_table_matches_the_paper():
    specs = block_specs(preset_config("mvit_b_16x4"))
    assert len(specs) == 16
    assert [s.num_heads for s in specs] == [1, 2, 2] + [4] * 11 + [8, 8]
    assert {s.dim_in // s.num_heads for s in specs} == {96}  # head dim stays 96
    assert [i for i, s in enumerate(specs) if s.dim_out != s.dim_in] == [0, 2, 13]
    assert [i for i, s in enumerate(specs) if s.stride_q != (1, 1, 1)] == [1, 3, 14]
    assert specs[0].stride_kv == (1, 8, 8) and specs[1].stride_kv == (1, 4, 4)
    assert specs[3].stride_kv == (1, 2, 2) and specs[14].stride_kv == (1, 1, 1)
    assert specs[0].input_grid == (8, 56, 56) and specs[15].input_grid == (8, 7, 7)
    assert specs[-1].drop_path == pytest.approx(0.2) and specs[0].drop_path == 0.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_other_classes_frames_and_crop(name):
    cfg = preset_config(name)
    frames = 1 if cfg.num_frames == 1 else 8
    small = preset_config(name, num_classes=11, num_frames=frames, crop_size=64)
    with torch.device("meta"):
        model = MViT(small)
        out = model(torch.empty(2, 3, frames, 64, 64))
    assert out.shape == (2, 11)


def test_image_models_accept_4d_input_and_video_models_reject_wrong_sizes():
    image_model = MViT(tiny_config(1, num_frames=1, patch_kernel=(1, 7, 7), patch_stride=(1, 4, 4),
                                   patch_padding=(0, 3, 3), pool_kernel=(1, 3, 3), sep_pos_embed=False))
    assert image_model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    video_model = MViT(tiny_config(1))
    with pytest.raises(ValueError, match="token grid"):
        video_model(torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        video_model(torch.randn(3, 32, 32))


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown MViT config keys.*embed_dims"):
        MViTConfig.from_dict({"embed_dims": 96})
    with pytest.raises(ValueError, match="stage_starts"):
        MViTConfig(depth=4, stage_starts=(1, 5))
    with pytest.raises(ValueError, match="divisible"):
        MViTConfig(embed_dim=96, num_heads=5)
    with pytest.raises(KeyError, match="available"):
        build_preset("mvit_xl")


@pytest.mark.parametrize("version", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(version):
    torch.manual_seed(0)
    model = MViT(tiny_config(version))
    clip = torch.randn(2, 3, 4, 32, 32)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        model(clip).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_stochastic_depth_and_dropout_only_act_in_training():
    torch.manual_seed(0)
    model = MViT(tiny_config(1, drop_path_rate=0.5, head_dropout=0.5))
    clip = torch.randn(4, 3, 4, 32, 32)
    model.eval()
    assert torch.equal(model(clip), model(clip))
    model.train()
    assert not torch.equal(model(clip), model(clip))


def test_no_weight_decay_lists_embeddings_and_relative_tables():
    assert MViT(tiny_config(1)).no_weight_decay() == {
        "cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"
    }
    v2 = MViT(tiny_config(2)).no_weight_decay()
    assert "cls_token" in v2 and "blocks.0.attn.rel_pos_h" in v2 and not any(n.startswith("pos_embed") for n in v2)


# Each compiles every code path of its version once, on two blocks (one stage change). v1: separable
# position embedding, width change in the MLP, Q/K/V and skip pooling, attention without a bias. v2:
# relative position bias, residual pooling, Q pooled in every block, width change in attention.
# Measured on the 2-core CPU with a cold inductor cache: v2 44 s, then v1 17 s (shared kernels); the
# 4-block tiny models took 84-100 s (v2) and 35 s (v1).
_COMPILED_CONFIGS = {"v2": dict(version=2, depth=2, stage_starts=(1,)), "v1": dict(version=1, depth=2, stage_starts=(1,))}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(_COMPILED_CONFIGS))  # v2 first: v1 then reuses its kernels
def test_torch_compile_matches_eager_forward_and_backward(variant):
    torch.manual_seed(0)
    model = MViT(tiny_config(**_COMPILED_CONFIGS[variant]))
    clip = torch.randn(2, 3, 4, 32, 32)
    model(clip).sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    eager_out = model(clip).detach()
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(clip)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), eager_out, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-5, msg=name)
