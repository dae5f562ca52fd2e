"""RandAugment and random erasing on the training device (``augment.on_device``) against the decoder's CPU
path: every op, at several magnitudes and both signs, on the same views and parameters; then whole views
decoded with the option off and on (+ ``augment_on_device``) for the same (seed, epoch, key, view).

Every comparison here is exact: the device path repeats the CPU path's arithmetic (torchvision's uint8
kernels: its float32 rounding, its fused blends, its affine matrices and grids) and draws the erase noise
from the same seeded CPU generator, and these tests run both on the CPU. On a GPU the kernels differ
(grid_sample, convolution), which the GPU check measures there.
"""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import decoder_batch, decoder_row, small_config
from PIL import Image

from core.errors import ConfigError
from pipeline.data.config import AugmentConfig
from pipeline.data.decode import Decoder, split_crops
from pipeline.data.device_augment import (
    NO_OP,
    OPS,
    DeviceAugmentParams,
    augment_on_device,
    random_params,
    render_on_device,
)
from pipeline.data.plan import FAILED, OK
from pipeline.data.sampling import RAND_AUGMENT_OPS, RandAugmentOp, augment_dtype, augment_slots
from pipeline.data.transforms import apply_rand_augment, erase

CROP, FRAMES = 40, 3
MAGNITUDES = (0.0, 2.5, 5.0, 7.0, 8.3, 10.0)  # 0 and 10 are the ends of the range; 7 is the recipe's m7


def _clip(row: int) -> torch.Tensor:
    """(T, 3, CROP, CROP) uint8, a different picture per row: smooth shading, a disc, a fine texture and a
    skewed histogram (so AutoContrast, Equalize and Sharpness have something to do), moving a pixel per
    frame; every third row is uniform noise instead (every level and edge at once)."""
    if row % 3 == 2:
        return torch.randint(0, 256, (FRAMES, 3, CROP, CROP), dtype=torch.uint8, generator=torch.Generator().manual_seed(row))
    frames = []
    for t in range(FRAMES):
        y, x = np.mgrid[0:CROP, 0:CROP].astype(np.float64)
        x = x + t + row
        image = np.stack([60 + 110 * (x % CROP) / CROP + 15 * np.sin(y / 4), 50 + 100 * (y / CROP) ** 2,
                          160 - 70 * (x + y) / (2 * CROP) + 12 * np.sin(1.3 * x) * np.cos(0.9 * y)], axis=0)  # fmt: skip
        image[:, (x % CROP - 14) ** 2 + (y - 20) ** 2 < 81] = np.array([200, 70, 50])[:, None]
        frames.append(np.clip(np.round(image), 25, 230))
    return torch.from_numpy(np.stack(frames).astype(np.uint8))


def _batch(rows: int) -> torch.Tensor:
    """uint8 (rows, 3, T, CROP, CROP): the layout the loader delivers."""
    return torch.stack([_clip(r) for r in range(rows)]).permute(0, 2, 1, 3, 4).contiguous()


def _params(ops: list[list[tuple[int, float, int]]], boxes: list[tuple[int, ...]] | None = None) -> DeviceAugmentParams:
    slots = max(1, max(len(o) for o in ops))
    table = torch.zeros((len(ops), slots, 3), dtype=torch.float64)
    table[..., 0] = NO_OP
    for row, row_ops in enumerate(ops):
        for slot, op in enumerate(row_ops):
            table[row, slot] = torch.tensor(op, dtype=torch.float64)
    erase_t = torch.tensor(boxes if boxes else [(0,) * 5] * len(ops), dtype=torch.int64)
    return DeviceAugmentParams(table, erase_t)


def _cpu_view(view: torch.Tensor, params: DeviceAugmentParams, row: int, channels_last: bool) -> torch.Tensor:
    """The decoder's path for one view (3, T, H, W): ``apply_rand_augment`` per op, then ``erase``. With
    ``channels_last`` the clip has the strides render_view hands on when no resize was needed."""
    clip = view.permute(1, 0, 2, 3)
    if channels_last:
        clip = clip.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    for index, magnitude, sign in params.ops[row].tolist():
        if index != NO_OP:
            clip = apply_rand_augment(clip, RandAugmentOp(OPS[int(index)], magnitude, int(sign)))
    x, y, w, h, seed = params.erase[row].tolist()
    if w:
        clip = erase(clip, x, y, w, h, seed, params.mean, params.std)
    return clip.permute(1, 0, 2, 3)


def _assert_same_as_cpu(video: torch.Tensor, params: DeviceAugmentParams) -> torch.Tensor:
    out = augment_on_device(video, params)
    assert out.shape == video.shape and out.dtype == torch.uint8
    for row in range(video.shape[0]):
        for channels_last in (False, True):
            expected = _cpu_view(video[row], params, row, channels_last)
            diff = (out[row].int() - expected.int()).abs()
            assert diff.max() == 0, (f"row {row} {params.ops[row].tolist()} {params.erase[row].tolist()}: "
                                     f"{int((diff > 0).sum())} values differ, by up to {int(diff.max())}")  # fmt: skip
    return out


def test_the_op_table_is_the_samplers() -> None:
    assert OPS == RAND_AUGMENT_OPS  # the op index in the column means the same op on both sides


@pytest.mark.parametrize("name", OPS)
def test_each_op_equals_the_cpu_path_at_every_magnitude_and_sign(name: str) -> None:
    cases = [(m, s) for m in MAGNITUDES for s in (1, -1)]
    video = _batch(len(cases))
    params = _params([[(OPS.index(name), m, s)] for m, s in cases])
    out = _assert_same_as_cpu(video, params)
    strong = [i for i, (m, _) in enumerate(cases) if m >= 7]
    assert not torch.equal(out[strong], video[strong]), f"{name} left every view unchanged at m >= 7"


def test_mixed_batches_apply_each_views_ops_in_order_then_its_box() -> None:
    video = _batch(16)
    params = random_params(16, CROP, seed=5, magnitude=7, num_ops=4, erase_prob=0.5)
    used = params.ops[..., 0]
    assert (used != NO_OP).sum(1).max() >= 2 and (params.erase[:, 2] > 0).any() and (params.erase[:, 2] == 0).any()
    _assert_same_as_cpu(video, params)
    # the same op in two slots of one view, and one view whose only op sits in slot 0 beside empty ones
    twice = _params([[(OPS.index("Rotate"), 6.0, 1), (OPS.index("Rotate"), 6.0, 1)], [(OPS.index("Invert"), 0.0, 1)]])
    _assert_same_as_cpu(video[:2], twice)


def test_erase_boxes_equal_the_cpu_noise_and_none_leaves_the_view() -> None:
    video = _batch(4)
    boxes = [(0, 0, 7, 33, 11), (0, 0, 0, 0, 0), (CROP - 5, CROP - 9, 5, 9, 2**31 - 1), (3, 4, 20, 1, 0)]
    params = _params([[] for _ in boxes], boxes)
    out = _assert_same_as_cpu(video, params)
    assert torch.equal(out[1], video[1])
    assert not torch.equal(out[0, :, :, :33, :7], video[0, :, :, :33, :7])
    assert torch.equal(out[0, :, 0, :33, :7], out[0, :, 2, :33, :7])  # the same noise in every frame


def test_same_params_same_views_and_the_input_is_left_alone() -> None:
    video = _batch(6)
    before = video.clone()
    params = random_params(6, CROP, seed=9, erase_prob=0.5)
    first, again = augment_on_device(video, params), augment_on_device(video, params)
    assert torch.equal(first, again) and torch.equal(video, before)
    assert not torch.equal(first, augment_on_device(video, random_params(6, CROP, seed=10, erase_prob=0.5)))
    assert augment_on_device(video[:0], random_params(0, CROP, seed=9)).shape == (0, 3, FRAMES, CROP, CROP)


def test_random_params_follow_the_recipe() -> None:
    params = random_params(400, 224, seed=1, magnitude=7, num_ops=4, mstd=0.5, erase_prob=0.25)
    index, magnitude, sign = params.ops.unbind(-1)
    used = index != NO_OP
    assert params.ops.shape == (400, 4, 3) and params.erase.shape == (400, 5)
    assert 1.6 < used.sum(1).float().mean() < 2.4  # 4 draws, each kept with probability 0.5
    assert set(index[used].long().tolist()) == set(range(len(OPS)))
    assert 6.8 < magnitude[used].mean() < 7.2 and set(sign[used].tolist()) == {-1.0, 1.0}
    erased = params.erase[:, 2] > 0
    assert 0.18 < erased.float().mean() < 0.32
    x, y, w, h, _ = params.erase[erased].T
    assert ((x + w <= 224) & (y + h <= 224)).all() and (w * h >= 0.02 * 224 * 224 * 0.9).all()


# ---- whole views: the decoder with the option off, and on + augment_on_device -------------------


def _shard_rows(root: Path, count: int) -> list[dict]:
    with tarfile.open(root / "train-000000.tar") as tar:
        names = tar.getnames()
        keys = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))[:count]
        return [decoder_row(k, tar.extractfile(f"{k}.mp4").read(), {}) for k in keys]


def _strong_recipe(cfg, mode: str):
    """The recipe with every switch on and turned up, so that a handful of views meets every kind of op."""
    cfg.augment.mode = mode
    cfg.augment.repeated_aug = 4
    cfg.augment.rand_augment_magnitude = 9
    cfg.augment.random_erasing = 0.6
    cfg.decoder.isolate = False
    return cfg


def _device_views(out: dict, aug: AugmentConfig, frames: int) -> torch.Tensor:
    """What the training step makes of the decoder's rows: the crops resized and flipped, then augmented."""
    video = render_on_device([torch.from_numpy(crop.copy()) for crop in out["video"]], torch.from_numpy(out["flip"]),
                             aug.crop_size, frames)  # fmt: skip
    params = DeviceAugmentParams(torch.from_numpy(out["rand_augment"]), torch.from_numpy(out["erase"]), aug.mean, aug.std)
    return augment_on_device(video, params)


@pytest.mark.parametrize(("mode", "isolate"), [("rrc", False), ("jitter", False), ("rrc", True)])
def test_decoded_views_are_the_same_whichever_side_augments(kinetics_shards: Path, mode: str, isolate: bool) -> None:
    """``jitter`` crops without a resize (the actor's clip keeps its channels-last strides); ``isolate``
    sends the parameters from the decode child to the actor as bytes behind the pixels."""
    rows = _shard_rows(kinetics_shards, 3)
    batches = [decoder_batch(rows), decoder_batch([{**r, "epoch": 3} for r in rows])]
    in_actor = Decoder(_strong_recipe(small_config(str(kinetics_shards)), mode), "video", train=True)
    cfg = _strong_recipe(small_config(str(kinetics_shards)), mode)
    cfg.augment.on_device, cfg.decoder.isolate = True, isolate
    on_device = Decoder(cfg, "video", train=True)
    kinds, flips = set(), set()
    for batch in batches:
        reference, sent = in_actor(batch), on_device(batch)
        assert sent["status"].tolist() == reference["status"].tolist() == [OK] * 12
        assert sent["rand_augment"].shape == (12, 4, 3) and sent["erase"].shape == (12, 5) and sent["flip"].shape == (12,)
        assert "rand_augment" not in reference and "flip" not in reference
        augmented = _device_views(sent, cfg.augment, frames=8)
        np.testing.assert_array_equal(augmented.numpy(), reference["video"])
        crops = [crop.shape for crop in sent["video"]]
        assert all(len(shape) == 4 and shape[0] == 8 and shape[3] == 3 for shape in crops)
        assert any(shape[1:3] != (48, 48) for shape in crops)  # cut by the actor at the box's size, resized on the device
        flips |= set(sent["flip"].tolist())
        kinds |= set(sent["rand_augment"][..., 0][sent["rand_augment"][..., 0] >= 0].astype(int).tolist())
    assert len(kinds) >= 8  # 24 views at m9, n4: most of the op table went both ways
    assert flips == {0, 1}


def test_image_views_are_the_same_whichever_side_augments(tmp_path: Path) -> None:
    y, x = np.mgrid[0:75, 0:100]
    pixels = np.stack([x * 2.5, y * 3.0, 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)], axis=-1).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
    cfg = _strong_recipe(small_config(str(tmp_path)), "rrc")
    batch = decoder_batch([decoder_row(f"img{i}", jpeg.getvalue(), {}) for i in range(3)])
    reference = Decoder(cfg, "image", train=True)(batch)
    cfg.augment.on_device = True
    sent = Decoder(cfg, "image", train=True)(batch)
    assert len(sent["video"]) == 12 and all(crop.shape[0] == 1 and crop.shape[3] == 3 for crop in sent["video"])
    np.testing.assert_array_equal(_device_views(sent, cfg.augment, frames=1).numpy(), reference["video"])


def test_evaluation_never_carries_augmentation(kinetics_shards: Path) -> None:
    cfg = small_config(str(kinetics_shards))
    cfg.augment.on_device, cfg.decoder.isolate = True, False
    out = Decoder(cfg, "video", train=False)(decoder_batch(_shard_rows(kinetics_shards, 1)))
    assert "rand_augment" not in out and "erase" not in out and out["status"].tolist() == [OK] * 3


# ---- what a decode child sends is checked ---------------------------------------------------------


def _packed(records: np.ndarray, frames: int) -> np.ndarray:
    """A decode child's buffer: the records, then each view's crop of the size its record gives."""
    pixels = sum(frames * h * w * 3 for h, w, _ in records["crop"].tolist())
    return np.concatenate([records.view(np.uint8).reshape(-1), np.arange(pixels).astype(np.uint8)])


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("op", 15.0, "op index"), ("op", 2.5, "op index"), ("magnitude", 10.5, "magnitude"),
    ("magnitude", math.nan, "magnitude"), ("sign", 0.0, "sign"), ("box", (30, 0, 20, 5, 1), "erase box"),
    ("box", (2**62, 0, 2**62, 5, 1), "erase box"), ("box", (0, 0, 0, 4, 0), "erase box"),
    ("box", (0, 0, 3, 4, 2**31), "erase box"), ("crop", (0, 5, 0), "crop size"), ("crop", (5, 2**40, 1), "crop size"),
    ("crop", (-3, 4, 0), "crop size"), ("crop", (5, 4, 2), "flip"),
])  # fmt: skip
def test_parameters_a_decode_child_could_not_have_drawn_fail_the_sample(field: str, value, problem: str) -> None:
    records = np.zeros(2, augment_dtype(2))
    records["ops"][..., 0] = -1
    records["ops"][0, 0] = (3, 7.0, 1)
    records["crop"] = [(40, 50, 1), (7, 3, 0)]
    crops, good = split_crops(_packed(records, 3), 2, 3, 2, 40)
    assert [c.shape for c in crops] == [(3, 40, 50, 3), (3, 7, 3, 3)] and good["ops"][0, 0].tolist() == [3, 7.0, 1]
    assert crops[1].reshape(-1).tolist() == (np.arange(3 * 40 * 50 * 3, 3 * (40 * 50 + 21) * 3) % 256).tolist()
    with pytest.raises(ValueError, match="bytes of pixels"):
        split_crops(_packed(records, 3)[:-1], 2, 3, 2, 40)
    with pytest.raises(ValueError, match="bytes of pixels"):
        split_crops(_packed(records, 4), 2, 3, 2, 40)  # crops of 4 frames where 3 are due
    with pytest.raises(ValueError, match="sent uint8"):
        split_crops(_packed(records, 3)[:100], 2, 3, 2, 40)
    if field == "box":
        records["erase"][1] = value
    elif field == "crop":
        records["crop"][1] = value
    else:
        records["ops"][1, 1] = {"op": (value, 5.0, 1), "magnitude": (4, value, 1), "sign": (4, 5.0, value)}[field]
    packed = np.concatenate([records.view(np.uint8).reshape(-1), np.zeros(3 * 40 * 50 * 3 + 3 * 5 * 4 * 3, np.uint8)])
    with pytest.raises(ValueError, match=problem):
        split_crops(packed, 2, 3, 2, 40)


def test_render_on_device_resizes_each_crop_and_flips_where_asked() -> None:
    crops = [_clip(0).permute(0, 2, 3, 1)[:, 5:35, :20], _clip(1).permute(0, 2, 3, 1)]  # (T, h, w, 3): 30x20, 40x40
    out = render_on_device(crops, torch.tensor([1, 0], dtype=torch.int8), CROP, FRAMES)
    assert out.shape == (2, 3, FRAMES, CROP, CROP) and out.dtype == torch.uint8
    assert torch.equal(out[1], _clip(1).permute(1, 0, 2, 3))  # the crop's size already: not resampled
    unflipped = render_on_device(crops[:1], [False], CROP, FRAMES)
    assert torch.equal(out[0], unflipped[0].flip(-1)) and not torch.equal(out[0], unflipped[0])
    assert render_on_device([], [], CROP, FRAMES).shape == (0, 3, FRAMES, CROP, CROP)
    with pytest.raises(ValueError, match="2 crops but 1 flips"):
        render_on_device(crops, [True], CROP, FRAMES)


def test_a_bad_record_fails_only_its_sample(kinetics_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = small_config(str(kinetics_shards))
    cfg.augment.on_device, cfg.decoder.isolate = True, False
    decoder = Decoder(cfg, "video", train=True)
    decode = decoder._local.decode

    def tampered(data, meta, key, epoch):
        out = decode(data, meta, key, epoch)
        if key == rows[0]["key"]:
            seed_top = dtype.fields["erase"][1] + 4 * 8 + 7  # the erase seed's top byte (little-endian)
            out[seed_top] = 0xFF  # in the first view's record: a negative seed
        return out

    dtype = augment_dtype(augment_slots(cfg.augment))
    rows = _shard_rows(kinetics_shards, 2)
    monkeypatch.setattr(decoder._local, "decode", tampered)
    monkeypatch.setattr(cfg.augment, "random_erasing", 1.0)
    out = decoder(decoder_batch(rows))
    assert out["status"].tolist() == [FAILED] * 2 + [OK] * 2
    assert "invalid augmentation parameters: an erase box" in out["error"][0]


def test_on_device_is_auto_true_or_false() -> None:
    assert AugmentConfig().on_device == "auto"
    assert AugmentConfig().on_device_for(True) is True and AugmentConfig().on_device_for(False) is False
    assert AugmentConfig(on_device=False).on_device_for(True) is False
    assert AugmentConfig(on_device=True).on_device_for(False) is True  # CPU training: on the worker's CPU
    cfg = small_config("/tmp/x")
    cfg.augment.on_device = "gpu"
    with pytest.raises(ConfigError, match="data.augment.on_device must be 'auto', true or false"):
        cfg.validate()
