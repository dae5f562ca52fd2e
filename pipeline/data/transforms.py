"""Turning decoded frames and a ``ViewSpec`` into one uint8 view: crop, resize, flip, RandAugment,
random erasing. Frames are (T, H, W, 3) uint8 tensors (an image is T = 1); the result is
(3, T, crop, crop) uint8. Every op sees all T frames at once with the same parameters, so a clip
stays temporally consistent. The ops are torchvision's functional ones on uint8 tensors.

RandAugment reproduces timm's PIL ops (``timm.data.auto_augment``, which PySlowFast copied): the same
level-to-argument mapping, ``op.sign`` = +1 for timm's un-negated argument, the same geometry (shears
about the top-left corner, sub-pixel translations) and fill (128, 128, 128); tests/data/test_sampling.py
compares every op with timm's. One deliberate difference: geometric ops interpolate bilinearly (one of
timm's two random choices), as torchvision's tensor kernels have no bicubic for affine/rotate, where
PySlowFast's recipe sets bicubic.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.data.device_augment import (
    enhance_factor,
    erase_patch,
    posterize_bits,
    resize_view,
    rotate_degrees,
    shear_degrees,
    solarize_add,
    solarize_threshold,
    translate_fraction,
)
from pipeline.data.sampling import RandAugmentOp, ViewSpec

_FILL = [128.0, 128.0, 128.0]  # timm's fill for geometric ops


def render_view(
    frames: torch.Tensor, fx: float, fy: float, view: ViewSpec, crop: int, mean: list[float], std: list[float]
) -> torch.Tensor:
    """``frames`` were decoded at (fx, fy) times the native size; ``view.box`` is in native pixels."""
    clip = resize_view(crop_frames(frames, fx, fy, view).permute(0, 3, 1, 2), crop, view.flip)  # T, C, crop, crop
    for op in view.ops:
        clip = apply_rand_augment(clip, op)
    if view.erase is not None:
        clip = erase(clip, view.erase.x, view.erase.y, view.erase.w, view.erase.h, view.erase.seed, mean, std)
    return clip.permute(1, 0, 2, 3).contiguous()


def crop_frames(frames: torch.Tensor, fx: float, fy: float, view: ViewSpec) -> torch.Tensor:
    """The view's box cut from (T, H, W, 3) frames decoded at (fx, fy) times the native size, clamped to
    them: a (T, h, w, 3) view of ``frames``, not yet resized (what ``augment.on_device`` sends)."""
    height, width = frames.shape[1], frames.shape[2]
    x, y, w, h = view.box.scaled(fx, fy)
    x, y = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
    w, h = min(w, width - x), min(h, height - y)
    return frames[:, y : y + h, x : x + w, :]


def apply_rand_augment(clip: torch.Tensor, op: RandAugmentOp) -> torch.Tensor:
    """One timm RandAugment op ("increasing" variants) on a (T, C, H, W) uint8 clip."""
    level = op.magnitude / 10.0
    name = op.name
    if name == "AutoContrast":
        return F.autocontrast(clip)
    if name == "Equalize":
        return F.equalize(clip)
    if name == "Invert":
        return F.invert(clip)
    if name == "Rotate":
        return F.rotate(clip, rotate_degrees(level, op.sign), interpolation=InterpolationMode.BILINEAR, fill=_FILL)
    if name == "PosterizeIncreasing":
        return F.posterize(clip, posterize_bits(level))
    if name == "SolarizeIncreasing":
        threshold = solarize_threshold(level)
        return F.solarize(clip, threshold) if threshold < 256 else clip
    if name == "SolarizeAdd":
        added = (clip.to(torch.int16) + solarize_add(level)).clamp_(max=255).to(torch.uint8)
        return torch.where(clip < 128, added, clip)
    factor = enhance_factor(level, op.sign)
    if name == "ColorIncreasing":
        return F.adjust_saturation(clip, factor)
    if name == "ContrastIncreasing":
        return F.adjust_contrast(clip, factor)
    if name == "BrightnessIncreasing":
        return F.adjust_brightness(clip, factor)
    if name == "SharpnessIncreasing":
        return F.adjust_sharpness(clip, factor)
    if name in ("ShearX", "ShearY"):
        # timm's PIL matrix (1, f, 0, 0, 1, 0) shears about the top-left corner, not the centre
        degrees = shear_degrees(level, op.sign)
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return F.affine(clip, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear,
                        interpolation=InterpolationMode.BILINEAR, fill=_FILL, center=[0.0, 0.0])  # fmt: skip
    if name in ("TranslateXRel", "TranslateYRel"):
        # timm samples the input at x + pct * width (a sub-pixel shift, content moves left for pct > 0);
        # torchvision's translate moves content by +t, hence the minus sign
        height, width = clip.shape[-2:]
        pct = translate_fraction(level, op.sign)
        shift = [-pct * width, 0.0] if name == "TranslateXRel" else [0.0, -pct * height]
        return F.affine(clip, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                        interpolation=InterpolationMode.BILINEAR, fill=_FILL)  # fmt: skip
    raise ValueError(f"unknown RandAugment op {name!r}")


def erase(
    clip: torch.Tensor, x: int, y: int, w: int, h: int, seed: int, mean: list[float], std: list[float]
) -> torch.Tensor:
    """Fill the same box of every frame with per-pixel noise ~ N(mean, std) (in 0..255 units), which
    is N(0, 1) after normalisation, as timm's RandomErasing(mode="pixel") draws it."""
    out = clip.clone()
    out[:, :, y : y + h, x : x + w] = erase_patch(clip.shape[1], h, w, seed, mean, std)
    return out
