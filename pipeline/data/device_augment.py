"""A training view's resize, flip, RandAugment and random erasing on the training device: what
``augment.on_device`` moves out of the decoder actors.

The decoder actor still draws every parameter (``sampling.train_view``, from the generator seeded by
(seed, epoch, key, view)) and cuts each view's box out of the decoded frames; it sends the crop, at its
own size, with the view's flip and drawn ops and erase box (small numeric columns). Here the crops are
resized and flipped (``render_on_device``, with ``resize_view``, the function the actor's own path
uses) and the ops and boxes applied to the whole batch at once, grouped by op rather than looped per
view, with the arithmetic of the CPU path (``transforms.apply_rand_augment`` / ``transforms.erase``,
torchvision's uint8 kernels), so a view is the same whichever side renders it
(tests/data/test_device_augment.py, exact on the CPU).

    video = render_on_device(batch["video"], batch["flip"], crop, frames)   # uint8 (B, 3, T, crop, crop)
    params = DeviceAugmentParams(batch["rand_augment"], batch["erase"], aug.mean, aug.std)
    video = augment_on_device(video, params)                                  # same shape and device

The parameters stay on the host: grouping rows by op and building each row's matrix and factors is
host work on a few numbers, and reading them back from the device would stall it every batch. Only
pixels, per-row factors and matrices go to the device.

This module imports torch, torchvision and the standard library only, so that a bare CUDA machine can
run it (and the GPU check script can time it) without the data service's dependencies.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.functional import conv2d, grid_sample
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

# The op index sent in the ``rand_augment`` column: position in sampling.RAND_AUGMENT_OPS (the same
# tuple; a test keeps them equal, and this module must not import the data service's config).
OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
NO_OP = -1
FILL = 128.0  # timm's fill for geometric ops, every channel
KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)


# ---- the op arguments: timm's level -> argument mapping, shared with transforms.apply_rand_augment ----


def posterize_bits(level: float) -> int:
    return 4 - int(level * 4)


def solarize_threshold(level: float) -> int:
    """256 = nothing solarized."""
    return 256 - int(level * 256)


def solarize_add(level: float) -> int:
    return int(level * 110)


def enhance_factor(level: float, sign: float) -> float:
    """Color, Contrast, Brightness and Sharpness: 1 +- 0.9 x level."""
    return 1.0 + sign * level * 0.9


def rotate_degrees(level: float, sign: float) -> float:
    return sign * 30.0 * level


def shear_degrees(level: float, sign: float) -> float:
    """timm's shear factor 0.3 x level, as the angle torchvision's affine takes."""
    return math.degrees(math.atan(sign * 0.3 * level))


def translate_fraction(level: float, sign: float) -> float:
    return sign * 0.45 * level


def erase_patch(channels: int, h: int, w: int, seed: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (channels, h, w) noise ~ N(mean, std) in 0..255 units (N(0, 1) after normalisation, as timm's
    RandomErasing(mode="pixel") draws it), from a CPU generator seeded by the box: the same patch on any
    device and in the actor (a device generator draws a different sequence from the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((channels, h, w), generator=generator)
    mean_t = torch.tensor(mean).view(-1, 1, 1) * 255.0
    std_t = torch.tensor(std).view(-1, 1, 1) * 255.0
    return (noise * std_t + mean_t).round_().clamp_(0, 255).to(torch.uint8)


# ---- the parameters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceAugmentParams:
    """Per-view augmentation of a batch, as the decoder drew it.

    ``ops``: float64 (B, N, 3), per slot (op index in ``OPS`` or ``NO_OP``, magnitude 0..10, sign +-1),
    applied in slot order. ``erase``: int64 (B, 5), (x, y, w, h, seed) of the erased box in the crop's
    pixels, w = 0 for none. float64 keeps the magnitude the decoder drew bit for bit: the op arguments
    are computed from it as in the actor. ``mean`` / ``std`` are the normalisation's, for the noise.
    """

    ops: torch.Tensor
    erase: torch.Tensor
    mean: Sequence[float] = KINETICS_MEAN
    std: Sequence[float] = KINETICS_STD


def random_params(
    batch: int, crop: int, *, seed: int, magnitude: float = 7, num_ops: int = 4, mstd: float = 0.5,
    erase_prob: float = 0.25, device: torch.device | str | None = None,
    mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD,
) -> DeviceAugmentParams:
    """Parameters for ``batch`` views drawn with the distributions of ``sampling.train_view`` (timm's
    rand-mM-nN-mstd, RandomErasing's box), for benchmarks and checks that have no decoder: not the same
    draws as the decoder's (that takes its numpy generator per view), the same kind of work."""
    rng = random.Random(seed)
    ops = torch.zeros((batch, max(num_ops, 1), 3), dtype=torch.float64)
    ops[..., 0] = NO_OP
    erase = torch.zeros((batch, 5), dtype=torch.int64)
    for row in range(batch):
        slot = 0
        for _ in range(num_ops):
            index, keep = rng.randrange(len(OPS)), rng.random() < 0.5
            level = min(max(rng.gauss(magnitude, mstd), 0.0), 10.0)
            sign = 1.0 if rng.random() < 0.5 else -1.0
            if keep:
                ops[row, slot] = torch.tensor([index, level, sign], dtype=torch.float64)
                slot += 1
        if rng.random() < erase_prob:
            erase[row] = torch.tensor(_random_box(rng, crop))
    target = torch.device(device) if device is not None else torch.device("cpu")
    return DeviceAugmentParams(ops.to(target), erase.to(target), tuple(mean), tuple(std))


def _random_box(rng: random.Random, crop: int) -> tuple[int, int, int, int, int]:
    """RandomErasing's box (area 2%..1/3 of the crop, aspect 0.3..3.3); (0, 0, 0, 0, 0) after 10 misses."""
    for _ in range(10):
        area = crop * crop * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w < crop and 0 < h < crop:
            return rng.randint(0, crop - w), rng.randint(0, crop - h), w, h, rng.randrange(2**31)
    return 0, 0, 0, 0, 0


# ---- rendering the views: resize and flip ---------------------------------------------------------------


def resize_view(clip: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
    """(T, C, h, w) uint8 crop -> (T, C, size, size): antialiased bilinear resize (none when it already has
    that size), then the horizontal flip. The one definition of both steps, so that the decoder's CPU path
    (``transforms.render_view``) and the device path (``render_on_device``) give the same pixels."""
    if tuple(clip.shape[-2:]) != (size, size):
        clip = F.resize(clip, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return clip.flip(-1) if flip else clip


def render_on_device(crops: Sequence[torch.Tensor], flips: torch.Tensor | Sequence[bool], size: int, frames: int,
                     device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """The decoder actor's crops, as ``augment.on_device`` sends them (one uint8 (T, h, w, 3) tensor per view,
    each its own box's size, already on the device), resized to ``size`` and flipped where ``flips`` says:
    uint8 (B, 3, T, size, size), the layout ``augment_on_device`` and ``normalize`` take. One resize per view
    (the boxes differ in size); ``frames`` and ``device`` shape an empty batch."""
    flips = [bool(f) for f in (flips.tolist() if isinstance(flips, torch.Tensor) else flips)]
    if len(flips) != len(crops):
        raise ValueError(f"{len(crops)} crops but {len(flips)} flips")
    if not crops:
        return torch.empty((0, 3, frames, size, size), dtype=torch.uint8, device=device)
    views = [resize_view(crop.permute(0, 3, 1, 2), size, flip) for crop, flip in zip(crops, flips)]
    return torch.stack(views).permute(0, 2, 1, 3, 4).contiguous()


# ---- applying them ------------------------------------------------------------------------------------


def augment_on_device(video: torch.Tensor, params: DeviceAugmentParams) -> torch.Tensor:
    """uint8 (B, 3, T, H, W) on any device -> the same views with their RandAugment ops and erase boxes
    applied, uint8, same shape and device. Slot by slot, the rows that hold the same op are gathered and
    transformed together with their own magnitudes; then the erase boxes are filled."""
    if video.shape[0] == 0:
        return video
    frames = video.permute(0, 2, 1, 3, 4).contiguous()  # (B, T, C, H, W): torchvision's ops take (..., C, H, W)
    ops = params.ops.detach().to("cpu", torch.float64)
    for slot in range(ops.shape[1]):
        kinds = ops[:, slot, 0]
        for index in sorted(set(kinds.tolist()) - {NO_OP}):
            rows = (kinds == index).nonzero().flatten()
            levels = (ops[rows, slot, 1] / 10.0).tolist()  # the actor's op.magnitude / 10.0
            signs = ops[rows, slot, 2].tolist()
            on_device = rows.to(frames.device)
            group = frames.index_select(0, on_device)
            frames.index_copy_(0, on_device, _APPLY[OPS[int(index)]](group, levels, signs))
    _erase_rows(frames, params)
    return frames.permute(0, 2, 1, 3, 4).contiguous()


def _erase_rows(frames: torch.Tensor, params: DeviceAugmentParams) -> None:
    """Each box gets its noise patch in every frame. One small copy per erased view: the noise must be
    the CPU generator's (``erase_patch``), so it is drawn on the host, a few thousand values per box."""
    boxes = params.erase.detach().to("cpu")
    channels = frames.shape[2]
    for row in (boxes[:, 2] > 0).nonzero().flatten().tolist():
        x, y, w, h, seed = boxes[row].tolist()
        patch = erase_patch(channels, h, w, seed, params.mean, params.std).to(frames.device, non_blocking=True)
        frames[row, :, :, y : y + h, x : x + w] = patch


def _rows(values: Sequence[float], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One value per row of ``like``, shaped to broadcast over its other dimensions."""
    return torch.tensor(values, dtype=dtype).to(like.device).view((-1,) + (1,) * (like.dim() - 1))


# The colour ops. torchvision's kernels take one factor per call; these take one per row and do the same
# arithmetic. torchvision blends with ``a.add_(b, alpha=r)``, which torch computes as one fused multiply-add
# in float32 (its vectorised CPU loop does; CUDA compiles ``a + alpha * b`` to an FMA by default). The float64
# sum below is exact for these operands, so rounding it once to float32 gives the fused result bit for bit
# (the tests compare with torchvision on the CPU: exact).


def _fused_add(base: torch.Tensor, other: torch.Tensor, alpha: list[float]) -> torch.Tensor:
    """float32 ``base + alpha * other`` rounded once, as ``base.add_(other, alpha=alpha)`` per row."""
    alpha32 = _rows(alpha, base, torch.float32).double()
    return base.double().add_(other.double().mul_(alpha32)).float()


def _blend(group: torch.Tensor, other: torch.Tensor, ratios: list[float]) -> torch.Tensor:
    """torchvision's ``_blend(image, other, ratio)`` with a ratio per row: image x ratio + other x (1 - ratio)."""
    scaled = group.mul(_rows(ratios, group, torch.float32))
    return _fused_add(scaled, other, [1.0 - r for r in ratios]).clamp_(0, 255).to(torch.uint8)


def _color(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
    gray = F.rgb_to_grayscale(group).float()  # uint8 truncation = torchvision's floor of the grey
    return _blend(group, gray, [enhance_factor(lv, s) for lv, s in zip(levels, signs)])


def _contrast(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
    # each frame's mean grey: a sum of integers, exact in float32 below 2**24 (crops up to 256 px)
    mean = F.rgb_to_grayscale(group).float().mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(group, mean, [enhance_factor(lv, s) for lv, s in zip(levels, signs)])


def _brightness(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
    factors = [enhance_factor(lv, s) for lv, s in zip(levels, signs)]
    return group.mul(_rows(factors, group, torch.float32)).clamp_(0, 255).to(torch.uint8)


def _sharpness(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
    """torchvision's smoothing kernel (1s around a 5, / 13), rounded, blended into the interior pixels."""
    n, t, c, h, w = group.shape
    if h <= 2 or w <= 2:
        return group
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32, device=group.device)
    out = group.reshape(n * t, c, h, w).to(torch.float32, copy=True)
    blurred = conv2d(out, kernel.expand(c, 1, 3, 3), groups=c).round_()  # k/13 is never near .5: exact
    inner = out[..., 1:-1, 1:-1]
    alpha = [1.0 - enhance_factor(lv, s) for lv, s in zip(levels, signs) for _ in range(t)]
    inner.copy_(_fused_add(inner, blurred.sub_(inner), alpha))
    return out.clamp_(0, 255).to(torch.uint8).view(n, t, c, h, w)


def _posterize(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
    masks = [((1 << bits) - 1) << (8 - bits) for bits in map(posterize_bits, levels)]
    return group & _rows(masks, group, torch.uint8)


def _solarize(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
    thresholds = _rows([solarize_threshold(lv) for lv in levels], group, torch.int16)
    return torch.where(group >= thresholds, group.bitwise_not(), group)


def _solarize_add(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
    added = group.to(torch.int16).add_(_rows([solarize_add(lv) for lv in levels], group, torch.int16))
    return torch.where(group < 128, added.clamp_(max=255).to(torch.uint8), group)


# The geometric ops: one affine grid per row (torchvision's affine takes one matrix per call), sampled
# bilinearly with the fill blended in by a ones channel, as torchvision's tensor kernel does. Each row's
# matrix is computed in float64 with torchvision's formula and order of operations, so the float32
# grid, and the result, equal its own.


def _inverse_affine(angle: float, translate: tuple[float, float], shear: tuple[float, float],
                    centre: tuple[float, float]) -> list[float]:  # fmt: skip
    """Output pixel -> input pixel, in pixels from the image centre: the inverse of translate x
    (rotate about ``centre``, then shear), scale 1 (torchvision's ``affine``/``rotate`` matrix)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    m = [d, -b, 0.0, -c, a, 0.0]
    ox, oy = centre[0] + translate[0], centre[1] + translate[1]
    m[2] += centre[0] - m[0] * ox - m[1] * oy
    m[5] += centre[1] - m[3] * ox - m[4] * oy
    return m


def _warp(group: torch.Tensor, matrices: list[list[float]]) -> torch.Tensor:
    n, t, c, h, w = group.shape
    device = group.device
    theta = torch.tensor(matrices, dtype=torch.float32, device=device).view(n, 2, 3)
    base = torch.empty(1, h, w, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=device))
    grid = base.view(1, h * w, 3).expand(n, h * w, 3).bmm(scaled).view(n, h, w, 2)
    pixels = group.reshape(n * t, c, h, w).float()
    with_mask = torch.cat((pixels, torch.ones((n * t, 1, h, w), dtype=torch.float32, device=device)), dim=1)
    sampled = grid_sample(with_mask, grid.repeat_interleave(t, dim=0), mode="bilinear", padding_mode="zeros",
                          align_corners=False)  # fmt: skip
    pixels, mask = torch.tensor_split(sampled, indices=(-1,), dim=-3)
    fill = torch.full((1, c, 1, 1), FILL, dtype=torch.float32, device=device)
    out = pixels.sub_(fill).mul_(mask.expand_as(pixels)).add_(fill)  # pixels x mask + fill x (1 - mask)
    return out.round_().to(torch.uint8).view(n, t, c, h, w)


def _rotate(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
    """About the centre. An angle of 0 (mod 360) is torchvision's copy, not a resample: those rows stay."""
    angles = [rotate_degrees(lv, s) % 360 for lv, s in zip(levels, signs)]
    turn = [i for i, angle in enumerate(angles) if angle != 0]
    if not turn:
        return group
    out = group.clone()
    rows = torch.tensor(turn, device=group.device)
    matrices = [_inverse_affine(-angles[i], (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)) for i in turn]
    out[rows] = _warp(group[rows], matrices)
    return out


def _shear(axis: int) -> Callable[[torch.Tensor, list[float], list[float]], torch.Tensor]:
    def shear(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
        """About the top-left corner, as timm's PIL matrix (1, f, 0, 0, 1, 0)."""
        h, w = group.shape[-2:]
        corner = (0.0 - w * 0.5, 0.0 - h * 0.5)  # torchvision's centre argument [0, 0], from the image centre
        matrices = []
        for lv, s in zip(levels, signs):
            degrees = shear_degrees(lv, s)
            matrices.append(_inverse_affine(0.0, (0.0, 0.0), (degrees, 0.0) if axis == 0 else (0.0, degrees), corner))
        return _warp(group, matrices)

    return shear


def _translate(axis: int) -> Callable[[torch.Tensor, list[float], list[float]], torch.Tensor]:
    def translate(group: torch.Tensor, levels: list[float], signs: list[float]) -> torch.Tensor:
        """timm samples at x + fraction x size: content moves by minus that."""
        h, w = group.shape[-2:]
        matrices = []
        for lv, s in zip(levels, signs):
            fraction = translate_fraction(lv, s)
            shift = (-fraction * w, 0.0) if axis == 0 else (0.0, -fraction * h)
            matrices.append(_inverse_affine(0.0, shift, (0.0, 0.0), (0.0, 0.0)))
        return _warp(group, matrices)

    return translate


_APPLY: dict[str, Callable[[torch.Tensor, list[float], list[float]], torch.Tensor]] = {
    "AutoContrast": lambda group, levels, signs: F.autocontrast(group),
    "Equalize": lambda group, levels, signs: F.equalize(group),
    "Invert": lambda group, levels, signs: F.invert(group),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _color,
    "ContrastIncreasing": _contrast,
    "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness,
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "TranslateXRel": _translate(0),
    "TranslateYRel": _translate(1),
}
