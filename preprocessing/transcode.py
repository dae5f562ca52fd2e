"""Turn one input file into the bytes stored in a shard: H.264/MP4 for video, JPEG for images.

Video uses PyAV (libav* + libx264 in-process) rather than the ffmpeg CLI. Measured choice:
`benchmarks/preprocess.py` runs this tool, a plain PyAV loop and the ffmpeg CLI (the static binary of
the `imageio-ffmpeg` package, `pip install .[bench]`) on the same clips with the same x264 settings;
the numbers and the trade-off are in docs/benchmarks.md ("Preprocessing"). PyAV also needs no
binary on the workers, spawns no subprocess per clip, keeps the encoded bytes in memory (no temp
files on the way to S3) and lets the tool see every decoded frame (segment cut, rotation, metadata).

Determinism: identical inputs and settings must give identical bytes, so that reruns and resumed
runs reproduce shards exactly. Measured requirements (regression tests in tests/preprocessing/test_units.py):
- x264 and swscale run with one thread (x264's output depends on its thread count, and "auto" would
  depend on the machine); each process encodes one clip on one core, parallelism comes from running
  many processes (parallel.py).
- x264's macroblock-tree rate control is off (`mbtree=0`): its SIMD code in the bundled libx264
  (core 165) reads uninitialised stack memory (found with valgrind; clean with `no-asm`), which made
  20-40% of encodes differ under the test's memory churn (benchmarks/x264_churn.py). The cost is some
  compression efficiency at a given CRF.
- the MP4 muxer writes no wall-clock time.

Frame types: x264 chooses every frame's type itself (I/P/B, keyframes every `gop` frames at most),
as the ffmpeg CLI lets it. A decoded frame carries the type it had in the *source*, and libavcodec's
libx264 wrapper obeys a frame's type when it is set; passing decoded frames on unchanged made the
output copy the source's structure (no B-frames from a P-only source, extra I-frames wherever the
source had them), larger at the same CRF, and dependent on how the source was encoded.
`_encoder_frame` clears it (test_video_frame_types_are_chosen_by_x264_not_copied_from_the_source).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import IO, Any, ClassVar, Iterator, Protocol

import av
import av.logging
import numpy as np
import PIL
from av.video.frame import PictureType
from PIL import Image

from preprocessing.items import WorkItem

X264_PARAMS = "mbtree=0"

# Caps: the most one input may cost, checked from its container or image header before anything is
# decoded (the reasons for these defaults are in docs/preprocessing.md, "Caps and the time limit").
VIDEO_MAX_PIXELS = 4096 * 4096  # 16.8 Mpx: 4K UHD / DCI 4K in either orientation, 5K; 8K is refused
VIDEO_MAX_SECONDS = 20 * 60.0  # Kinetics clips are 10 s; uncut source videos are mostly minutes
VIDEO_MAX_FRAMES = 72_000  # 20 minutes at 60 fps
IMAGE_MAX_PIXELS = 89_478_485  # Pillow's own default; ImageNet's largest images are far smaller
FETCH_CHUNK_BYTES = 4 << 20  # a remote input is copied to local disk this much at a time
_MAX_FPS = 1000
# Errors that mean "this input is bad", as opposed to bugs or storage failures, which must surface.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    av.error.FFmpegError,
    OSError,  # decoders only (inputs are read before decoding): PIL's UnidentifiedImageError, truncation
    SyntaxError,  # PIL raises it for some malformed headers
    ValueError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class RejectError(Exception):
    """The input cannot become a sample; the message is the reason written to rejects.jsonl."""


def over_cap(cap: str, measured: str, flag: str, limit: float) -> RejectError:
    """The rejection of an input over a cap: names the cap, what was measured and the flag that sets it."""
    shown = int(limit) if float(limit).is_integer() else limit
    return RejectError(f"over the {cap} cap: {measured} > {flag} {shown}")


def _check_pixels(width: int, height: int, limit: int, where: str) -> None:
    if width * height > limit:
        raise over_cap("pixel", f"{width}x{height} = {width * height} pixels ({where})", "--max-pixels", limit)


@dataclass(frozen=True)
class EncodedSample:
    data: bytes
    meta: dict[str, Any]


class Encoder(Protocol):
    """What the shard writer needs from a modality: a file extension and an encode function.

    `encode_local` does the work on an input already opened by `open_input`; the shard writer runs it
    in a child process with a time limit (isolated.py). `encode` is both steps in this process."""

    modality: ClassVar[str]
    extension: ClassVar[str]

    def encode(self, item: WorkItem, storage_options: dict[str, Any]) -> EncodedSample: ...

    def encode_local(self, item: WorkItem, src: str | IO[bytes]) -> EncodedSample: ...

    def settings(self) -> dict[str, Any]: ...


@contextlib.contextmanager
def open_input(item: WorkItem, storage_options: dict[str, Any]) -> Iterator[str | IO[bytes]]:
    """The input as a local path, or, when remote, as a local temporary file it is streamed into.

    A remote input is copied `FETCH_CHUNK_BYTES` at a time (memory stays bounded whatever its size)
    into a file without a name (Linux), so a killed run leaves nothing in the temp directory. The
    copy is complete before anything decodes it, so read errors are storage failures and propagate
    (the shard fails and a rerun redoes it); only a vanished file becomes a reject.
    """
    import fsspec  # here: the encoder child (isolated.py), which imports this module, never reads storage
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(item.source, **storage_options)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isfile(path):
            raise RejectError(f"missing: {path}")
        yield path
        return
    with tempfile.TemporaryFile(prefix="mvit-input-") as local:
        try:
            remote = fs.open(path, "rb", block_size=FETCH_CHUNK_BYTES, cache_type="none")
        except FileNotFoundError as exc:
            raise RejectError(f"missing: {exc}") from exc
        with remote:
            shutil.copyfileobj(remote, local, FETCH_CHUNK_BYTES)
        local.seek(0)
        yield local


def even_scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Output size with the short side = `short_side`, aspect kept, both even (needed by yuv420p)."""
    scale = short_side / min(width, height)
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


@dataclass(frozen=True)
class VideoEncoder:
    """H.264 at a fixed short side, source frame rate kept, short GOP for cheap random access.

    The output is constant-frame-rate at the source's average rate: every decoded frame (inside the
    segment, when trimming) is kept exactly once, so a variable-frame-rate source keeps all its frames
    and its total duration. Audio is dropped: training reads frames only.

    Rotation: phone videos are often stored sideways with a display matrix saying how to turn them.
    Decord (the training-time decoder) ignores display matrices, so the rotation (a multiple of 90
    degrees, read from the decoded frames) is applied here and the output is stored upright with no
    display matrix; "short side" refers to the upright picture. Mirroring in a display matrix is not
    applied (PyAV exposes only its rotation).

    Caps: an input whose container states a frame size over `max_pixels`, more than `max_frames`
    frames or more than `max_seconds` seconds (with `trim`: a segment that long) is refused before
    any frame is decoded (`_check_header`). The same caps are counted again while decoding, for
    containers that state no length or state a false one: `max_frames` counts every frame decoded
    (with `trim`, also those between the keyframe before the segment and the segment).
    """

    modality: ClassVar[str] = "video"
    extension: ClassVar[str] = "mp4"

    short_side: int = 320
    gop: int = 16
    crf: int = 23
    preset: str = "veryfast"
    max_pixels: int = VIDEO_MAX_PIXELS
    max_frames: int = VIDEO_MAX_FRAMES
    max_seconds: float = VIDEO_MAX_SECONDS

    def settings(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "codec": "libx264",
            "x264_params": X264_PARAMS,
            "pix_fmt": "yuv420p",
            "interpolation": "bicubic",
            "threads": 1,
            "audio": "dropped",
            "rotation": "applied",
            "frame_types": "x264",  # chosen by x264, not copied from the source (module docstring)
            "av_version": av.__version__,
        }

    def encode(self, item: WorkItem, storage_options: dict[str, Any]) -> EncodedSample:
        """The sample of one video; its metadata says where the stored video lies in the source.

        `segment` is always the annotated segment in *source* time (seconds from the start of the
        annotated video, e.g. the YouTube video). The stored video is either just that segment
        (`trimmed`: a pre-cut clip file, or an uncut file cut here with --trim) or the whole uncut
        file (`trimmed` false: the action is somewhere inside). `start_in_source` is the source time
        of the stored video's first frame, so a reader finds the segment in the stored video at
        `segment - start_in_source` seconds whichever the case, instead of guessing from the key.
        """
        with open_input(item, storage_options) as src:
            return self.encode_local(item, src)

    def encode_local(self, item: WorkItem, src: str | IO[bytes]) -> EncodedSample:
        """`encode` of an input opened by `open_input`."""
        cut = item.segment if item.trim else None
        try:
            result = self._transcode(src, cut)
        except _DECODE_ERRORS as exc:
            raise RejectError(f"undecodable video: {type(exc).__name__}: {exc}") from exc
        if item.precut and item.segment is not None:
            # A pre-cut clip file starts at the annotated start (that is how Kinetics clips are cut and
            # named); its own time 0 is therefore segment[0] in source time.
            start_in_source, trimmed = item.segment[0] + result.start, True
        else:
            start_in_source, trimmed = result.start, cut is not None
        meta = {
            "label": item.label,
            "source_id": item.source_id,
            "segment": list(item.segment) if item.segment is not None else None,
            "trimmed": trimmed,
            "start_in_source": round(start_in_source, 6),
            "fps": float(result.fps),
            "frames": result.frames,
            "width": result.width,
            "height": result.height,
            "duration": round(result.frames / float(result.fps), 6),
        }
        return EncodedSample(result.data, meta)

    def transcode(
        self, src: Any, segment: tuple[float, float] | None = None
    ) -> tuple[bytes, Fraction, int, int, int]:
        """(mp4 bytes, fps, frames, width, height) for a path or binary file object."""
        result = self._transcode(src, segment)
        return result.data, result.fps, result.frames, result.width, result.height

    def _check_header(self, src: Any, segment: tuple[float, float] | None) -> None:
        """Refuse an input over a cap from what its container states, before any frame is decoded.

        Without `skip_frame`, libavformat's stream probing decodes a first frame to fill in codec
        details (150 MB of memory for one 8192x8192 H.264 frame); the frame size, frame count and
        duration come from the container header without it.
        """
        try:
            with av.open(src, mode="r", metadata_errors="ignore", options={"skip_frame": "all"}) as probe:
                if not probe.streams.video:
                    return  # the transcode says what the input holds instead
                stream = probe.streams.video[0]
                _check_pixels(stream.width, stream.height, self.max_pixels, "container")
                rate = stream.average_rate or stream.guessed_rate
                if segment is not None:  # only the segment is stored
                    seconds, frames, where = segment[1] - segment[0], None, "segment"
                else:
                    seconds, frames, where = _stated_length(probe, stream), stream.frames or None, "container"
        finally:
            if not isinstance(src, str):
                src.seek(0)
        if seconds is not None and seconds > self.max_seconds:
            raise over_cap("duration", f"{seconds:.1f} s ({where})", "--max-seconds", self.max_seconds)
        if frames is None and seconds is not None and rate:
            frames, where = round(seconds * rate), f"{where} duration x frame rate"
        if frames is not None and frames > self.max_frames:
            raise over_cap("frame", f"{frames} frames ({where})", "--max-frames", self.max_frames)

    def _transcode(self, src: Any, segment: tuple[float, float] | None) -> _Transcoded:
        av.logging.set_level(av.logging.FATAL)
        self._check_header(src, segment)
        with av.open(src, mode="r", metadata_errors="ignore") as inp:
            if not inp.streams.video:
                found = ", ".join(sorted({st.type for st in inp.streams})) or "no streams at all: truncated or not a media file"
                raise RejectError(f"no video stream ({found})")
            stream = inp.streams.video[0]
            stream.codec_context.thread_count = 1
            fps = _frame_rate(stream)
            origin = _stream_origin(stream)
            budget = _FrameBudget(self.max_pixels, self.max_frames, None if segment else self.max_seconds)
            frames = _decoded_frames(inp, stream, segment, origin, budget)
            first = next(frames, None)
            if first is None:
                where = f" in segment {segment[0]:g}-{segment[1]:g}s" if segment else ""
                raise RejectError(f"no frames decoded{where}")
            # Where the stored video starts, on the same clock as `segment` (0 if untimed: the first
            # decoded frame is the stream start).
            start = max(first.time - origin, 0.0) if first.time is not None else 0.0
            turns = _quarter_turns(first)
            upright = (first.height, first.width) if turns % 2 else (first.width, first.height)
            width, height = even_scaled_size(*upright, self.short_side)
            out = io.BytesIO()
            count = 0
            with av.open(out, mode="w", format="mp4") as container:
                ost = container.add_stream("libx264", rate=fps)
                ost.width, ost.height, ost.pix_fmt = width, height, "yuv420p"
                ost.codec_context.time_base = 1 / fps
                ost.codec_context.gop_size = self.gop
                ost.codec_context.thread_count = 1
                ost.options = {"crf": str(self.crf), "preset": self.preset, "x264-params": X264_PARAMS}
                for frame in _chain(first, frames):
                    scaled = _encoder_frame(_scaled_upright(frame, width, height, turns), count, ost)
                    container.mux(ost.encode(scaled))
                    count += 1
                container.mux(ost.encode(None))
        return _Transcoded(out.getvalue(), fps, count, width, height, start)


@dataclass(frozen=True)
class _Transcoded:
    """One transcode's output; `start` = seconds from the source stream's start to its first frame."""

    data: bytes
    fps: Fraction
    frames: int
    width: int
    height: int
    start: float


def _encoder_frame(frame: av.VideoFrame, index: int, ost: av.video.stream.VideoStream) -> av.VideoFrame:
    """`frame` ready for the encoder: constant-rate timestamp, and no frame type inherited from the
    source (so x264 decides I/P/B itself; see the module docstring)."""
    frame.pts, frame.time_base = index, ost.codec_context.time_base
    frame.pict_type = PictureType.NONE
    return frame


def _frame_rate(stream: av.video.stream.VideoStream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if rate is None or not 0 < rate <= _MAX_FPS:
        raise RejectError(f"no usable frame rate ({rate})")
    return Fraction(rate).limit_denominator(1001)


def _stream_origin(stream: av.video.stream.VideoStream) -> float:
    """The stream's start time in seconds: time 0 of segments (annotations count from there)."""
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _stated_length(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """Seconds of video the header states: the stream's duration, else the container's, else None."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else None


class _FrameBudget:
    """The caps again, counted on decoded frames: a container may state no length, or a false one, and
    a stream may change its frame size midway. `max_seconds` None: the duration is bounded otherwise
    (a trimmed segment was checked against the cap before decoding)."""

    def __init__(self, max_pixels: int, max_frames: int, max_seconds: float | None) -> None:
        self.max_pixels, self.max_frames, self.max_seconds = max_pixels, max_frames, max_seconds
        self.decoded = 0
        self.first_time: float | None = None

    def spend(self, frame: av.VideoFrame) -> None:
        self.decoded += 1
        if self.decoded > self.max_frames:
            raise over_cap("frame", f"more than {self.max_frames} frames decoded", "--max-frames", self.max_frames)
        _check_pixels(frame.width, frame.height, self.max_pixels, f"decoded frame {self.decoded}")
        if self.max_seconds is None or frame.time is None:
            return
        if self.first_time is None:
            self.first_time = frame.time
        elapsed = frame.time - self.first_time
        if elapsed > self.max_seconds:
            raise over_cap("duration", f"frames past {elapsed:.1f} s decoded", "--max-seconds", self.max_seconds)


def _decoded_frames(
    inp: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    segment: tuple[float, float] | None,
    origin: float,
    budget: _FrameBudget,
) -> Iterator[av.VideoFrame]:
    """Decoded frames, limited to start <= t < end (seconds from `origin`) if `segment`; every frame
    decoded is counted against `budget`."""
    if segment is None:
        for frame in inp.decode(stream):
            budget.spend(frame)
            yield frame
        return
    start, end = segment
    if start > 0:
        inp.seek(int((start + origin) / stream.time_base), stream=stream, backward=True)
    for frame in inp.decode(stream):
        budget.spend(frame)
        if frame.time is None:
            raise RejectError("frames have no timestamps, cannot trim to the segment")
        t = frame.time - origin
        if t >= end - 1e-6:
            return
        if t >= start - 1e-6:
            yield frame


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counterclockwise quarter turns (0-3) that make `frame` display upright (its display matrix)."""
    return round((frame.rotation or 0) / 90) % 4


def _scaled_upright(frame: av.VideoFrame, width: int, height: int, turns: int) -> av.VideoFrame:
    """`frame` as yuv420p of `width` x `height` after `turns` counterclockwise quarter turns.

    Scaling happens before the turn (on the stored orientation), so a rotated 4K source is turned
    at the output size; the turn goes through RGB, as swscale cannot rotate.
    """
    if turns == 0:
        return frame.reformat(width, height, "yuv420p", interpolation="BICUBIC", threads=1)
    stored_w, stored_h = (height, width) if turns % 2 else (width, height)
    rgb = frame.reformat(stored_w, stored_h, "rgb24", interpolation="BICUBIC", threads=1).to_ndarray()
    turned = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(rgb, turns)), format="rgb24")
    return turned.reformat(format="yuv420p", threads=1)


def _chain(first: av.VideoFrame, rest: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    yield first
    yield from rest


@dataclass(frozen=True)
class ImageEncoder:
    """RGB JPEG with the longer side bounded; CMYK, grayscale, palette and PNG inputs converted.

    `max_pixels` is checked from the header, before decoding, to refuse decompression bombs, whatever
    the format and whatever the file is named (a PNG named .JPEG is opened as the PNG it is). Pillow's
    own guard is set to the same limit and made an error (alone it only warns between 1x and 2x its
    limit), for sizes found while loading (an icon file's embedded images).
    EXIF orientation is not applied, matching how ImageNet is read by torchvision/timm.
    """

    modality: ClassVar[str] = "image"
    extension: ClassVar[str] = "jpg"

    max_side: int = 512
    quality: int = 90
    max_pixels: int = IMAGE_MAX_PIXELS

    def settings(self) -> dict[str, Any]:
        return {**asdict(self), "resample": "lanczos", "pillow_version": PIL.__version__}

    def encode(self, item: WorkItem, storage_options: dict[str, Any]) -> EncodedSample:
        with open_input(item, storage_options) as src:
            return self.encode_local(item, src)

    def encode_local(self, item: WorkItem, src: str | IO[bytes]) -> EncodedSample:
        """`encode` of an input opened by `open_input`."""
        guard = f"decompression-bomb guard (max_pixels={self.max_pixels})"
        try:
            data, width, height = self.reencode(src)
        except (RejectError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise RejectError(f"{guard}: {exc}") from exc
        except _DECODE_ERRORS as exc:
            raise RejectError(f"undecodable image: {type(exc).__name__}: {exc}") from exc
        meta = {"label": item.label, "source_id": item.source_id, "width": width, "height": height}
        return EncodedSample(data, meta)

    def reencode(self, src: Any) -> tuple[bytes, int, int]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # the header's size is checked below, with the size in the reason
            try:
                image = Image.open(src)  # reads the header only
            finally:
                Image.MAX_IMAGE_PIXELS = self.max_pixels
            with image:
                _check_pixels(image.width, image.height, self.max_pixels, f"{image.format} header")
                image.load()
                rgb = _to_rgb(image)
        if max(rgb.size) > self.max_side:
            scale = self.max_side / max(rgb.size)
            size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=self.quality)
        return out.getvalue(), rgb.width, rgb.height


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode; transparent pixels are composited on white rather than turning black."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")  # 16-bit gray -> 8-bit
    return image.convert("RGB")
