"""One sample's decode: its bytes -> its views (Decord or Pillow, then sampling and augmentation).

The heavy half of decoding (torch, torchvision, Decord), kept apart from the actor (``decode``) so that
only the process that decodes imports it: the decode child's zygote (``isolation``), or the actor
itself when ``decoder.isolate`` is off.

With ``augment.on_device`` (training only) a view is only cut out of the decoded frames, not resized: its
crop travels with its flip, drawn RandAugment ops and erase box (``sampling.augment_record``), packed
into one flat uint8 buffer per sample (``pack_crops``), because what a decode child sends its actor is
raw uint8 bytes of a declared shape (never a pickle); the actor splits and checks them.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable
from typing import Any

import av
import numpy as np
import torch
from PIL import Image

from pipeline.data.config import DataConfig
from pipeline.data.decode import decord_has_cuda, load_decord, train_clips, view_rng, views_per_sample
from pipeline.data.sampling import (
    ViewSpec,
    augment_record,
    augment_slots,
    eval_clips,
    eval_views,
    train_view,
)
from pipeline.data.transforms import crop_frames, render_view


class _ScaledDecodeError(Exception):
    """Decord returned frames of the wrong shape for a decode-time resize."""


class SampleDecoder:
    """One sample's bytes -> its views: Decord (video) or Pillow (JPEG), then sampling and augmentation.

    Runs wherever ``Decoder`` puts it: in the decode child process, or in the actor itself.
    """

    def __init__(self, cfg: DataConfig, modality: str, train: bool, device_kind: str = "cpu",
                 device_index: int = 0) -> None:  # fmt: skip
        self.cfg, self.modality, self.train = cfg, modality, train
        self.views = views_per_sample(cfg, modality, train)
        self.on_device = train and cfg.augment.on_device is True  # "auto" unresolved: no training device known
        torch.set_num_threads(max(1, round(cfg.decoder.num_cpus)))
        self._ctx = None
        if modality == "video":
            decord = load_decord()
            if device_kind == "gpu" and not decord_has_cuda():
                raise RuntimeError("GPU decoding asked for, but Decord was built without CUDA")
            self._ctx = decord.gpu(device_index) if device_kind == "gpu" else decord.cpu(0)

    # ---- one sample ---------------------------------------------------------------------------

    def decode(self, data: bytes, meta: dict[str, Any], key: str, epoch: int) -> np.ndarray:
        """(views, 3, T, crop, crop) uint8 for one sample; with ``on_device``, the flat uint8 buffer of
        ``pack_crops``, which ``decode.split_crops`` takes apart."""
        if not data:
            raise ValueError("empty media member")
        if self.modality == "image":
            return self._decode_image(data, meta, key, epoch)
        return self._decode_video(data, meta, key, epoch)

    def _render(self, views: Iterable[tuple[torch.Tensor, ViewSpec]], fx: float, fy: float) -> np.ndarray:
        """Each (frames, spec) as a view: rendered in full, or with ``on_device`` only its box cut out
        (``pack_crops``). Rendering consumes ``views`` lazily, one view's frames at a time beside the
        decoded ones; cutting out holds every view's crop (a view of its frames) until they are packed."""
        aug = self.cfg.augment
        if not self.on_device:
            return np.stack([render_view(frames, fx, fy, spec, aug.crop_size, aug.mean, aug.std).numpy()
                             for frames, spec in views])  # fmt: skip
        return pack_crops([(crop_frames(frames, fx, fy, spec).numpy(), spec) for frames, spec in views],
                          augment_slots(aug))  # fmt: skip

    def _specs(self, width: int, height: int, key: str, epoch: int) -> list[ViewSpec]:
        aug = self.cfg.augment
        if not self.train:
            crops = 1 if self.modality == "image" else self.cfg.sampling.eval_crops
            return eval_views(width, height, aug, crops)
        rngs = [view_rng(self.cfg.seed, epoch, key, v) for v in range(self.views)]
        return [train_view(rng, width, height, aug) for rng in rngs]

    def _decode_video(self, data: bytes, meta: dict[str, Any], key: str, epoch: int) -> np.ndarray:
        decord = load_decord()
        width, height = _stream_size(data)
        _check_frame_size(width, height, meta, self.cfg.decoder.max_frame_pixels, "decoder.max_frame_pixels")
        specs = self._specs(width, height, key, epoch)
        scale = max(spec.scale for spec in specs)
        out_w, out_h = max(2, round(width * scale)), max(2, round(height * scale))
        resize = (out_w, out_h) != (width, height)
        try:
            frames, wanted, plan = self._read_clips(data, specs, key, epoch, meta, (out_w, out_h) if resize else None,
                                                    (width, height))  # fmt: skip
        except (decord.DECORDError, _ScaledDecodeError):
            if not resize:
                raise
            # Decord 0.6 mis-sizes some small scaled outputs (dmlc/decord#336: 4-channel frames, e.g. at
            # 72x48); decode at the stored size instead and let render_view resize.
            frames, wanted, plan = self._read_clips(data, specs, key, epoch, meta, None, (width, height))
        fx, fy = frames.shape[2] / width, frames.shape[1] / height
        every = np.arange(len(wanted))

        def clip_frames(clip: np.ndarray) -> torch.Tensor:  # the decoded frames themselves when the clip is all of them
            index = np.searchsorted(wanted, clip)
            return frames if np.array_equal(index, every) else frames[index]

        return self._render(((clip_frames(clip), spec) for clip, spec in plan), fx, fy)

    def _read_clips(
        self, data: bytes, specs: list[ViewSpec], key: str, epoch: int, meta: dict[str, Any],
        size: tuple[int, int] | None, stored: tuple[int, int],
    ) -> tuple[torch.Tensor, np.ndarray, list[tuple[np.ndarray, ViewSpec]]]:
        """Decode every frame the views need in one ``get_batch``: (frames, their indices, (clip, spec)
        per view). ``size`` = (width, height) to scale to while decoding, None = ``stored``, the stream's.
        The frame count is the container's; metadata that says otherwise fails the sample, and so do
        more decoded pixels than ``decoder.max_decoded_pixels``, before any frame is decoded."""
        decord = load_decord()
        width, height = size or (-1, -1)
        reader = decord.VideoReader(io.BytesIO(data), ctx=self._ctx, width=width, height=height,
                                    num_threads=self.cfg.decoder.threads)  # fmt: skip
        count, fps = len(reader), float(reader.get_avg_fps())
        if count <= 0:
            raise ValueError("video has no frames")
        claimed = meta.get("frames")
        if claimed is not None and claimed != count:
            raise ValueError(f"metadata says {claimed!r} frames, the stream has {count}")
        sampling = self.cfg.sampling
        if self.train:
            clips = train_clips(self.cfg, key, epoch, count, fps)
            per_clip = len(specs) // len(clips)
            plan = [(clips[view // per_clip], spec) for view, spec in enumerate(specs)]
        else:  # view = clip * crops + crop
            plan = [(clip, spec) for clip in eval_clips(count, fps, sampling) for spec in specs]
        wanted = np.unique(np.concatenate([clip for clip, _ in plan]))
        out_w, out_h = size or stored
        _check_pixels(len(wanted) * out_w * out_h, f"{len(wanted)} frames of {out_w}x{out_h}",
                      self.cfg.decoder.max_decoded_pixels, "decoder.max_decoded_pixels")  # fmt: skip
        frames = reader.get_batch(wanted.tolist()).asnumpy()
        if size is not None and frames.shape[1:] != (size[1], size[0], 3):
            raise _ScaledDecodeError(f"asked for {size[0]}x{size[1]}x3, got {frames.shape[1:]}")
        return torch.from_numpy(frames), wanted, plan

    def _decode_image(self, data: bytes, meta: dict[str, Any], key: str, epoch: int) -> np.ndarray:
        with warnings.catch_warnings():
            # Pillow only warns above its own pixel limit (89 Mpx) and raises at twice that: an error here,
            # whatever the format, and the cap below (checked from the header) is lower still
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            width, height = image.size
            _check_frame_size(width, height, meta, self.cfg.decoder.max_image_pixels, "decoder.max_image_pixels")
            specs = self._specs(width, height, key, epoch)
            scale = max(spec.scale for spec in specs)
            fx = fy = 1.0
            if scale < 1.0:  # JPEG draft: decode at 1/2, 1/4 or 1/8 while staying >= the size needed
                drafted = image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
                if drafted is not None:
                    # The factor is 1/s, from the box the image spans in drafted pixels (width / s, ...),
                    # not drafted size / size: that size is rounded up to whole pixels (375 px at 1/2 ->
                    # 188, its last row half padding), which would stretch and shift every crop box.
                    _, (_, _, spanned_w, spanned_h) = drafted
                    fx, fy = spanned_w / width, spanned_h / height
            rgb = np.asarray(image.convert("RGB"))
        frames = torch.from_numpy(rgb.copy()).unsqueeze(0)  # T = 1
        return self._render(((frames, spec) for spec in specs), fx, fy)


def pack_crops(crops: list[tuple[np.ndarray, ViewSpec]], slots: int) -> np.ndarray:
    """A sample's views as ``augment.on_device`` sends them, one flat uint8 buffer (what a decode child
    sends its actor is raw bytes of a declared shape, never a pickle): every view's record
    (``sampling.augment_record``: ops, erase box, crop size and flip), then every view's crop, (T, h, w, 3)
    each, in view order. ``decode.split_crops`` takes it apart and checks it."""
    records = np.stack([augment_record(spec, slots, crop.shape[1], crop.shape[2]) for crop, spec in crops])
    head = records.view(np.uint8).reshape(-1)
    out = np.empty(len(head) + sum(crop.size for crop, _ in crops), np.uint8)
    out[: len(head)], offset = head, len(head)
    for crop, _ in crops:  # one copy of each crop, straight from the decoded frames into the buffer
        out[offset : offset + crop.size].reshape(crop.shape)[...] = crop
        offset += crop.size
    return out


def _stream_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a video's first video stream, from the container's headers alone (no frame
    is decoded): the truth the sample's metadata is checked against, and what the decode is sized by."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError("the container has no video stream")
            codec = container.streams.video[0].codec_context
            width, height = int(codec.width), int(codec.height)
    except av.error.FFmpegError as exc:
        raise ValueError(f"unreadable container: {exc}") from exc
    if width <= 0 or height <= 0:
        raise ValueError("the video stream has no frame size")
    return width, height


def _check_frame_size(width: int, height: int, meta: dict[str, Any], cap: int, setting: str) -> None:
    """The stored frame (or image) against its cap and against the sample's metadata, which is only ever
    compared: a crafted ``.json`` must not size a decode (20000x20 claimed for a 64x36 clip once made
    Decord allocate 224000x224 frames)."""
    _check_pixels(width * height, f"{width}x{height}", cap, setting)
    claimed = (meta.get("width"), meta.get("height"))
    if claimed != (None, None) and claimed != (width, height):
        raise ValueError(f"metadata says {claimed[0]}x{claimed[1]}, the stream is {width}x{height}")


def _check_pixels(pixels: int, what: str, cap: int, setting: str) -> None:
    if pixels > cap:
        raise ValueError(f"{what} = {pixels} pixels, over data.{setting}={cap}: not decoded")
