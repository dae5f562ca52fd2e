"""Clip and view sampling: frame-rate awareness, short videos, evaluation views, seeded draws."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.ndimage
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


# ---- RandAugment against timm ----------------------------------------------------------------
# timm's PIL ops (timm.data.auto_augment, which PySlowFast copied) are the reference. Ours run on
# tensors, so each op is checked on one fixed image at magnitude 7 (the video recipe's m7): it must
# change most pixels (an op that silently does nothing fails) and agree with timm's op given the
# arguments timm itself derives, with its random sign forced each way.

_SIGNED_OPS = ("Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
               "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")  # fmt: skip
_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_RA_CASES = [(name, sign) for name in RAND_AUGMENT_OPS for sign in ((1, -1) if name in _SIGNED_OPS else (1,))]
# Largest |ours - timm| (0..255 levels) allowed per op, over the whole image or, for geometric ops,
# over the pixels both implementations sample wholly from inside the source image.
_RA_TOLERANCE = {
    # integer lookup tables built the same way (torchvision's equalize ports PIL's): exact
    "Invert": 0, "PosterizeIncreasing": 0, "SolarizeIncreasing": 0, "SolarizeAdd": 0, "Equalize": 0,
    # the same per-channel min-max stretch, torch in float32, PIL's table in float64: a value that
    # lands on an integer boundary may truncate one level apart
    "AutoContrast": 1,
    # blends with a degenerate image, truncated by both: PIL's grey is the rounded fixed-point
    # (299 R + 587 G + 114 B) / 1000 and its Contrast mean an integer, torchvision's grey is truncated
    # and its mean a float, so one truncation can fall a level apart; Brightness (a blend with black)
    # and Sharpness (both round the 1-5-1 smoothing) come out exact here, one level covers float32 ties
    "ColorIncreasing": 1, "ContrastIncreasing": 1, "BrightnessIncreasing": 1, "SharpnessIncreasing": 1,
    # bilinear at the same sampling points, but PIL truncates the interpolated value where torch
    # rounds it: about half the pixels come out one level higher in ours
    "Rotate": 1, "ShearX": 1, "ShearY": 1, "TranslateXRel": 1, "TranslateYRel": 1,
}  # fmt: skip
_RA_MIN_CHANGED = 0.5  # at m7 every op moves at least 66% of the values of the test image; half is the floor


def _natural_image() -> np.ndarray:
    """A (48, 64, 3) uint8 picture, not noise: smooth shading (for the geometric ops to move
    recognisably), hard-edged shapes, a fine texture (for Sharpness to act on), a skewed histogram
    (for Equalize) and no channel spanning 0..255 (for AutoContrast to stretch). Uniform noise would leave
    AutoContrast and Equalize nearly no-ops and make interpolation differences look like bugs."""
    h, w = 48, 64
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    image = np.stack([60 + 110 * x / (w - 1) + 15 * np.sin(y / 4), 50 + 100 * (y / (h - 1)) ** 2,
                      160 - 70 * (x + y) / (w + h)], axis=-1)  # fmt: skip
    image[(x - 20) ** 2 + (y - 24) ** 2 < 11**2] = (200, 70, 50)  # a red disc
    image[(x >= 38) & (x < 56) & (y >= 6) & (y < 26)] = (45, 170, 95)  # a green box
    image += 12 * np.sin(1.3 * x)[..., None] * np.cos(0.9 * y)[..., None]  # texture
    return np.clip(np.round(image), 25, 230).astype(np.uint8)


def _timm_op(auto_augment, monkeypatch: pytest.MonkeyPatch, name: str, sign: int, image: np.ndarray) -> np.ndarray:
    """timm's op at magnitude 7, its argument from timm's own LEVEL_TO_ARG. timm negates a signed
    argument when ``random.random() > 0.5``; a stub whose ``random()`` is 1.0 (or 0.0) forces that
    branch, and lacks every other method, so any other draw timm made would fail the test.
    Interpolation is pinned to bilinear, one of timm's two random choices (PySlowFast pins bicubic,
    which torchvision's tensor ops lack); the fill is timm's default, (128, 128, 128)."""
    from PIL import Image

    monkeypatch.setattr(auto_augment, "random", SimpleNamespace(random=lambda: float(sign < 0)))
    op = auto_augment.AugmentOp(name, prob=1.0, magnitude=7, hparams={"interpolation": Image.BILINEAR})
    return np.asarray(op(Image.fromarray(image)))


def test_rand_augment_op_set_is_timms_increasing_set() -> None:
    from timm.data import auto_augment

    ops = auto_augment.rand_augment_transform("rand-m7-n4-mstd0.5-inc1", {}).ops
    assert tuple(op.name for op in ops) == RAND_AUGMENT_OPS


@pytest.mark.parametrize(("name", "sign"), _RA_CASES)
def test_rand_augment_op_changes_the_image_and_matches_timm(
    name: str, sign: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from timm.data import auto_augment

    image = _natural_image()
    clip = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).repeat(4, 1, 1, 1)  # four identical frames
    op = RandAugmentOp(name, 7.0, sign)
    out = apply_rand_augment(clip, op)
    assert out.shape == clip.shape and out.dtype == torch.uint8
    assert all(torch.equal(out[0], out[t]) for t in range(1, 4))  # same op, same parameters on every frame
    ours = out[0].permute(1, 2, 0).numpy()
    changed = float(np.mean(ours != image))
    assert changed >= _RA_MIN_CHANGED, f"{name} changed only {changed:.0%} of the values"

    ref = _timm_op(auto_augment, monkeypatch, name, sign, image)
    flipped = _timm_op(auto_augment, monkeypatch, name, -sign, image)
    assert np.array_equal(ref, flipped) == (name not in _SIGNED_OPS)  # the signed list is timm's
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    if name in _GEOMETRIC_OPS:
        # Compare where both sampled wholly inside the source: on a white image those pixels stay 255
        # (PIL replicates the edge pixel for samples in the outer half pixel, torch blends in the fill,
        # so the one-pixel seam is left out). Where timm shows pure fill, ours must show the same fill.
        white = np.full_like(image, 255)
        ref_white = _timm_op(auto_augment, monkeypatch, name, sign, white)
        ours_white = apply_rand_augment(torch.from_numpy(white).permute(2, 0, 1)[None], op)[0].permute(1, 2, 0)
        ours_white = ours_white.numpy()
        inside = (ref_white == 255).all(-1) & (ours_white == 255).all(-1)
        assert inside.mean() > 0.5
        fill = scipy.ndimage.binary_erosion((ref_white == 128).all(-1))
        assert fill.any() and (ours_white[fill] == 128).all()
        diff = diff[inside]
    assert diff.max() <= _RA_TOLERANCE[name], f"{name}: max {diff.max()}, mean {diff.mean():.3f} levels from timm"


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


def _pyslowfast_segments(video_frames: int, num_frames: int, rng: np.random.Generator | None) -> list[int]:
    """PySlowFast's ssv2 loader (``get_seq_frames``), written out from its definition: segment i spans
    round(s i) .. round(s (i + 1)), s = (frames - 1) / num_frames; a random frame of each in training
    (both ends included), ``(start + end) // 2`` in evaluation."""
    size = (video_frames - 1) / num_frames
    out = []
    for i in range(num_frames):
        start, end = int(np.round(size * i)), int(np.round(size * (i + 1)))
        out.append(int(rng.integers(start, end + 1)) if rng is not None else (start + end) // 2)
    return out


@pytest.mark.parametrize("video_frames", [7, 16, 45, 61, 300])
def test_segment_sampling_is_pyslowfasts_ssv2_sampling(video_frames: int) -> None:
    cfg = SamplingConfig(mode="segment", num_frames=16, stride=4, target_fps=30, eval_clips=1)
    (middle,) = eval_clips(video_frames, 12.0, cfg)
    assert middle.tolist() == _pyslowfast_segments(video_frames, 16, None)
    # training draws frame by frame what the reference draws with the same generator
    for seed in range(20):
        clip = train_clip(np.random.default_rng(seed), video_frames, 12.0, cfg)
        assert clip.tolist() == _pyslowfast_segments(video_frames, 16, np.random.default_rng(seed))
        assert (np.diff(clip) >= 0).all() and clip[0] >= 0 and clip[-1] <= video_frames - 1
    # the whole video is covered whatever its length or frame rate (stride and target_fps play no part)
    assert train_clip(np.random.default_rng(0), video_frames, 30.0, cfg).tolist() == \
        train_clip(np.random.default_rng(0), video_frames, 12.0, cfg).tolist()


def test_segment_sampling_reaches_every_frame_of_a_segment_and_spreads_evaluation_clips() -> None:
    cfg = SamplingConfig(mode="segment", num_frames=4, eval_clips=3)
    seen = {tuple(train_clip(np.random.default_rng(s), 41, 30.0, cfg)) for s in range(400)}
    per_position = [sorted({clip[i] for clip in seen}) for i in range(4)]
    assert per_position == [list(range(0, 11)), list(range(10, 21)), list(range(20, 31)), list(range(30, 41))]
    # clip k of K takes the frame at (k + 1/2) / K of each segment: with K = 3, a sixth, a half, five sixths in
    clips = eval_clips(41, 30.0, cfg)
    assert [c.tolist() for c in clips] == [[1, 11, 21, 31], [5, 15, 25, 35], [8, 18, 28, 38]]
    assert eval_clips(41, 30.0, SamplingConfig(mode="segment", num_frames=4, eval_clips=1))[0].tolist() == [5, 15, 25, 35]


def test_inverse_uniform_jitter_favours_the_small_end() -> None:
    uniform = AugmentConfig(mode="jitter", jitter_scales=[256, 320], crop_size=224)
    inverse = AugmentConfig(mode="jitter", jitter_scales=[256, 320], crop_size=224, jitter_inverse_uniform=True)
    sides = {}
    for name, aug in (("uniform", uniform), ("inverse", inverse)):
        # a 320 x 240 frame: the crop box side is crop * 240 / short_side
        boxes = [train_view(np.random.default_rng(s), 320, 240, aug).box.w for s in range(2000)]
        sides[name] = np.array([round(224 * 240 / w) for w in boxes])
    for s in sides.values():
        assert s.min() >= 256 and s.max() <= 320
    # 1/U(1/320, 1/256): median 2 / (1/256 + 1/320) = 284.4, below the uniform one's 288
    assert abs(np.median(sides["uniform"]) - 288) <= 2 and abs(np.median(sides["inverse"]) - 284.4) <= 2
    assert np.median(sides["inverse"]) < np.median(sides["uniform"])
