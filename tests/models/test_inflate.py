"""Image weights in a video model (PySlowFast's CHECKPOINT_INFLATE), and the classifier policies of
``fit_to_model``.

What inflation guarantees, and what it cannot: on a clip whose frames all show one image, the inflated
patch embedding gives every frame the image's tokens wherever its temporal window lies inside the clip,
and the split position embedding gives them the image's position codes, so the tokens entering the first
block are the image model's, repeated per frame (exact). The two models' outputs still differ: attention
sees each spatial key once per frame but the cls token once, which shifts the softmax weight between them.
With a zero-padded temporal kernel (the 16x4 presets: 3 taps, padding 1) the first and last frames see
only the taps inside the clip (2/3 of the image's response, plus the bias).
"""

from __future__ import annotations

import pytest
import torch

from pipeline.models.convert import CheckpointMismatch, fit_to_model, inflate_kernel
from pipeline.models.mvit import MViT
from tests.models.helpers import tiny_config

IMAGE = dict(num_frames=1, patch_kernel=(1, 7, 7), patch_stride=(1, 4, 4), patch_padding=(0, 3, 3),
             pool_kernel=(1, 3, 3), sep_pos_embed=False)


def _tokens_into_block0(model: MViT, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    return seen[0]


def test_a_static_clip_gives_every_frame_the_image_models_tokens() -> None:
    torch.manual_seed(0)
    image = MViT(tiny_config(1, **IMAGE)).eval()
    video = MViT(tiny_config(1, num_frames=4, patch_kernel=(2, 7, 7), patch_stride=(2, 4, 4),
                             patch_padding=(0, 3, 3), pool_kernel=(1, 3, 3))).eval()
    fitted = fit_to_model(video, image.state_dict())
    assert fitted.reinitialized == () and any("inflated over 2" in line for line in fitted.adapted)
    video.load_state_dict(fitted.state)
    picture = torch.randn(2, 3, 32, 32)
    want = _tokens_into_block0(image, picture)  # (B, 1 + H*W, C)
    got = _tokens_into_block0(video, picture.unsqueeze(2).repeat(1, 1, 4, 1, 1))  # (B, 1 + T*H*W, C)
    t, hw = video.grid[0], want.shape[1] - 1
    assert torch.equal(got[:, :1], want[:, :1])
    torch.testing.assert_close(got[:, 1:].reshape(2, t, hw, -1), want[:, 1:].unsqueeze(1).expand(2, t, hw, -1),
                               rtol=0, atol=1e-5)
    # ... and the outputs differ, through the cls token's share of attention (see the module docstring)
    with torch.no_grad():
        assert not torch.allclose(video.forward_features(picture.unsqueeze(2).repeat(1, 1, 4, 1, 1)),
                                  image.forward_features(picture), atol=1e-3)


def test_a_padded_three_tap_kernel_sees_the_image_inside_the_clip_and_two_thirds_at_its_ends() -> None:
    torch.manual_seed(0)
    image = MViT(tiny_config(1, **IMAGE))
    video = MViT(tiny_config(1, num_frames=8))  # patch kernel (3, 7, 7), stride (2, 4, 4), padding (1, 3, 3)
    fitted = fit_to_model(video, image.state_dict())
    # the Q/K/V pooling kernels are inflated as well: every pooling conv of the video model got one
    inflated = {line.split()[0] for line in fitted.adapted if "inflated over 3" in line}
    assert inflated == {k for k in video.state_dict() if k.endswith(".weight") and ".pool_" in k} | {"patch_embed.proj.weight"}
    video.load_state_dict(fitted.state)
    picture = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        image_out = image.patch_embed.proj(picture.unsqueeze(2))[:, :, 0]  # (1, C, H, W)
        video_out = video.patch_embed.proj(picture.unsqueeze(2).repeat(1, 1, 8, 1, 1))  # (1, C, 4, H, W)
    bias = image.patch_embed.proj.bias.view(1, -1, 1, 1)
    for t in range(1, 4):  # the window [2t - 1, 2t + 1] lies inside the 8 frames
        torch.testing.assert_close(video_out[:, :, t], image_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(video_out[:, :, 0], (image_out - bias) * 2 / 3 + bias, rtol=0, atol=1e-5)


def test_the_joint_position_embedding_becomes_class_spatial_and_zero_temporal() -> None:
    image = MViT(tiny_config(1, **IMAGE))
    joint = image.state_dict()["pos_embed"]  # (1, 1 + 8*8, C)
    same = fit_to_model(MViT(tiny_config(1, num_frames=4)), image.state_dict()).state
    assert torch.equal(same["pos_embed_class"], joint[:, :1]) and torch.equal(same["pos_embed_spatial"], joint[:, 1:])
    assert same["pos_embed_temporal"].shape == (1, 2, joint.shape[2]) and not same["pos_embed_temporal"].any()
    larger = fit_to_model(MViT(tiny_config(1, num_frames=4, crop_size=48)), image.state_dict()).state
    assert larger["pos_embed_spatial"].shape == (1, 12 * 12, joint.shape[2])  # resized (bicubic) to the grid
    # a video model with a joint embedding gets the image's codes for every frame
    tiled = fit_to_model(MViT(tiny_config(1, num_frames=4, sep_pos_embed=False)), image.state_dict()).state
    assert torch.equal(tiled["pos_embed"], torch.cat((joint[:, :1], joint[:, 1:].repeat(1, 2, 1)), dim=1))


def test_only_a_single_time_step_kernel_is_inflated() -> None:
    assert torch.equal(inflate_kernel(torch.ones(2, 3, 5, 5), 4), torch.full((2, 3, 4, 5, 5), 0.25))
    with pytest.raises(CheckpointMismatch, match="one time step"):
        inflate_kernel(torch.ones(2, 3, 2, 5, 5), 4)
    # a video checkpoint of another temporal kernel is a shape mismatch, not a silent inflation
    video2 = MViT(tiny_config(1, num_frames=4, patch_kernel=(2, 7, 7), patch_padding=(0, 3, 3)))
    with pytest.raises(CheckpointMismatch, match="patch_embed.proj.weight"):
        fit_to_model(MViT(tiny_config(1, num_frames=4)), video2.state_dict())


def test_head_policies_keep_new_and_drop() -> None:
    source = MViT(tiny_config(1, num_classes=7)).state_dict()
    other = MViT(tiny_config(1, num_classes=3))
    with pytest.raises(CheckpointMismatch, match="head.projection.weight"):
        fit_to_model(other, source, "keep")
    fitted = fit_to_model(other, source, "new")
    assert fitted.reinitialized == ("head.projection.bias", "head.projection.weight")
    assert torch.equal(fitted.state["head.projection.weight"], other.state_dict()["head.projection.weight"])
    assert torch.equal(fitted.state["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    same = MViT(tiny_config(1, num_classes=7))
    kept = fit_to_model(same, source, "new")  # same class count: the classifier is kept
    assert kept.reinitialized == () and torch.equal(kept.state["head.projection.weight"], source["head.projection.weight"])
    assert fit_to_model(same, source, "drop").reinitialized == ("head.projection.bias", "head.projection.weight")


def test_the_presets_fine_tune_loads_in1k_mvit_b_16_into_mvit_b_16x4() -> None:
    """configs/experiment/k400_mvit_b_16x4_from_in1k.yaml's pair at full size: every weight of the image
    network finds its place in the video network (the target built on the meta device, as the driver does)."""
    from pipeline.models.presets import preset_config

    with torch.device("meta"):
        image_net = MViT(preset_config("mvit_b_16"))
        video = MViT(preset_config("mvit_b_16x4", num_classes=400))
    image = {k: torch.zeros(v.shape) for k, v in image_net.state_dict().items()}  # shapes are what is checked
    fitted = fit_to_model(video, image, "new")
    assert fitted.reinitialized == ("head.projection.bias", "head.projection.weight")
    inflated = [line for line in fitted.adapted if "inflated over 3" in line]
    assert len(inflated) == 1 + sum(1 for k in image if ".pool_" in k and k.endswith(".weight"))
    assert fitted.state["pos_embed_temporal"].shape == (1, 8, 96) and fitted.state["pos_embed_spatial"].shape == (1, 3136, 96)


def test_a_video_models_joint_embedding_is_never_taken_for_an_image_grid() -> None:
    """4 x 8 x 8 = 256 = 16^2 tokens: a square count, but the checkpoint's patch kernel spans time, so it is
    a mis-shaped embedding (refused), not an image grid to resize and repeat."""
    video = MViT(tiny_config(1, num_frames=8, sep_pos_embed=False)).state_dict()  # grid 4 x 8 x 8
    with pytest.raises(CheckpointMismatch, match=r"pos_embed: checkpoint \(1, 257, 16\)"):
        fit_to_model(MViT(tiny_config(1, num_frames=4, sep_pos_embed=False)), video)
