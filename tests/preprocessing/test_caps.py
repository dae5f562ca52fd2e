"""Caps per input (pixels, frames, duration) checked from headers before decoding and counted again while
decoding; the encoder child with its time limit; remote inputs streamed to a local file."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import psutil
import pytest
from PIL import Image

from preprocessing import isolated, transcode
from preprocessing.cli import build_parser
from preprocessing.items import WorkItem
from preprocessing.transcode import ImageEncoder, RejectError, VideoEncoder, open_input
from tests.preprocessing.crafted import huge_png, repeated_frame_video


def _item(path: Path | str, segment: tuple[float, float] | None = None, trim: bool = False) -> WorkItem:
    return WorkItem("k", str(path), "id", "x", 0, 1, segment, trim=trim)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if the transcode gets as far as decoding frames."""

    def refuse(*args: Any) -> None:
        raise AssertionError("frames were decoded")

    monkeypatch.setattr(transcode, "_decoded_frames", refuse)


# ---- videos: the header ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "caps", "item", "reason"),
    [
        ((3, 640, 480), {"max_pixels": 640 * 480 - 1}, {},
         r"^over the pixel cap: 640x480 = 307200 pixels \(container\) > --max-pixels 307199$"),
        ((100, 64, 48), {"max_frames": 99}, {}, r"^over the frame cap: 100 frames \(container\) > --max-frames 99$"),
        ((100, 64, 48), {"max_seconds": 3.5}, {}, r"^over the duration cap: 4\.0 s \(container\) > --max-seconds 3\.5$"),
        ((100, 64, 48, 25, "matroska"), {"max_frames": 99}, {},
         r"^over the frame cap: 100 frames \(container duration x frame rate\) > --max-frames 99$"),
        ((100, 64, 48), {"max_seconds": 5}, {"segment": (0.0, 10.0), "trim": True},
         r"^over the duration cap: 10\.0 s \(segment\) > --max-seconds 5$"),
    ],
    ids=["pixels", "frames", "seconds", "frames-from-duration", "trimmed-segment"],
)
def test_a_video_over_a_cap_is_rejected_from_its_header_before_decoding(
    tmp_path: Path, no_decoding: None, make: tuple, caps: dict, item: dict, reason: str
) -> None:
    path = tmp_path / ("clip.mkv" if "matroska" in make else "clip.mp4")
    repeated_frame_video(path, *make)
    with pytest.raises(RejectError, match=reason):
        VideoEncoder(short_side=32, **caps).encode(_item(path, **item), {})


def test_a_video_at_its_caps_is_written(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    repeated_frame_video(path, 100, 64, 48)
    encoder = VideoEncoder(short_side=32, max_pixels=64 * 48, max_frames=100, max_seconds=4.0)
    assert encoder.encode(_item(path), {}).meta["frames"] == 100


def test_a_container_that_states_no_length_is_capped_while_decoding(tmp_path: Path) -> None:
    """A live Matroska file states neither frame count nor duration: the frames decoded are counted."""
    path = tmp_path / "live.mkv"
    repeated_frame_video(path, 60, 64, 48, 25, "matroska", {"live": "1"})
    with pytest.raises(RejectError, match=r"^over the frame cap: more than 50 frames decoded > --max-frames 50$"):
        VideoEncoder(short_side=32, max_frames=50).encode(_item(path), {})
    with pytest.raises(RejectError, match=r"^over the duration cap: frames past 2\.0 s decoded > --max-seconds 2$"):
        VideoEncoder(short_side=32, max_seconds=2).encode(_item(path), {})
    assert VideoEncoder(short_side=32, max_frames=60, max_seconds=2.4).encode(_item(path), {}).meta["frames"] == 60


def test_the_frame_budget_counts_every_decoded_frame_and_its_size() -> None:
    budget = transcode._FrameBudget(max_pixels=100, max_frames=3, max_seconds=None)
    for t in range(3):
        budget.spend(SimpleNamespace(width=10, height=10, time=t * 1000.0))  # no duration cap: trimmed
    with pytest.raises(RejectError, match="more than 3 frames decoded"):
        budget.spend(SimpleNamespace(width=10, height=10, time=4.0))
    with pytest.raises(RejectError, match=r"^over the pixel cap: 12x10 = 120 pixels \(decoded frame 1\) > --max-pixels 100$"):
        transcode._FrameBudget(100, 3, None).spend(SimpleNamespace(width=12, height=10, time=0.0))


# ---- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["huge.JPEG", "huge.jpg", "huge.png"])
def test_an_image_over_the_pixel_cap_is_rejected_from_its_header_whatever_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A PNG named .JPEG/.jpg is refused from its header: no pixel is decoded, and the reason has its size."""
    path = tmp_path / name
    path.write_bytes(huge_png(3000, 2000))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(RejectError, match=r"^decompression-bomb guard \(max_pixels=5999999\): over the pixel cap: "
                                          r"3000x2000 = 6000000 pixels \(PNG header\) > --max-pixels 5999999$"):
        ImageEncoder(max_pixels=5_999_999).encode(_item(path), {})
    assert Image.MAX_IMAGE_PIXELS == 5_999_999, "Pillow's own guard is left at the cap, for sizes found later"


def test_an_image_at_the_pixel_cap_is_written_and_pillows_warning_zone_is_an_error(tmp_path: Path) -> None:
    """Between 1x and 2x its limit Pillow only warns; here the cap is a reject at any size above it."""
    path = tmp_path / "edge.JPEG"
    path.write_bytes(huge_png(3000, 2000))
    assert ImageEncoder(max_pixels=6_000_000).encode(_item(path), {}).meta["width"] == 512
    with pytest.raises(RejectError, match="over the pixel cap"):
        ImageEncoder(max_pixels=4_000_000).encode(_item(path), {})  # 1.5x: Pillow alone would warn


# ---- flags ---------------------------------------------------------------------------------------


def test_cap_flags_reach_the_encoders_and_bad_values_are_refused_while_parsing(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    video = parser.parse_args(["kinetics", "--csv", "c", "--videos", "v", "--out", "o"])
    assert (video.max_pixels, video.max_frames, video.max_seconds, video.item_timeout) == (
        transcode.VIDEO_MAX_PIXELS, transcode.VIDEO_MAX_FRAMES, transcode.VIDEO_MAX_SECONDS, isolated.DEFAULT_ITEM_TIMEOUT_S)
    image = parser.parse_args(["imagenet", "--root", "r", "--split", "train", "--out", "o", "--max-pixels", "1000",
                               "--item-timeout", "2.5"])  # fmt: skip
    assert (image.max_pixels, image.item_timeout) == (1000, 2.5)
    refused = {"--max-frames 0": "must be >= 1, got 0", "--max-seconds -1": "must be > 0, got -1",
               "--item-timeout 0": "must be > 0, got 0", "--item-timeout inf": "must be > 0, got inf",
               "--max-pixels many": "not an integer: 'many'"}  # fmt: skip
    for flag, message in refused.items():
        with pytest.raises(SystemExit):
            parser.parse_args(["kinetics", "--csv", "c", "--videos", "v", "--out", "o", *flag.split()])
        assert f"{flag.split()[0]}: {message}" in capsys.readouterr().err


# ---- the encoder child ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Misbehaving(ImageEncoder):
    """The real image encoder, made to sleep, crash or raise before it encodes (in the child)."""

    how: str = ""

    def encode_local(self, item: WorkItem, src: Any) -> Any:
        if self.how == "sleep":
            time.sleep(600)
        elif self.how == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif self.how == "raise":
            raise ZeroDivisionError("a bug in the encoder")
        return super().encode_local(item, src)


@pytest.fixture
def jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "ok.JPEG"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, format="JPEG")
    return path


@pytest.fixture
def child() -> Any:
    yield
    isolated.close()


def _child_pid() -> int:
    assert isolated._child is not None
    return isolated._child.process.pid


def test_an_encode_over_the_time_limit_is_stopped_and_rejected(jpeg: Path, child: None) -> None:
    """The child is killed at the limit (the work stops), the input is a reject, the next input gets a new child."""
    expected = isolated.encode(ImageEncoder(), _item(jpeg), {}, 60)
    first = _child_pid()
    started = time.monotonic()
    with pytest.raises(RejectError, match=r"^over the time limit: still encoding after 0\.\d s > --item-timeout 0\.5 \(stopped\)$"):
        isolated.encode(_Misbehaving(how="sleep"), _item(jpeg), {}, 0.5)
    assert time.monotonic() - started < 5
    assert not psutil.pid_exists(first), "the child that ran over the limit is gone (killed and reaped)"
    assert isolated.encode(ImageEncoder(), _item(jpeg), {}, 60) == expected
    assert _child_pid() != first


def test_a_crash_in_the_child_is_a_reject_saying_how_it_ended(jpeg: Path, child: None) -> None:
    with pytest.raises(RejectError, match=r"^the encoder process was killed by SIGSEGV while encoding this input$"):
        isolated.encode(_Misbehaving(how="segfault"), _item(jpeg), {}, 60)
    assert isolated.encode(ImageEncoder(), _item(jpeg), {}, 60).meta["width"] == 64


def test_a_bug_in_the_encoder_is_raised_not_rejected(jpeg: Path, child: None) -> None:
    with pytest.raises(RuntimeError, match=r"failed in the encoder process: Traceback(.|\n)*ZeroDivisionError: a bug"):
        isolated.encode(_Misbehaving(how="raise"), _item(jpeg), {}, 60)


def test_samples_from_the_child_equal_in_process_encodes(tmp_path: Path, jpeg: Path, child: None) -> None:
    clip = tmp_path / "clip.mp4"
    repeated_frame_video(clip, 20, 96, 64)
    for encoder, item in ((ImageEncoder(), _item(jpeg)), (VideoEncoder(short_side=32), _item(clip))):
        assert isolated.encode(encoder, item, {}, 60) == encoder.encode(item, {})


# ---- remote inputs -------------------------------------------------------------------------------


def test_a_remote_input_is_streamed_into_a_nameless_local_file(jpeg: Path, child: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Copied in chunks of FETCH_CHUNK_BYTES into a file without a name; encoded as the local file is, in the child too."""
    url = f"memory://caps-{os.getpid()}/ok.JPEG"
    fs = fsspec.filesystem("memory")
    fs.pipe(url, jpeg.read_bytes())
    reads: list[int] = []
    opened = fs.open

    def spy(path: str, mode: str = "rb", **kwargs: Any) -> Any:
        remote = opened(path, mode, **kwargs)
        read = remote.read
        remote.read = lambda n=-1: reads.append(n) or read(n)
        return remote

    monkeypatch.setattr(transcode, "FETCH_CHUNK_BYTES", 100)
    monkeypatch.setattr(fs, "open", spy)
    try:
        with open_input(_item(url), {}) as src:
            assert isinstance(src, io.BufferedRandom) and isinstance(src.name, int), "no name in the temp directory"
            assert src.read() == jpeg.read_bytes()
        assert reads and set(reads) == {100}
        local = ImageEncoder().encode(_item(jpeg), {})
        assert isolated.encode(ImageEncoder(), _item(url), {}, 60) == local
        with pytest.raises(RejectError, match="^missing: "):
            isolated.encode(ImageEncoder(), _item(url + ".gone"), {}, 60)
    finally:
        fs.rm(url)
