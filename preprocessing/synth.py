"""Synthetic Kinetics and ImageNet in their real on-disk layouts, with a learnable class signal.

The point is that demos and tests run the exact code path real data takes (CSV parsing, file
discovery, H.264/VP8 decoding, JPEG/PNG/CMYK handling), and that a small model trained on the result
can beat chance, so a broken pipeline shows up as a failure to learn.

Class signal:
- video: class c = a shape (disk, square, triangle by c % 3) moving in direction 360*c/K degrees at a
  constant speed, wrapping around the frame. Start position, colours, size and background texture
  are random per video, so only shape and motion identify the class.
- image: class c = a shape (c % 3) filled with stripes at angle 180*c/K degrees, at a random place,
  scale and colour on a random textured background.
"""

from __future__ import annotations

import csv
import math
import os
import random
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

SHAPES = ("disk", "square", "triangle")
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_CONTAINERS = {"mp4": ("mp4", "libx264"), "mkv": ("matroska", "libx264"), "webm": ("webm", "libvpx")}


@dataclass(frozen=True)
class SynthReport:
    """`labelled_rows`: annotation CSV rows (Kinetics) or validation labels (ImageNet) written."""

    root: str
    files: int
    labelled_rows: int


# ---- shared drawing --------------------------------------------------------------------------


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of `shape` centred at (0, 0), given per-pixel offsets dx, dy."""
    if shape == "disk":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= radius * 0.85
    return (dy >= -radius) & (dy <= radius * 0.6) & (abs(dx) <= (dy + radius) * 0.62)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-contrast smooth random texture, so the background carries no class information."""
    coarse = rng.integers(40, 140, size=(height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    colour = rng.integers(0, 256, size=3)
    colour[rng.integers(0, 3)] = 255
    return colour.astype(np.uint8)


# ---- Kinetics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthKinetics:
    """`layout`: "flat" ({split}/{clip}.mp4) or "per-class" ({split}/{label}/{clip}.mp4).
    `full_videos`: write uncut `{youtube_id}.mp4` files with the action inside a longer video.
    `containers`: cycled over the clips (mp4 and mkv hold H.264, webm holds VP8).
    `missing`/`corrupt`: extra train CSV rows without a file / train files that do not decode."""

    out: str
    classes: int = 3
    per_class: int = 3
    val_per_class: int = 1
    seconds: int = 2
    fps: int = 25
    width: int = 128
    height: int = 96
    layout: str = "flat"
    full_videos: bool = False
    containers: tuple[str, ...] = ("mp4",)
    missing: int = 0
    corrupt: int = 0
    seed: int = 0

    def label(self, c: int) -> str:
        return f"{SHAPES[c % 3]} heading {360 * c / self.classes:05.1f} degrees"


def synth_kinetics(cfg: SynthKinetics) -> SynthReport:
    if cfg.layout not in ("flat", "per-class"):
        raise ValueError(f"layout must be 'flat' or 'per-class', not {cfg.layout!r}")
    unknown = set(cfg.containers) - set(_CONTAINERS)
    if unknown:
        raise ValueError(f"unknown container(s) {sorted(unknown)}; choose from {sorted(_CONTAINERS)}")
    rng = random.Random(cfg.seed)
    ids = _youtube_ids(rng, cfg.classes * (cfg.per_class + cfg.val_per_class) + cfg.missing)
    os.makedirs(os.path.join(cfg.out, "annotations"), exist_ok=True)
    files, rows = 0, 0
    clip_number = 0
    for split, csv_name, count in (("train", "train.csv", cfg.per_class), ("val", "validate.csv", cfg.val_per_class)):
        table = []
        for c in range(cfg.classes):
            for _ in range(count):
                youtube_id = ids.pop()
                start = 1 + rng.randrange(3) if cfg.full_videos else rng.randrange(300)
                table.append([cfg.label(c), youtube_id, start, start + cfg.seconds, split, 0])
                container = cfg.containers[clip_number % len(cfg.containers)]
                name = f"{youtube_id}.{container}" if cfg.full_videos else f"{youtube_id}_{start:06d}_{start + cfg.seconds:06d}.{container}"
                folder = os.path.join(cfg.out, split, cfg.label(c) if cfg.layout == "per-class" else "")
                os.makedirs(folder, exist_ok=True)
                lead = start if cfg.full_videos else 0
                _write_clip(os.path.join(folder, name), cfg, c, rng.randrange(2**31), container, lead)
                clip_number += 1
                files += 1
        if split == "train":
            for c in range(cfg.missing):
                table.append([cfg.label(c % cfg.classes), ids.pop(), 10, 10 + cfg.seconds, split, 0])
            _corrupt_files(os.path.join(cfg.out, split), cfg.corrupt, rng)
        rng.shuffle(table)
        _write_csv(os.path.join(cfg.out, "annotations", csv_name), ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"], table)
        rows += len(table)
    return SynthReport(cfg.out, files, rows)


def _youtube_ids(rng: random.Random, count: int) -> list[str]:
    ids: set[str] = set()
    while len(ids) < count:
        ids.add("".join(rng.choice(_ID_ALPHABET) for _ in range(11)))
    return sorted(ids, reverse=True)


def _write_clip(path: str, cfg: SynthKinetics, c: int, seed: int, container: str, lead: int) -> None:
    """`lead` > 0: an uncut video whose action spans [lead, lead + seconds), still object around it."""
    rng = np.random.default_rng(seed)
    h, w = cfg.height, cfg.width
    background = _background(rng, h, w)
    colour = _bright_colour(rng)
    radius = min(h, w) * rng.uniform(0.12, 0.18)
    angle = 2 * math.pi * c / cfg.classes
    speed = 0.5 * min(h, w)  # pixels per second
    velocity = np.array([math.cos(angle), -math.sin(angle)]) * speed / cfg.fps
    position = rng.uniform(0, 1, size=2) * [w, h]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    total = (lead * 2 + cfg.seconds if lead else cfg.seconds) * cfg.fps
    fmt, codec = _CONTAINERS[container]
    with av.open(path, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=cfg.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18"}
        else:
            stream.bit_rate = 400_000
        for t in range(total):
            moving = lead * cfg.fps <= t < (lead + cfg.seconds) * cfg.fps
            if moving:
                position = position + velocity
            dx = (xx - position[0] + w / 2) % w - w / 2
            dy = (yy - position[1] + h / 2) % h - h / 2
            frame = background.copy()
            frame[_shape_mask(SHAPES[c % 3], dx, dy, radius)] = colour
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))


def _corrupt_files(folder: str, count: int, rng: random.Random) -> None:
    """Replace `count` videos with bytes no demuxer accepts (what a failed download looks like)."""
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    for path in paths[:count]:
        with open(path, "wb") as f:
            f.write(bytes(rng.randrange(256) for _ in range(2048)))


def _write_csv(path: str, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ---- ImageNet --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthImageNet:
    """`quirks`: like real ImageNet, one CMYK JPEG, one grayscale JPEG and one PNG named .JPEG in
    the first class of train. `corrupt`: extra truncated train JPEGs that do not decode.
    `val_layout`: "flat" (labels in LOC_val_solution.csv and the devkit) or "class-folders"."""

    out: str
    classes: int = 3
    per_class: int = 4
    val_per_class: int = 2
    size: int = 96
    quirks: bool = True
    corrupt: int = 0
    val_layout: str = "flat"
    seed: int = 0


def synth_imagenet(cfg: SynthImageNet) -> SynthReport:
    if cfg.val_layout not in ("flat", "class-folders"):
        raise ValueError(f"val_layout must be 'flat' or 'class-folders', not {cfg.val_layout!r}")
    rng = random.Random(cfg.seed)
    unique: set[str] = set()
    while len(unique) < cfg.classes:
        unique.add(f"n{rng.randrange(10**8):08d}")
    wnids = sorted(unique)
    rng.shuffle(wnids)  # class creation order != sorted order, on purpose
    names = [f"{SHAPES[c % 3]} with {180 * c / cfg.classes:.1f} degree stripes, synthetic {SHAPES[c % 3]}" for c in range(cfg.classes)]
    files = 0
    for c, wnid in enumerate(wnids):
        folder = os.path.join(cfg.out, "train", wnid)
        os.makedirs(folder, exist_ok=True)
        for i in range(cfg.per_class):
            quirk = ("cmyk", "gray", "png")[i] if cfg.quirks and c == 0 and i < 3 else None
            _write_image(os.path.join(folder, f"{wnid}_{i}.JPEG"), cfg, c, rng.randrange(2**31), quirk)
            files += 1
    for j in range(cfg.corrupt):
        wnid = wnids[j % cfg.classes]
        path = os.path.join(cfg.out, "train", wnid, f"{wnid}_{cfg.per_class + j}.JPEG")
        _write_image(path, cfg, j % cfg.classes, rng.randrange(2**31), None)
        _truncate(path, keep=0.5)
        files += 1
    val = [c for c in range(cfg.classes) for _ in range(cfg.val_per_class)]
    rng.shuffle(val)
    solution = []
    for n, c in enumerate(val, start=1):
        image_id = f"ILSVRC2012_val_{n:08d}"
        folder = os.path.join(cfg.out, "val", wnids[c] if cfg.val_layout == "class-folders" else "")
        os.makedirs(folder, exist_ok=True)
        box = _write_image(os.path.join(folder, f"{image_id}.JPEG"), cfg, c, rng.randrange(2**31), None)
        solution.append([image_id, " ".join([wnids[c], *map(str, box)])])
        files += 1
    _write_csv(os.path.join(cfg.out, "LOC_val_solution.csv"), ["ImageId", "PredictionString"], solution)
    by_wnid = sorted(zip(wnids, names))
    with open(os.path.join(cfg.out, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{wnid} {name}\n" for wnid, name in by_wnid)
    _write_devkit(os.path.join(cfg.out, "ILSVRC2012_devkit_t12", "data"), wnids, names, val, rng)
    return SynthReport(cfg.out, files, len(solution))


def _write_image(path: str, cfg: SynthImageNet, c: int, seed: int, quirk: str | None) -> list[int]:
    """Draw one image of class `c`; returns its object box [x0, y0, x1, y1] like LOC boxes."""
    rng = np.random.default_rng(seed)
    w = int(cfg.size * rng.uniform(0.8, 1.3))
    h = int(cfg.size * rng.uniform(0.8, 1.3))
    pixels = _background(rng, h, w)
    radius = min(h, w) * rng.uniform(0.25, 0.4)
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = _shape_mask(SHAPES[c % 3], xx - cx, yy - cy, radius)
    angle = math.pi * c / cfg.classes
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / max(4.0, radius / 2.5)) > 0
    pixels[mask & stripes] = _bright_colour(rng)
    pixels[mask & ~stripes] = 20
    image = Image.fromarray(pixels)
    if quirk == "cmyk":
        image.convert("CMYK").save(path, format="JPEG", quality=92)
    elif quirk == "gray":
        image.convert("L").save(path, format="JPEG", quality=92)
    elif quirk == "png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=92)
    return [int(cx - radius), int(cy - radius), int(cx + radius), int(cy + radius)]


def _truncate(path: str, keep: float) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _write_devkit(folder: str, wnids: list[str], names: list[str], val: list[int], rng: random.Random) -> None:
    """data/meta.mat (ILSVRC2012_IDs in a shuffled order, plus one non-leaf synset, as in the real
    devkit) and data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per val image)."""
    import scipy.io

    os.makedirs(folder, exist_ok=True)
    ids = list(range(1, len(wnids) + 1))
    rng.shuffle(ids)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    synsets = np.zeros((len(wnids) + 1, 1), dtype=[(name, "O") for name in fields])
    for row, (synset_id, wnid, name) in enumerate(zip(ids, wnids, names)):
        synsets[row, 0] = (synset_id, wnid, name, "synthetic class", 0, np.zeros((1, 0)), 0, 0)
    synsets[len(wnids), 0] = (len(wnids) + 1, "n99999999", "synthetic parent", "a non-leaf synset", len(wnids), np.array(ids), 1, 0)
    scipy.io.savemat(os.path.join(folder, "meta.mat"), {"synsets": synsets})
    with open(os.path.join(folder, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        f.writelines(f"{ids[c]}\n" for c in val)

