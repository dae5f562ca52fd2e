"""Decode-time scaling checked against pixels, not shapes: Decord's scaled decode, its fallback for Decord's
mis-sized outputs (dmlc/decord#336), and Pillow's JPEG draft mode each give the picture that an
independent full decode and resize gives, within tolerances measured and stated below.

Video views are evaluation views whose crop is the scaled short side and needs no resize (3 crops
covering the whole width, 3 clips), so a view is exactly a piece of the decoded frames.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from data_helpers import small_config
from PIL import Image, JpegImagePlugin
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.data.config import DataConfig
from pipeline.data.sample_decode import SampleDecoder
from pipeline.data.sampling import eval_clips, eval_views

# Decord's scaled decode against PyAV's libavfilter `scale` filter run as Decord runs it. Measured on all
# 18 clips of the shard fixture (96x64 H.264 with B-frames; 9 views of 8 frames each) at 60x40 and 84x56:
# bit-identical (mean 0, max 0). The allowance is for swscale itself: without its bitexact flag it picks
# x86 SIMD kernels per CPU, which may round a filter sum one level apart, and Decord (FFmpeg 4.1) and
# PyAV (FFmpeg 8.0) need not pick the same ones elsewhere. Real faults measured are far above it: the
# neighbouring frame (off by one) mean 0.73-3.0 / max 131-188; PyAV's frame.reformat(..., BILINEAR),
# whose chroma siting differs from the filter's, mean 1.4-1.6 / max 27-39; RGB first, then scaled,
# mean 2.2-2.8 / max 46-66.
SCALED_MEAN, SCALED_MAX = 0.1, 2
# The fallback (Decord at the stored size, render_view's antialiased bilinear resize of each crop)
# against the same PyAV scaled frames. It cannot be bit-identical: swscale scales the 4:2:0 chroma
# planes straight to the output, the fallback scales RGB whose chroma was first repeated over 2x2
# pixels, so coloured edges differ. Measured at 72x48 on the 18 fixture clips: mean 2.0-2.53, max 26-99
# (swscale's own RGB-then-scale differs from its one-pass output as much: mean 2.2-2.8, max 46-66). The
# neighbouring frame measured mean 2.56-4.53 (so the mean alone cannot tell) but max 142-194: the max
# bound rejects an off-by-one frame (asserted below), and the exact like-for-like check pins the rest.
FALLBACK_MEAN, FALLBACK_MAX = 3.0, 120
# JPEG draft views against Pillow's full decode reduced by the same factor. libjpeg's reduced-size IDCT
# keeps each block's low frequencies, Image.reduce averages s x s pixels: they differ at the sharp
# stripe edges. Measured on the three images below: mean 0.83-1.08, max 9-22. A crop one drafted pixel
# off measured mean 7.3-34.7, and the decoder's former crop mapping (drafted size / size instead of 1/s,
# fixed with this test) mean 3.48 / max 74 on the 500x375 image and 10.6 / 115 on the 333x251 one.
DRAFT_MEAN, DRAFT_MAX = 1.5, 40


def _stats(got: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    return float(diff.mean()), int(diff.max())


def _first_sample(root: Path) -> tuple[str, bytes, dict]:
    with tarfile.open(root / "train-000000.tar") as tar:
        key = tar.getnames()[0].rsplit(".", 1)[0]
        return key, tar.extractfile(f"{key}.mp4").read(), json.loads(tar.extractfile(f"{key}.json").read())


def _pyav_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _pyav_scaled_frames(data: bytes, width: int, height: int) -> np.ndarray:
    """Every frame through the filter Decord builds for a scaled decode: libavfilter's ``scale=W:H`` with
    swscale's bilinear filter (vf_scale's default flags in the FFmpeg 4.1 of Decord's wheel; FFmpeg 8's
    default is bicubic, hence the explicit flags), yuv420p to rgb24 in the same pass. PyAV's
    ``frame.reformat`` is not like for like: it sites the 4:2:0 chroma differently."""
    frames = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            graph = av.filter.Graph()
            source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                      time_base=frame.time_base)  # fmt: skip
            chain = [source, graph.add("scale", f"{width}:{height}:flags=bilinear"), graph.add("format", "rgb24"),
                     graph.add("buffersink")]  # fmt: skip
            for a, b in zip(chain, chain[1:]):
                a.link_to(b)
            graph.configure()
            graph.push(frame)
            frames.append(graph.pull().to_ndarray())
    return np.stack(frames)


def _eval_decoder(root: Path, side: int) -> tuple[DataConfig, SampleDecoder, list]:
    """An evaluation decoder whose views are ``side`` x ``side`` crops of frames scaled to short side
    ``side``, and the frame sizes it asks Decord for, in order (None = the stored size)."""
    cfg = small_config(str(root))
    cfg.sampling.eval_crops = 3
    cfg.augment.crop_size = cfg.augment.eval_short_side = side
    decoder = SampleDecoder(cfg, "video", train=False)
    asked: list = []
    read_clips = decoder._read_clips

    def spy(data: bytes, specs: list, key: str, epoch: int, meta: dict, size: tuple[int, int] | None,
            stored: tuple[int, int]) -> tuple:  # fmt: skip
        asked.append(size)
        return read_clips(data, specs, key, epoch, meta, size, stored)

    decoder._read_clips = spy
    return cfg, decoder, asked


def _expected_views(scaled: np.ndarray, clips: list[np.ndarray], side: int, shift: int = 0) -> np.ndarray:
    """(clips x 3 crops, 3, T, side, side) cut from frames already scaled to short side ``side``: crop c
    of 3 starts at c / 2 of the free width. ``shift`` moves every frame index (a wrong-frame reference)."""
    width = scaled.shape[2]
    assert (width - side) % 2 == 0, "crops must fall on whole pixels for an exact cut"
    views = []
    for indices in clips:
        frames = scaled[np.clip(indices + shift, 0, len(scaled) - 1)]
        for crop in range(3):
            x = (width - side) * crop // 2
            views.append(frames[:, :, x : x + side].transpose(3, 0, 1, 2))
    return np.stack(views)


@pytest.mark.parametrize(("side", "size"), [(40, (60, 40)), (56, (84, 56))])
def test_scaled_decode_is_pyavs_scale_filter_output(kinetics_shards: Path, side: int, size: tuple[int, int]) -> None:
    """Views scaled inside Decord are the frames PyAV scales with the same filter, at the same indices:
    a wrong colour conversion, chroma siting, scale or frame would exceed the tolerance."""
    key, data, meta = _first_sample(kinetics_shards)
    assert (meta["width"], meta["height"]) == (96, 64)
    cfg, decoder, asked = _eval_decoder(kinetics_shards, side)
    out = decoder.decode(data, meta, key, 0)
    assert asked == [size], "Decord did not decode at the scaled size (fell back or never scaled)"
    scaled = _pyav_scaled_frames(data, *size)
    clips = eval_clips(len(scaled), meta["fps"], cfg.sampling)
    assert out.shape == (9, 3, 8, side, side)
    mean, worst = _stats(out, _expected_views(scaled, clips, side))
    assert mean <= SCALED_MEAN and worst <= SCALED_MAX, f"scaled decode vs PyAV: mean {mean:.3f}, max {worst}"
    wrong = _stats(out, _expected_views(scaled, clips, side, shift=1))
    assert wrong[0] > SCALED_MEAN or wrong[1] > SCALED_MAX, f"the tolerance accepts the next frame: {wrong}"


def test_decord_size_fallback_matches_pyavs_scaled_frames(kinetics_shards: Path) -> None:
    """At 72x48 (dmlc/decord#336: Decord 0.6 returns 4-channel data it cannot copy out) the decoder decodes at
    the stored size and resizes each crop itself; its views still show PyAV's scaled frames, and are
    exactly that resize of PyAV's full-size frames at the same indices."""
    key, data, meta = _first_sample(kinetics_shards)
    cfg, decoder, asked = _eval_decoder(kinetics_shards, 48)
    out = decoder.decode(data, meta, key, 0)
    assert asked == [(72, 48), None], f"expected a scaled try at 72x48, then the stored size; asked {asked}"
    scaled = _pyav_scaled_frames(data, 72, 48)
    clips = eval_clips(len(scaled), meta["fps"], cfg.sampling)
    assert out.shape == (9, 3, 8, 48, 48)
    mean, worst = _stats(out, _expected_views(scaled, clips, 48))
    assert mean <= FALLBACK_MEAN and worst <= FALLBACK_MAX, f"fallback vs PyAV scaled: mean {mean:.3f}, max {worst}"
    wrong = _stats(out, _expected_views(scaled, clips, 48, shift=1))
    assert wrong[0] > FALLBACK_MEAN or wrong[1] > FALLBACK_MAX, f"the tolerance accepts the next frame: {wrong}"
    # Like for like, exact: PyAV's full-size frames (bit-identical to Decord's, test_decode.py), the
    # native crop box (64 px at x = 0, 16, 32), antialiased bilinear to 48 px.
    full = torch.from_numpy(_pyav_frames(data))
    views = []
    for indices in clips:
        for x in (0, 16, 32):
            crop = full[indices][:, :, x : x + 64].permute(0, 3, 1, 2)
            resized = F.resize(crop, [48, 48], interpolation=InterpolationMode.BILINEAR, antialias=True)
            views.append(resized.permute(1, 0, 2, 3).numpy())
    np.testing.assert_array_equal(out, np.stack(views))


def _jpeg(width: int, height: int) -> bytes:
    """A quality-92 JPEG (4:2:0, as Pillow writes it) like the synthetic ImageNet images: a smooth
    low-contrast texture and a disk of sharp diagonal stripes, whose edges show any misplaced crop."""
    rng = np.random.default_rng(3)
    coarse = rng.integers(40, 140, size=(height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = min(width, height) * 0.35
    disk = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 <= radius**2
    stripes = np.sin((xx * 0.8 + yy * 0.6) * 2 * math.pi / (radius / 2.5)) > 0
    pixels[disk & stripes] = (255, 200, 30)
    pixels[disk & ~stripes] = 20
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=92)
    return out.getvalue()


@pytest.mark.parametrize(
    ("width", "height", "short_side", "crop", "factor"),
    [(500, 375, 112, 112, 2), (333, 251, 60, 48, 4), (256, 192, 24, 24, 8)],
    ids=["500x375-half", "333x251-quarter", "256x192-eighth"],
)
def test_jpeg_draft_views_match_a_full_decode_reduced_alike(
    monkeypatch: pytest.MonkeyPatch, width: int, height: int, short_side: int, crop: int, factor: int
) -> None:
    """An image view decoded in JPEG draft mode (1/2, 1/4, 1/8) shows what Pillow's full-size decode,
    reduced by the same factor, shows in the same box: sides that are no multiple of the factor (500x375
    is ImageNet's commonest size) included, where the drafted size is rounded up."""
    drafts: list = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> tuple | None:
        drafts.append(draft(self, mode, size))
        return drafts[-1]

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = _jpeg(width, height)
    cfg = small_config("unused")
    cfg.augment.eval_short_side, cfg.augment.crop_size = short_side, crop
    out = SampleDecoder(cfg, "image", train=False).decode(data, {}, "key", 0)
    assert out.shape == (1, 3, 1, crop, crop)
    assert [d[1] for d in drafts] == [(0, 0, width / factor, height / factor)], f"not drafted at 1/{factor}: {drafts}"
    (spec,) = eval_views(width, height, cfg.augment, 1)
    got = out[0, :, 0].transpose(1, 2, 0)

    def expected(shift: int) -> np.ndarray:
        # Image.reduce: the same pixel grid as the drafted image (a partial last block makes a last pixel).
        x, y, w, h = spec.box.scaled(1 / factor, 1 / factor)
        reduced = Image.open(io.BytesIO(data)).convert("RGB").reduce(factor)
        box = (x + shift, y, x + shift + w, y + h)
        return np.asarray(reduced.resize((crop, crop), Image.Resampling.BILINEAR, box=box))

    mean, worst = _stats(got, expected(0))
    assert mean <= DRAFT_MEAN and worst <= DRAFT_MAX, f"draft view vs full decode: mean {mean:.3f}, max {worst}"
    wrong = _stats(got, expected(1))
    assert wrong[0] > DRAFT_MEAN or wrong[1] > DRAFT_MAX, f"the tolerance accepts a crop one pixel off: {wrong}"
