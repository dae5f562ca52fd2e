"""Checkpoint import/export: PySlowFast files, strictness, safe loading, resizing to other input sizes."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torchvision

from pipeline.models.convert import CheckpointMismatch, detect_format, load_weights, to_torchvision
from pipeline.models.mvit import MViT
from pipeline.models.presets import build_preset
from tests.models.helpers import tiny_config


def _slowfast_checkpoint(model: MViT, separate_qkv: bool) -> dict:
    """A checkpoint laid out as PySlowFast's ``checkpoint.save_checkpoint`` writes it."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if separate_qkv:  # the layout of PySlowFast's older MViT releases
        for key in [k for k in state if re.search(r"attn\.qkv\.", k)]:
            q, k, v = state.pop(key).chunk(3, dim=0)
            for name, part in zip("qkv", (q, k, v)):
                state[key.replace(".qkv.", f".{name}.")] = part
    return {
        "epoch": 30,
        "model_state": state,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "cfg": "MODEL:\n  MODEL_NAME: MViT\n",
    }


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("separate_qkv", [False, True])
def test_slowfast_checkpoint_file_round_trips(tmp_path, version, separate_qkv):
    torch.manual_seed(0)
    source = MViT(tiny_config(version)).eval()
    path = tmp_path / "slowfast.pyth"
    torch.save(_slowfast_checkpoint(source, separate_qkv), path)
    target = MViT(tiny_config(version)).eval()
    fmt = load_weights(target, path)
    assert fmt == ("slowfast" if separate_qkv else "native")
    clip = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(clip), source(clip))


def test_export_to_torchvision_layout_loads_strictly_into_torchvision():
    torch.manual_seed(0)
    ours = MViT(tiny_config(1)).eval()
    exported = to_torchvision(ours.state_dict())
    assert detect_format(exported) == "torchvision"
    assert "pos_encoding.class_token" in exported and exported["pos_encoding.class_token"].ndim == 1
    # torchvision's MViT accepts the same per-block table; build the same tiny network there.
    from torchvision.models.video.mvit import MSBlockConfig, MViT as TVMViT

    blocks = [
        MSBlockConfig(
            num_heads=s.num_heads,
            input_channels=s.dim_in,
            output_channels=s.dim_out,
            kernel_q=list(s.kernel_q) if s.stride_q != (1, 1, 1) else [],
            kernel_kv=list(s.kernel_kv),
            stride_q=list(s.stride_q) if s.stride_q != (1, 1, 1) else [],
            stride_kv=list(s.stride_kv),
        )
        for s in ours.specs
    ]
    tv = TVMViT(
        spatial_size=(32, 32),
        temporal_size=4,
        block_setting=blocks,
        residual_pool=False,
        residual_with_cls_embed=False,
        rel_pos_embed=False,
        proj_after_attn=False,
        num_classes=7,
    ).eval()
    tv.load_state_dict(exported, strict=True)
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert (tv(clip) - ours(clip)).abs().max().item() <= 1e-5


def test_missing_unexpected_and_misshaped_keys_are_all_named():
    source = MViT(tiny_config(1)).state_dict()
    state = dict(source)
    del state["blocks.2.mlp.fc1.weight"]
    state["blocks.0.attn.extra.weight"] = torch.zeros(3)
    state["norm.weight"] = torch.zeros(5)
    with pytest.raises(CheckpointMismatch) as err:
        load_weights(MViT(tiny_config(1)), state)
    message = str(err.value)
    assert "blocks.2.mlp.fc1.weight" in message
    assert "blocks.0.attn.extra.weight" in message
    assert "norm.weight" in message and "(5,)" in message


def test_a_torchvision_v2_checkpoint_does_not_load_into_a_v1_model():
    with pytest.raises(CheckpointMismatch, match="rel_pos"):
        load_weights(MViT(tiny_config(1, embed_dim=96, num_frames=16, crop_size=224, depth=16,
                                      stage_starts=(1, 3, 14), kv_stride=(1, 8, 8))),
                     torchvision.models.video.mvit_v2_s().state_dict())


def test_a_classifier_for_other_classes_needs_an_explicit_drop_head():
    source = MViT(tiny_config(1, num_classes=7)).state_dict()
    target = MViT(tiny_config(1, num_classes=3))
    with pytest.raises(CheckpointMismatch, match="head.projection.weight"):
        load_weights(target, source)
    fresh_head = target.head.projection.weight.detach().clone()
    load_weights(target, source, drop_head=True)
    assert torch.equal(target.head.projection.weight, fresh_head)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"])


class _Payload:
    def __reduce__(self):  # executing this on load would be arbitrary code execution
        return (print, ("pwned",))


def test_checkpoint_files_are_loaded_without_unpickling_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state": MViT(tiny_config(1)).state_dict(), "extra": _Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_weights(MViT(tiny_config(1)), path)


@pytest.mark.parametrize("version", [1, 2])
def test_loading_at_another_input_size_resizes_position_tables(version):
    torch.manual_seed(0)
    source = MViT(tiny_config(version))
    bigger = MViT(tiny_config(version, num_frames=8, crop_size=48))
    load_weights(bigger, source.state_dict())
    out = bigger(torch.randn(1, 3, 8, 48, 48))
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    if version == 1:
        assert bigger.pos_embed_spatial.shape[1] == 12 * 12
        assert bigger.pos_embed_temporal.shape[1] == 4
        # resizing to the same size is the identity
        same = MViT(tiny_config(version))
        load_weights(same, source.state_dict())
        assert torch.equal(same.pos_embed_spatial, source.pos_embed_spatial)
    else:
        assert bigger.blocks[0].attn.rel_pos_t.shape[0] == 2 * 4 - 1


def test_image_checkpoint_with_2d_patch_kernel_loads_into_joint_pos_embed_model():
    cfg = tiny_config(1, num_frames=1, patch_kernel=(1, 7, 7), patch_stride=(1, 4, 4), patch_padding=(0, 3, 3),
                      pool_kernel=(1, 3, 3), sep_pos_embed=False)
    source = MViT(cfg).eval()
    state = dict(source.state_dict())
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].squeeze(2)  # Conv2d layout
    target = MViT(cfg).eval()
    load_weights(target, state)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(image), source(image))


def _smooth_grid(n: int) -> torch.Tensor:
    """A low-frequency (n*n, 96) pattern sampled at pixel centres, which bicubic resizing reproduces closely."""
    u = (torch.arange(n) + 0.5) / n
    field = torch.sin(2 * math.pi * u)[:, None] + torch.cos(math.pi * u)[None, :]
    return field.reshape(-1, 1) * torch.linspace(-1.0, 1.0, 96)


def test_image_preset_checkpoint_at_224_loads_at_320_with_a_resized_joint_position_embedding(tmp_path):
    torch.manual_seed(0)
    source = build_preset("mvit_b_16", num_classes=5)  # joint (non-separable) embedding: 1 + 56 * 56 rows
    with torch.no_grad():
        source.pos_embed[0, 1:] = _smooth_grid(56)
    path = tmp_path / "mvit_b_16_224.pt"
    torch.save(source.state_dict(), path)

    target = build_preset("mvit_b_16", num_classes=5, crop_size=320)
    assert load_weights(target, path) == "native"
    assert target.pos_embed.shape == (1, 1 + 80 * 80, 96)
    assert torch.equal(target.pos_embed[:, :1], source.pos_embed[:, :1])  # the cls slot is not resized
    torch.testing.assert_close(target.pos_embed[0, 1:], _smooth_grid(80), rtol=0, atol=0.03)
    assert torch.equal(target.blocks[5].attn.qkv.weight, source.blocks[5].attn.qkv.weight)
    with torch.no_grad():
        out = target.eval()(torch.randn(1, 3, 320, 320))
    assert out.shape == (1, 5) and torch.isfinite(out).all()
