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
from tests.models.helpers import pyslowfast_cfg, pyslowfast_mvit_state, save_pyslowfast_checkpoint, tiny_config


def _placed(written: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> set[str]:
    """Checks each written tensor against where it must land in ``loaded`` (a separate q, k or v as that
    third of the fused qkv rows); returns the model keys that received one."""
    placed = set()
    for key, value in written.items():
        match = re.fullmatch(r"(blocks\.\d+\.attn)\.([qkv])\.(weight|bias)", key)
        if match:
            prefix, part, kind = match.groups()
            target = f"{prefix}.qkv.{kind}"
            got = loaded[target].chunk(3, dim=0)["qkv".index(part)] if target in loaded else None
        else:
            target, got = key, loaded.get(key)
        assert got is not None and torch.equal(got, value), f"{key} did not arrive at {target}"
        placed.add(target)
    return placed


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("qkv", ["fused", "separate"])
def test_a_pyslowfast_checkpoint_file_puts_every_tensor_in_its_place(tmp_path, version, qkv):
    """The file is written from PySlowFast's own names, nesting and shape rules (tests/models/helpers.py),
    not from this model, so a name, a shape or a q/k/v order the converter gets wrong fails here."""
    cfg = pyslowfast_cfg(version, SEPARATE_QKV=qkv == "separate")
    path = tmp_path / "checkpoint_epoch_00030.pyth"
    written = save_pyslowfast_checkpoint(path, cfg, seed=version)
    locations: set[str] = set()
    torch.load(path, map_location=lambda storage, location: locations.add(location) or storage, weights_only=True)
    assert locations == {"cuda:0"}, "saved where it trained, as PySlowFast's files are"

    model = MViT(tiny_config(version)).eval()
    assert load_weights(model, path) == ("slowfast" if qkv == "separate" else "native")
    loaded = model.state_dict()
    assert _placed(written, loaded) == set(loaded)
    if version == 2:
        assert any(k.endswith(".attn.rel_pos_t") for k in written) and "pos_embed_spatial" not in written
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 4, 32, 32))).all()


_MVIT_B_16X4_CONV = dict(  # PySlowFast configs/Kinetics/MVIT_B_16x4_CONV.yaml (as of its MViTv2 release)
    EMBED_DIM=96, NUM_HEADS=1, DEPTH=16, DROPPATH_RATE=0.2, DIM_MUL=[[1, 2.0], [3, 2.0], [14, 2.0]],
    HEAD_MUL=[[1, 2.0], [3, 2.0], [14, 2.0]], POOL_KVQ_KERNEL=[3, 3, 3], POOL_KV_STRIDE_ADAPTIVE=[1, 8, 8],
    POOL_Q_STRIDE=[[1, 1, 2, 2], [3, 1, 2, 2], [14, 1, 2, 2]],
)  # fmt: skip
_MVITV2_S_16X4 = dict(  # configs/Kinetics/MVITv2_S_16x4.yaml, the config of MViTv2_S_16x4_k400_f302660347.pyth
    _MVIT_B_16X4_CONV, POOL_Q_STRIDE=[[i, 1, 2, 2] if i in (1, 3, 14) else [i, 1, 1, 1] for i in range(16)],
)


@pytest.mark.parametrize(("preset", "version", "mvit"),
                         [("mvit_b_16x4", 1, _MVIT_B_16X4_CONV), ("mvitv2_s_16x4", 2, _MVITV2_S_16X4)])
def test_pyslowfast_kinetics_configs_give_the_presets_names_and_shapes(preset, version, mvit):
    """At full size, the names and shapes PySlowFast's published Kinetics configs give are the preset's
    own, so their files load with no renaming beyond q/k/v and no resizing."""
    cfg = pyslowfast_cfg(version, num_frames=16, crop_size=224, num_classes=400, **mvit)
    theirs = {k: tuple(v.shape) for k, v in pyslowfast_mvit_state(cfg, seed=None).items()}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_preset(preset).state_dict().items()}
    assert theirs == ours


def test_pyslowfast_kv_pooling_that_stops_at_stride_one_is_refused_naming_the_keys(tmp_path):
    """PySlowFast builds no K/V pooling where kernel and stride are all ones: its configs without
    POOL_KVQ_KERNEL, and the MVIT_B_16x4_CONV.pyth release (POOL_KV_KERNEL [1, 1, 1] in blocks 14, 15).
    This model pools K/V with pool_kernel in every block, so such a file must fail, naming every key."""
    path = tmp_path / "release.pyth"
    save_pyslowfast_checkpoint(path, pyslowfast_cfg(1, POOL_KVQ_KERNEL=None))
    with pytest.raises(CheckpointMismatch) as err:
        load_weights(MViT(tiny_config(1, pool_kernel=(1, 3, 3))), path)
    message = str(err.value)
    assert "missing (18)" in message and "unexpected" not in message and "shape" not in message, message
    for block in (1, 2, 3):
        assert all(f"blocks.{block}.attn.{name}" in message for name in ("pool_k.weight", "norm_v.bias")), message


@pytest.mark.parametrize(
    ("version", "trained", "fields", "names"),
    [
        (1, dict(POOL_FIRST=True, SEPARATE_QKV=True), {}, "MVIT.POOL_FIRST is true"),
        (1, dict(MODE="avg"), dict(pool_mode="max", pool_norm=False), "MVIT.MODE is 'avg'"),
        (2, dict(RESIDUAL_POOLING=False), {}, "MVIT.RESIDUAL_POOLING is False"),
    ],
    ids=["pool-first", "avg-into-max", "no-residual-pooling"],
)
def test_pyslowfast_settings_the_weights_cannot_show_are_read_from_the_files_cfg(tmp_path, version, trained,
                                                                                   fields, names):
    """Each setting changes what the weights compute but no key or shape: the bare weights load into
    the model, and only the cfg recorded in the file can refuse them."""
    path = tmp_path / "other.pyth"
    weights = save_pyslowfast_checkpoint(path, pyslowfast_cfg(version, num_frames=8, **trained))
    load_weights(MViT(tiny_config(version, num_frames=8, **fields)), weights)
    with pytest.raises(CheckpointMismatch, match=f"trained as another network: {re.escape(names)}"):
        load_weights(MViT(tiny_config(version, num_frames=8, **fields)), path)


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
