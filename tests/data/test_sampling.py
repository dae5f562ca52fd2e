"""Clip and view sampling: frame-rate awareness, short videos, evaluation views, seeded draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.config import AugmentConfig, SamplingConfig
from pipeline.data.decode import view_rng
from pipeline.data.sampling import RAND_AUGMENT_OPS, RandAugmentOp, eval_clips, eval_views, train_clip, train_view
from pipeline.data.transforms import apply_rand_augment, render_view


def test_stride_is_measured_at_the_target_frame_rate() -> None:
    cfg = SamplingConfig(num_frames=16, stride=4, target_fps=30)
    rng = np.random.default_rng(0)
    at_30 = train_clip(rng, 300, 30.0, cfg)
    at_15 = train_clip(rng, 150, 15.0, cfg)
    assert np.all(np.diff(at_30) == 4)  # 16 x 4 frames at 30 fps
    assert np.all(np.diff(at_15) == 2)  # the same 2 s of a 15 fps video
    assert at_30[-1] <= 299 and at_15[-1] <= 149
    raw = SamplingConfig(num_frames=8, stride=3, target_fps=0)
    assert np.all(np.diff(train_clip(rng, 100, 25.0, raw)) == 3)  # target_fps 0: stride in source frames


def test_short_videos_clamp_or_loop() -> None:
    clamp = train_clip(np.random.default_rng(1), 10, 30.0, SamplingConfig(num_frames=8, stride=2, short_video="clamp"))
    loop = train_clip(np.random.default_rng(1), 10, 30.0, SamplingConfig(num_frames=8, stride=2, short_video="loop"))
    assert clamp.tolist() == [0, 2, 4, 6, 8, 9, 9, 9]  # span 15 > 10 frames: start 0, last frame repeated
    assert loop.tolist() == [0, 2, 4, 6, 8, 0, 2, 4]


def test_eval_clips_are_uniform_and_crops_cover_the_long_side() -> None:
    clips = eval_clips(300, 30.0, SamplingConfig(num_frames=8, stride=4, eval_clips=5))
    starts = [int(c[0]) for c in clips]
    assert len(clips) == 5 and starts == sorted(starts)
    assert starts[0] > 0 and starts[-1] + 28 < 299  # centred in equal ranges of start times
    assert np.allclose(np.diff(starts), np.diff(starts)[0], atol=1)
    aug = AugmentConfig(crop_size=224, eval_short_side=224)
    views = eval_views(568, 320, aug, 3)  # decode at short side 224: crops at left, centre, right
    assert [round(v.box.x * v.scale) for v in views] == [0, round((568 * 0.7 - 224) / 2), round(568 * 0.7 - 224)]
    assert all(round(v.box.h * v.scale) == 224 for v in views)
    portrait = eval_views(320, 568, aug, 3)
    assert [round(v.box.y * v.scale) for v in portrait][0] == 0 and len({v.box.x for v in portrait}) == 1


def test_training_views_depend_only_on_seed_epoch_key_view() -> None:
    aug = AugmentConfig(crop_size=48, mode="rrc")
    draw = lambda *args: train_view(view_rng(*args), 96, 64, aug)  # noqa: E731
    assert draw(7, 1, "abc", 0) == draw(7, 1, "abc", 0)
    assert len({draw(7, 1, "abc", 0), draw(7, 2, "abc", 0), draw(7, 1, "abd", 0), draw(7, 1, "abc", 1),
                draw(8, 1, "abc", 0)}) == 5  # fmt: skip
    for view in range(50):
        box = draw(0, 0, "k", view).box
        assert 0 <= box.x and box.x + box.w <= 96 + 1e-6 and 0 <= box.y and box.y + box.h <= 64 + 1e-6


@pytest.mark.parametrize("name", RAND_AUGMENT_OPS)
def test_every_rand_augment_op_keeps_shape_dtype_and_frames_consistent(name: str) -> None:
    frame = torch.randint(0, 256, (1, 3, 32, 40), dtype=torch.uint8)
    clip = frame.repeat(4, 1, 1, 1)  # four identical frames must stay identical
    out = apply_rand_augment(clip, RandAugmentOp(name, 7.0, 1))
    assert out.shape == clip.shape and out.dtype == torch.uint8
    assert all(torch.equal(out[0], out[t]) for t in range(1, 4))


def test_render_view_crops_resizes_flips_and_erases() -> None:
    frames = torch.arange(2 * 64 * 96 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 64, 96, 3)
    aug = AugmentConfig(crop_size=32, mode="jitter", jitter_scales=[64, 64], random_erasing=1.0, rand_augment=False)
    spec = train_view(np.random.default_rng(3), 96, 64, aug)
    out = render_view(frames, 1.0, 1.0, spec, 32, aug.mean, aug.std)
    assert out.shape == (3, 2, 32, 32) and out.dtype == torch.uint8
    x, y, _, _ = spec.box.scaled(1.0, 1.0)
    expected = frames[:, y : y + 32, x : x + 32].permute(3, 0, 1, 2)
    expected = expected.flip(-1) if spec.flip else expected
    erased = torch.zeros(32, 32, dtype=torch.bool)
    assert spec.erase is not None
    erased[spec.erase.y : spec.erase.y + spec.erase.h, spec.erase.x : spec.erase.x + spec.erase.w] = True
    assert torch.equal(out[..., ~erased], expected[..., ~erased])  # no resize needed: exact pixels
    assert torch.equal(out[:, 0][..., erased], out[:, 1][..., erased])  # same noise box in every frame
    half = render_view(frames[:, ::2, ::2], 0.5, 0.5, spec, 32, aug.mean, aug.std)  # decoded at half size:
    assert half.shape == out.shape  # the same box, upscaled back to the crop
