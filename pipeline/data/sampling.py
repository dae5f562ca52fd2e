"""What to take from a sample: frame indices (temporal) and crop boxes and augmentation draws (spatial).

Everything here is a pure function of its inputs and a ``numpy.random.Generator``; the decoder
seeds one generator per view from (seed, epoch, sample key, view), so a view's frames, crop, flip,
RandAugment ops and erased box depend on nothing else (not on the actor, the batch or the order).

With ``augment.on_device`` the decoder only cuts each view's box out of the decoded frames and sends it
with the view's flip, RandAugment ops and erase box as fixed-width numbers (``augment_record``);
``device_augment`` resizes, flips and augments on the training device. They are drawn here either way,
in the same order.

Temporal sampling, ``sampling.mode``:

- "stride" (Kinetics): a clip is ``num_frames`` frames ``stride`` frames apart at ``target_fps``, i.e.
  ``stride * fps / target_fps`` source frames apart (rounded per frame), as PySlowFast's sampling rate
  is defined. Training starts it uniformly at random where it fits in the video; evaluation starts
  clip k of K at the centre of the k-th of K equal ranges of start times.
- "segment" (Something-Something): the whole video is cut into ``num_frames`` equal segments and the
  clip takes one frame from each, so it always spans the whole action, whatever the video's length
  (SSv2 classes are the action's beginning and end: a fixed-stride window of a long video can miss
  either). PySlowFast's ssv2 loader defines the segments (segment i covers frames round(s i) ..
  round(s (i + 1)), s = (frames - 1) / num_frames); training takes a uniformly random frame of each,
  evaluation the middle one, and clip k of K the frame at (k + 1/2) / K of each segment (K = 1 is
  the middle frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.data.config import AugmentConfig, SamplingConfig

# timm's RandAugment "increasing" op set (rand-mX-nY-mstd0.5-inc1), the one PySlowFast's MViT uses.
RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
_RAND_AUGMENT_PROB = 0.5  # timm applies each chosen op with probability 0.5


# ---- temporal --------------------------------------------------------------------------------


def clip_step(fps: float, sampling: SamplingConfig) -> float:
    """Source frames between two sampled frames."""
    if sampling.target_fps <= 0 or fps <= 0:
        return float(sampling.stride)
    return sampling.stride * fps / sampling.target_fps


def clip_span(num_frames: int, step: float) -> float:
    """Source frames a clip covers, first to last sampled frame inclusive."""
    return (num_frames - 1) * step + 1


def clip_indices(start: float, num_frames: int, step: float, video_frames: int, short_video: str) -> np.ndarray:
    """``num_frames`` indices ``step`` apart from ``start``, kept in the video by clamping (repeat
    the last frame) or looping (wrap to the first)."""
    raw = np.round(start + np.arange(num_frames) * step).astype(np.int64)
    if short_video == "loop":
        return np.mod(raw, video_frames)
    return np.clip(raw, 0, video_frames - 1)


def segment_bounds(video_frames: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last frame (both included) of each of ``num_frames`` equal segments of the video.
    Segments of a video shorter than ``num_frames`` overlap: frames repeat, as they do in PySlowFast."""
    size = (video_frames - 1) / num_frames
    edges = np.round(size * np.arange(num_frames + 1)).astype(np.int64)
    return edges[:-1], edges[1:]


def train_clip(rng: np.random.Generator, video_frames: int, fps: float, sampling: SamplingConfig) -> np.ndarray:
    if sampling.mode == "segment":
        first, last = segment_bounds(video_frames, sampling.num_frames)
        return rng.integers(first, last + 1)
    step = clip_step(fps, sampling)
    delta = max(video_frames - clip_span(sampling.num_frames, step), 0.0)
    return clip_indices(rng.uniform(0.0, delta), sampling.num_frames, step, video_frames, sampling.short_video)


def eval_clips(video_frames: int, fps: float, sampling: SamplingConfig) -> list[np.ndarray]:
    k = sampling.eval_clips
    if sampling.mode == "segment":
        first, last = segment_bounds(video_frames, sampling.num_frames)
        return [first + (last - first) * (2 * i + 1) // (2 * k) for i in range(k)]
    step = clip_step(fps, sampling)
    delta = max(video_frames - clip_span(sampling.num_frames, step), 0.0)
    return [
        clip_indices(delta * (i + 0.5) / k, sampling.num_frames, step, video_frames, sampling.short_video)
        for i in range(k)
    ]


# ---- spatial ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A crop in the coordinates of the native (stored) frame: left, top, width, height."""

    x: float
    y: float
    w: float
    h: float

    def scaled(self, fx: float, fy: float) -> tuple[int, int, int, int]:
        """Integer box in a frame resized by (fx, fy), at least one pixel."""
        x, y = int(round(self.x * fx)), int(round(self.y * fy))
        return x, y, max(1, int(round(self.w * fx))), max(1, int(round(self.h * fy)))


@dataclass(frozen=True)
class RandAugmentOp:
    name: str
    magnitude: float  # 0..10
    sign: int  # +1 / -1 for signed ops


@dataclass(frozen=True)
class Erase:
    """Box relative to the output crop (pixels) and the seed of its noise."""

    x: int
    y: int
    w: int
    h: int
    seed: int


@dataclass(frozen=True)
class ViewSpec:
    box: Box
    scale: float  # frame scale this view wants the decoder to deliver (>= what the box needs)
    flip: bool = False
    ops: tuple[RandAugmentOp, ...] = ()
    erase: Erase | None = None


def short_side_scale(width: int, height: int, short_side: float) -> float:
    return short_side / min(width, height)


def train_view(rng: np.random.Generator, width: int, height: int, aug: AugmentConfig) -> ViewSpec:
    """One training view of a ``width`` x ``height`` frame. Draw order is fixed: box, flip, ops, erase."""
    crop = aug.crop_size
    if aug.mode == "jitter":
        scale = short_side_scale(width, height, jitter_short_side(rng, aug))
        side = crop / scale
        box = Box(rng.uniform(0, max(width - side, 0)), rng.uniform(0, max(height - side, 0)), side, side)
    else:
        box = random_resized_box(rng, width, height, aug.rrc_scale, aug.rrc_ratio)
        scale = min(1.0, crop / min(box.w, box.h))  # decode at most at native size; upscale the crop after
    flip = bool(aug.flip and rng.random() < 0.5)
    ops = rand_augment_ops(rng, aug) if aug.rand_augment else ()
    erase = erase_box(rng, crop, aug.random_erasing) if aug.random_erasing > 0 else None
    return ViewSpec(box, scale, flip, ops, erase)


def jitter_short_side(rng: np.random.Generator, aug: AugmentConfig) -> int:
    """The short side a "jitter" view is resized to: uniform in ``jitter_scales``, or with
    ``jitter_inverse_uniform`` its reciprocal uniform (PySlowFast's ``INV_UNIFORM_SAMPLE``, which its
    SSv2 recipes use: sizes near the low end, where the object fills more of the crop, come more often)."""
    low, high = aug.jitter_scales
    if aug.jitter_inverse_uniform:
        return int(round(1.0 / rng.uniform(1.0 / high, 1.0 / low)))
    return int(rng.integers(low, high + 1))


def random_resized_box(
    rng: np.random.Generator, width: int, height: int, scale: list[float], ratio: list[float]
) -> Box:
    """torchvision's RandomResizedCrop box: 10 tries at area x aspect, else the centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            return Box(rng.uniform(0, width - w), rng.uniform(0, height - h), w, h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    return Box((width - w) / 2, (height - h) / 2, w, h)


def rand_augment_ops(rng: np.random.Generator, aug: AugmentConfig) -> tuple[RandAugmentOp, ...]:
    """``n`` ops drawn with replacement, each kept with probability 0.5, magnitude ~ N(m, mstd) in [0, 10]."""
    ops = []
    for _ in range(aug.rand_augment_ops):
        name = RAND_AUGMENT_OPS[int(rng.integers(len(RAND_AUGMENT_OPS)))]
        keep = rng.random() < _RAND_AUGMENT_PROB
        magnitude = float(np.clip(rng.normal(aug.rand_augment_magnitude, aug.rand_augment_mstd), 0, 10))
        sign = 1 if rng.random() < 0.5 else -1
        if keep:
            ops.append(RandAugmentOp(name, magnitude, sign))
    return tuple(ops)


def erase_box(rng: np.random.Generator, crop: int, probability: float) -> Erase | None:
    """timm's RandomErasing box (area 2%..1/3, aspect 0.3..3.3) on a ``crop`` x ``crop`` view."""
    if rng.random() >= probability:
        return None
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target = crop * crop * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w < crop and 0 < h < crop:
            return Erase(int(rng.integers(0, crop - w + 1)), int(rng.integers(0, crop - h + 1)), w, h,
                         int(rng.integers(2**31)))  # fmt: skip
    return None


# ---- a view's augmentation as numbers (augment.on_device) -------------------------------------


def augment_slots(aug: AugmentConfig) -> int:
    """RandAugment op slots per view (at least one, so the column keeps a shape when RandAugment is off)."""
    return max(aug.rand_augment_ops if aug.rand_augment else 0, 1)


def augment_dtype(slots: int) -> np.dtype:
    """One view's record: per slot (op index in RAND_AUGMENT_OPS or -1, magnitude, sign), the erase box
    (x, y, w, h, seed; w = 0: none) and the crop it goes with (height, width, flip: the box cut from the
    decoded frames, which the device resizes and flips). Little-endian and fixed-width: it crosses from
    the decode child to the actor as raw bytes. float64 keeps the drawn magnitude exactly."""
    return np.dtype([("ops", "<f8", (slots, 3)), ("erase", "<i8", (5,)), ("crop", "<i8", (3,))])


def augment_record(spec: ViewSpec, slots: int, height: int, width: int) -> np.ndarray:
    """``spec``'s drawn ops, erase box and flip, with the size of the crop cut for it."""
    record = np.zeros((), augment_dtype(slots))
    record["ops"][:, 0] = -1
    for slot, op in enumerate(spec.ops):
        record["ops"][slot] = (RAND_AUGMENT_OPS.index(op.name), op.magnitude, op.sign)
    if spec.erase is not None:
        e = spec.erase
        record["erase"] = (e.x, e.y, e.w, e.h, e.seed)
    record["crop"] = (height, width, int(spec.flip))
    return record


MAX_CROP_SIDE = 2**15  # a crop's side in a record: far above any decoded frame (and products stay in int64)


def augment_problem(records: np.ndarray, crop: int) -> str | None:
    """Why these records cannot be what ``train_view`` drew (None if they can). The actor checks what a
    decode child sends: a child that hostile media took over may send anything, and these numbers
    index an op table, size the crops and address pixels on the training device."""
    ops, erase = records["ops"], records["erase"]
    index, magnitude, sign = ops[..., 0], ops[..., 1], ops[..., 2]
    used = index >= 0
    if not np.isin(index, np.arange(-1, len(RAND_AUGMENT_OPS))).all():
        return "an op index outside the op table"
    if not (np.isfinite(magnitude[used]).all() and (magnitude[used] >= 0).all() and (magnitude[used] <= 10).all()):
        return "a magnitude outside [0, 10]"
    if not np.isin(sign[used], (-1, 1)).all():
        return "a sign other than +-1"
    x, y, w, h, seed = erase.T
    boxed = w > 0
    small = (x >= 0) & (y >= 0) & (h > 0) & (x <= crop) & (y <= crop) & (w <= crop) & (h <= crop)  # no overflow below
    inside = small & (x + w <= crop) & (y + h <= crop) & (seed >= 0) & (seed < 2**31)
    if not (inside | ~boxed).all() or (erase[~boxed] != 0).any():
        return "an erase box outside the crop"
    height, width, flip = records["crop"].T
    if not ((height >= 1) & (height <= MAX_CROP_SIDE) & (width >= 1) & (width <= MAX_CROP_SIDE)).all():
        return f"a crop size outside 1..{MAX_CROP_SIDE}"
    if not np.isin(flip, (0, 1)).all():
        return "a flip other than 0 or 1"
    return None


def eval_views(width: int, height: int, aug: AugmentConfig, crops: int) -> list[ViewSpec]:
    """Short side resized to ``eval_short_side``; ``crops`` = 1 centre or 3 along the long side."""
    scale = short_side_scale(width, height, aug.eval_short_side)
    side = aug.crop_size / scale
    views = []
    for c in range(crops):
        frac = 0.5 if crops == 1 else c / (crops - 1)
        x = (width - side) * frac if width >= height else (width - side) / 2
        y = (height - side) * frac if height > width else (height - side) / 2
        views.append(ViewSpec(Box(x, y, side, side), scale))
    return views
