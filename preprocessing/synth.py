"""Synthetic Kinetics, Something-Something v2 and ImageNet in their real on-disk layouts, with a learnable
class signal.

The point is that demos and tests run the exact code path real data takes (CSV parsing, file
discovery, H.264/VP8 decoding, JPEG/PNG/CMYK handling), and that a small model trained on the result
can beat chance, so a broken pipeline shows up as a failure to learn.

Class signal:
- video: class c = a shape (disk, square, triangle by c % 3) moving in direction 360*c/K degrees at a
  constant speed, wrapping around the frame. Start position, colours, size and background texture
  are random per video, so only shape and motion identify the class.
- ssv2: classes come in pairs of real SSv2 templates that a horizontal flip swaps ("Pushing [something]
  from left to right" / "... from right to left"); within a pair only the horizontal direction of the
  motion differs, so a model separates them with horizontal flip off and cannot with flip on. Shape,
  colour, size, speed, start position and background are random per video (see `SSV2_TEMPLATES`).
- image: class c = a shape (c % 3) filled with stripes at angle 180*c/K degrees, at a random place,
  scale and colour on a random textured background.
"""

from __future__ import annotations

import csv
import json
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


# ---- Something-Something v2 -----------------------------------------------------------------

# Real SSv2 templates, in pairs that a horizontal flip swaps. What moves, per kind: "push" the object
# with a hand behind it, "pull" the object with a hand ahead of it, "camera" the whole picture (the
# camera turning left makes the scene move right). `direction`: +1 = the picture moves left to right.
SSV2_TEMPLATES: tuple[tuple[str, str, int], ...] = (
    ("Pushing [something] from left to right", "push", 1),
    ("Pushing [something] from right to left", "push", -1),
    ("Pulling [something] from left to right", "pull", 1),
    ("Pulling [something] from right to left", "pull", -1),
    ("Turning the camera left while filming [something]", "camera", 1),
    ("Turning the camera right while filming [something]", "camera", -1),
)
_SSV2_OBJECTS = {
    "disk": ("ball", "coin", "lid", "plate", "bottle cap"),
    "square": ("box", "book", "coaster", "sticky note", "phone"),
    "triangle": ("sandwich", "guitar pick", "slice of cheese", "set square", "tortilla chip"),
}
_SSV2_COLOURS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (240, 220, 40),
    "orange": (245, 140, 30), "purple": (150, 60, 200), "pink": (245, 120, 190), "white": (245, 245, 245),
}  # fmt: skip
_SKIN_TONES = ((241, 194, 160), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172))
_SSV2_MAX_ID = 220_847  # ids of the real release run from 1 to 220847


@dataclass(frozen=True)
class SynthSsv2:
    """`classes` (2, 4 or 6): the first that many of `SSV2_TEMPLATES`, whole flip pairs; `test`: videos of
    the unlabelled test split (random classes); `missing` / `corrupt`: extra train records without a
    video / train videos that do not decode."""

    out: str
    classes: int = 2
    per_class: int = 6
    val_per_class: int = 2
    test: int = 2
    size: tuple[int, int] = (96, 64)  # width, height
    seconds: int = 2
    fps: int = 12
    missing: int = 0
    corrupt: int = 0
    seed: int = 0


def synth_ssv2(cfg: SynthSsv2) -> SynthReport:
    """The release layout (preprocessing/ssv2.py): OUT/20bn-something-something-v2/{id}.webm (VP9) and
    OUT/labels/something-something-v2-{labels,train,validation,test}.json. The labels file holds the
    chosen templates with indices 0..classes-1 (a labels file is always numbered from 0)."""
    from preprocessing.ssv2 import LABELS_FILE, SPLIT_FILES, VIDEO_FOLDER, class_name

    if cfg.classes not in (2, 4, 6):
        raise ValueError(f"classes must be 2, 4 or 6 (whole flip pairs of {len(SSV2_TEMPLATES)} templates), "
                         f"not {cfg.classes}")  # fmt: skip
    if cfg.corrupt > cfg.classes * cfg.per_class:
        raise ValueError(f"corrupt ({cfg.corrupt}) is more than the train videos ({cfg.classes * cfg.per_class})")
    rng = random.Random(cfg.seed)
    videos = os.path.join(cfg.out, VIDEO_FOLDER)
    labels = os.path.join(cfg.out, "labels")
    os.makedirs(videos, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    templates = [template for template, _, _ in SSV2_TEMPLATES[: cfg.classes]]
    counts = {"train": cfg.per_class * cfg.classes, "validation": cfg.val_per_class * cfg.classes, "test": cfg.test}
    ids = [str(i) for i in rng.sample(range(1, _SSV2_MAX_ID + 1), sum(counts.values()) + cfg.missing)]
    files, rows = 0, 0
    for split, count in counts.items():
        records = []
        for n in range(count):
            record_id, c = ids.pop(), n % cfg.classes
            seed = rng.randrange(2**31)
            placeholder = _write_ssv2_clip(os.path.join(videos, f"{record_id}.webm"), cfg, c, seed)
            files += 1
            if split == "test":
                records.append({"id": record_id})
                continue
            records.append(_ssv2_record(record_id, templates[c], [placeholder]))
        if split == "train":
            for record in rng.sample(records, cfg.corrupt):
                with open(os.path.join(videos, f"{record['id']}.webm"), "wb") as f:
                    f.write(bytes(rng.randrange(256) for _ in range(2048)))
            for n in range(cfg.missing):
                records.append(_ssv2_record(ids.pop(), templates[n % cfg.classes], ["a pen"]))
        rng.shuffle(records)
        with open(os.path.join(labels, SPLIT_FILES[split]), "w") as f:
            json.dump(records, f, indent=1)
        rows += len(records) if split != "test" else 0
    with open(os.path.join(labels, LABELS_FILE), "w") as f:
        json.dump({class_name(t): str(i) for i, t in enumerate(templates)}, f, indent=1)
    return SynthReport(cfg.out, files, rows)


def _ssv2_record(record_id: str, template: str, placeholders: list[str]) -> dict:
    """A record as the release writes it: `label` is the template with its placeholders filled in, lower case first."""
    label = template
    for placeholder in placeholders:
        label = label.replace("[something]", placeholder, 1)
    return {"id": record_id, "label": label[:1].lower() + label[1:], "template": template, "placeholders": placeholders}


def _write_ssv2_clip(path: str, cfg: SynthSsv2, c: int, seed: int) -> str:
    """One VP9 video of class `c` (`SSV2_TEMPLATES[c]`); returns the placeholder naming its object.

    Everything but the kind of motion and its horizontal direction is drawn at random: shape, colour,
    size, speed, start position (anywhere: the picture wraps around horizontally, so no frame tells where
    a motion started), height in the frame, background texture and the hand's skin tone."""
    _, kind, direction = SSV2_TEMPLATES[c]
    rng = np.random.default_rng(seed)
    w, h = cfg.size
    background = _background(rng, h, w)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour_name = list(_SSV2_COLOURS)[int(rng.integers(len(_SSV2_COLOURS)))]
    colour = np.clip(np.array(_SSV2_COLOURS[colour_name]) + rng.integers(-20, 21, size=3), 0, 255).astype(np.uint8)
    skin = np.array(_SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))], dtype=np.uint8)
    radius = min(h, w) * rng.uniform(0.12, 0.2)
    hand = radius * rng.uniform(0.7, 0.9)
    speed = w * rng.uniform(0.3, 0.5) / cfg.fps  # pixels per frame: under half the width a second
    x0, y = rng.uniform(0, w), rng.uniform(radius + 1, h - radius - 1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    obj = _SSV2_OBJECTS[shape][int(rng.integers(len(_SSV2_OBJECTS[shape])))]
    with av.open(path, "w", format="webm") as out:
        stream = out.add_stream("libvpx-vp9", rate=cfg.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 300_000
        stream.codec_context.thread_count = 1
        stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for t in range(cfg.seconds * cfg.fps):
            shift = direction * speed * t
            x = x0 + shift
            frame = np.roll(background, int(round(shift)), axis=1) if kind == "camera" else background.copy()
            if kind != "camera":  # a hand behind the object (pushing) or ahead of it (pulling)
                side = -direction if kind == "push" else direction
                hx = x + side * (radius + hand * 0.8)
                hdx = (xx - hx + w / 2) % w - w / 2
                frame[(hdx / hand) ** 2 + ((yy - y) / (hand * 0.7)) ** 2 <= 1] = skin
            dx = (xx - x + w / 2) % w - w / 2
            frame[_shape_mask(shape, dx, yy - y, radius)] = colour
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    return f"{colour_name} {obj}"


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

