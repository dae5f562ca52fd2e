"""Unit tests of the pieces: keys, sizes, planning, tar headers, encoders, storage helpers, manifest."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import av
import fsspec
import numpy as np
import pytest
from av.video.frame import PictureType
from PIL import Image

from preprocessing import isolated
from preprocessing.cli import parse_size
from preprocessing.items import Discovery, WorkItem, sanitize_key, unique_keys
from core.manifest import Manifest, ShardInfo, list_shard_urls, load_manifest
from preprocessing.parallel import ParallelConfig
from preprocessing.run import SplitJob, run_split
from preprocessing.shards import ShardingConfig, add_sample, plan_shards, seeded_order
from core.redact import redact_url
from core.s3 import storage_options_for
from core.storage import Store
from preprocessing.synth import SynthKinetics, synth_kinetics
from preprocessing.transcode import ImageEncoder, RejectError, VideoEncoder, even_scaled_size
from tests.preprocessing.churn import CHURN_ROUNDS, X264_OPTION, churn_clips, churn_encodes, odd_encodes


def _item(
    i: int, label_index: int = 0, size: int = 1000, segment: tuple[float, float] | None = None, precut: bool = True
) -> WorkItem:
    return WorkItem(f"k{i:04d}", f"/raw/{i}.mp4", f"id{i}", f"class{label_index}", label_index, size, segment,
                    precut=precut)


# ---- keys and sizes --------------------------------------------------------------------------


def test_keys_are_webdataset_safe_and_unique() -> None:
    assert sanitize_key("abc-_DEF123") == "abc-_DEF123"
    assert sanitize_key("../etc/pass.wd") == "___etc_pass_wd"
    long_key = sanitize_key("x" * 300)
    assert len(long_key) == 64 and "." not in long_key
    keys = unique_keys(["a.b", "a_b", "a/b", "plain"])
    assert len(set(keys.values())) == 4
    assert keys["plain"] == "plain"
    assert all("." not in k and "/" not in k for k in keys.values())
    # Independent of input order: the same id always gets the same key.
    assert unique_keys(["a_b", "plain", "a/b", "a.b"]) == keys


def test_parse_size() -> None:
    assert parse_size("1GB") == 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("250k") == 250_000
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("0") is None


# ---- planning --------------------------------------------------------------------------------


def test_plan_is_seeded_order_independent_and_mixes_classes() -> None:
    items = [_item(i, label_index=i // 10) for i in range(30)]  # grouped by class on input
    config = ShardingConfig(seed=7, shard_samples=10)
    plans = plan_shards(seeded_order(items, 7), "train", config, None)
    shuffled_input = plans == plan_shards(seeded_order(list(reversed(items)), 7), "train", config, None)
    assert shuffled_input, "the plan must not depend on listing order"
    assert [p.name for p in plans] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all(len({it.label_index for it in p.items}) > 1 for p in plans), "every shard mixes classes"
    assert sorted(it.key for p in plans for it in p.items) == sorted(it.key for it in items)
    other_seed = plan_shards(seeded_order(items, 8), "train", config, None)
    assert [p.items for p in other_seed] != [p.items for p in plans]


def test_plan_by_estimated_bytes() -> None:
    # 10-second clips at an estimated 1000 bytes/second -> 10 kB each; 35 kB target -> 3 per shard.
    items = [_item(i, segment=(0.0, 10.0)) for i in range(10)]
    plans = plan_shards(items, "val", ShardingConfig(shard_bytes=35_000), bytes_per_weight=1000.0)
    assert [len(p.items) for p in plans] == [3, 3, 3, 1]
    both = plan_shards(items, "val", ShardingConfig(shard_bytes=35_000, shard_samples=2), 1000.0)
    assert [len(p.items) for p in both] == [2, 2, 2, 2, 2]
    # An input larger than the target still gets a shard of its own.
    assert [len(p.items) for p in plan_shards(items[:2], "val", ShardingConfig(shard_bytes=5), 1000.0)] == [1, 1]



def test_uncut_videos_stored_whole_are_weighed_by_file_size_not_segment() -> None:
    """An uncut video kept whole is as long as its file, not as its 10 s segment: planning by the
    segment would put ~60x too many 10-minute videos in a shard."""
    clip = _item(0, size=5_000_000, segment=(30.0, 40.0))
    assert clip.weight == 10.0
    assert _item(1, size=5_000_000, segment=(30.0, 40.0), precut=False).weight == 5_000_000.0
    trimmed = WorkItem("k", "/raw/k.mp4", "k", "c", 0, 5_000_000, (30.0, 40.0), trim=True)
    assert trimmed.weight == 10.0


def test_sharding_config_needs_a_bound() -> None:
    with pytest.raises(ValueError):
        ShardingConfig(shard_bytes=None, shard_samples=None)


# ---- tar writing -----------------------------------------------------------------------------


def test_tar_members_have_fixed_headers_and_safe_names() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add_sample(tar, "clip_01", "mp4", b"\x00video", 3, {"label": "ä"})
        with pytest.raises(ValueError):
            add_sample(tar, "../evil", "mp4", b"", 0, {})
        with pytest.raises(ValueError):
            add_sample(tar, "a.b", "mp4", b"", 0, {})
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["clip_01.mp4", "clip_01.cls", "clip_01.json"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
        assert tar.extractfile("clip_01.cls").read() == b"3"
        assert json.loads(tar.extractfile("clip_01.json").read()) == {"label": "ä"}


# ---- encoders --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one_clip")
    synth_kinetics(SynthKinetics(str(root), classes=1, per_class=1, val_per_class=0, seconds=3, fps=10, width=90, height=60))
    return next((root / "train").iterdir())


def test_even_scaled_size() -> None:
    assert even_scaled_size(640, 360, 320) == (568, 320)
    assert even_scaled_size(360, 640, 320) == (320, 568)
    assert even_scaled_size(90, 60, 64) == (96, 64)


def test_video_transcode_is_deterministic_with_short_gop(one_clip: Path) -> None:
    encoder = VideoEncoder(short_side=48, gop=8)
    first = encoder.transcode(str(one_clip))
    second = encoder.transcode(str(one_clip))
    assert first[0] == second[0], "two encodes of the same input must be byte-identical"
    data, fps, frames, width, height = first
    assert (fps, frames, width, height) == (10, 30, 72, 48)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        keyframes = [i for i, f in enumerate(container.decode(stream)) if f.key_frame]
    assert keyframes[0] == 0 and all(b - a <= 8 for a, b in zip(keyframes, keyframes[1:] + [frames]))


@pytest.mark.slow
def test_video_transcode_is_deterministic_under_memory_churn(tmp_path: Path) -> None:
    """Regression test for x264's MB-tree asm reading uninitialised stack memory: with MB-tree on, some
    encodes of the same clip under memory churn came out different; the encoder settings (mbtree=0,
    checked in the option string x264 stores in the stream) must keep this at 0."""
    outputs = churn_encodes(churn_clips(tmp_path), CHURN_ROUNDS)
    assert all(X264_OPTION in data for encodes in outputs.values() for data in encodes), "x264 ran with MB-tree on"
    assert odd_encodes(outputs) == 0


def test_video_frame_types_are_chosen_by_x264_not_copied_from_the_source(one_clip: Path) -> None:
    """Regression: decoded frames carry their source frame type, which libx264 obeys if it is passed on.
    The synth source is P-frames only (x264 ultrafast); the output must have the B-frames of the
    tool's preset, as the ffmpeg CLI with the same settings gives (benchmarks/preprocess.py)."""

    def frame_types(data: bytes | str) -> set[str]:
        with av.open(io.BytesIO(data) if isinstance(data, bytes) else data) as container:
            return {PictureType(frame.pict_type).name for frame in container.decode(video=0)}

    assert frame_types(str(one_clip)) == {"I", "P"}
    assert "B" in frame_types(VideoEncoder(short_side=48).transcode(str(one_clip))[0])


def test_video_metadata_places_the_stored_video_in_source_time(one_clip: Path) -> None:
    """`trimmed` and `start_in_source` for the three ways a Kinetics video is stored."""
    encoder = VideoEncoder(short_side=48)
    base = WorkItem("k", str(one_clip), "id", "x", 0, one_clip.stat().st_size, segment=(1.0, 2.5))
    cases = {
        "pre-cut clip file": (dataclasses.replace(base, precut=True), True, 1.0, 30),
        "uncut, --trim": (dataclasses.replace(base, trim=True), True, 1.0, 15),
        "uncut, whole video kept": (base, False, 0.0, 30),
    }
    for case, (item, trimmed, start, frames) in cases.items():
        meta = encoder.encode(item, {}).meta
        assert meta["segment"] == [1.0, 2.5], case
        assert (meta["trimmed"], meta["start_in_source"], meta["frames"]) == (trimmed, start, frames), case


def test_video_trim_keeps_only_the_segment(one_clip: Path) -> None:
    data, fps, frames, _, _ = VideoEncoder(short_side=48).transcode(str(one_clip), segment=(1.0, 2.5))
    assert frames == 15  # frames at t = 1.0, 1.1, ..., 2.4
    with pytest.raises(RejectError, match="no frames"):
        VideoEncoder(short_side=48).transcode(str(one_clip), segment=(10.0, 12.0))


def test_video_garbage_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(RejectError, match="undecodable"):
        VideoEncoder().encode(WorkItem("bad", str(bad), "bad", "x", 0, 1100), {})


def test_storage_errors_fail_the_shard_but_vanished_inputs_are_rejects(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A flaky read must not silently drop a sample (a rerun would then differ); a missing file is data.
    Both in this process and through the encoder child the shard writer uses (the worker reads)."""
    item = WorkItem("x", "s3://bucket/x.JPEG", "x", "x", 0, 1)

    class Unreachable:
        def open(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("endpoint unreachable")

    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **options: (Unreachable(), url))
    for encode in (ImageEncoder().encode, lambda item, options: isolated.encode(ImageEncoder(), item, options, 60)):
        with pytest.raises(ConnectionError):
            encode(item, {})
    monkeypatch.undo()
    for encode in (ImageEncoder().encode, lambda item, options: isolated.encode(ImageEncoder(), item, options, 60)):
        with pytest.raises(RejectError, match="missing"):
            encode(WorkItem("x", str(tmp_path / "gone.JPEG"), "x", "x", 0, 1), {})
    isolated.close()


def _jpeg_bytes(mode: str) -> bytes:
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = (200, 30, 30)
    pixels[:, 30:] = (20, 40, 220)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "CMYK", "L"])
def test_image_modes_become_rgb_with_right_colours(mode: str) -> None:
    data, width, height = ImageEncoder().reencode(io.BytesIO(_jpeg_bytes(mode)))
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (width, height)) == ("JPEG", "RGB", (60, 40))
    left, right = np.asarray(image)[20, 10].astype(int), np.asarray(image)[20, 50].astype(int)
    if mode == "L":
        assert left[0] == left[1] == left[2]
    else:  # CMYK must not come back inverted or channel-swapped
        assert left[0] > 150 > left[2] and right[2] > 150 > right[0]


def test_image_png_transparency_and_bounded_side() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (300, 100), (0, 0, 0, 0)).save(buffer, format="PNG")
    data, width, height = ImageEncoder(max_side=120).reencode(io.BytesIO(buffer.getvalue()))
    image = Image.open(io.BytesIO(data))
    assert (width, height) == image.size == (120, 40)
    assert tuple(np.asarray(image)[20, 60]) == (255, 255, 255)


def test_image_decompression_bomb_and_truncation_are_rejected(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.JPEG"
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # 12 kB file, 100 Mpixel image
    assert bomb.stat().st_size < 50_000
    with pytest.raises(RejectError, match="decompression-bomb"):
        ImageEncoder().encode(WorkItem("bomb", str(bomb), "bomb", "x", 0, 1), {})
    truncated = tmp_path / "cut.JPEG"
    truncated.write_bytes(_jpeg_bytes("RGB")[:300])
    with pytest.raises(RejectError, match="undecodable image"):
        ImageEncoder().encode(WorkItem("cut", str(truncated), "cut", "x", 0, 1), {})


# ---- storage and manifest ----------------------------------------------------------------------


def test_storage_options_take_endpoint_from_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:9000")
    assert storage_options_for("s3://b/p")["endpoint_url"] == "http://env:9000"
    assert storage_options_for("s3://b/p", "http://flag:1")["endpoint_url"] == "http://flag:1"
    assert storage_options_for("/local/dir") == {}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")  # the retry policy travels with the options
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    assert storage_options_for("s3://b/p")["config_kwargs"] == {"retries": {"total_max_attempts": 7, "mode": "standard"}}
    assert redact_url("https://user:secret@host/x") == "https://***@host/x"


def test_store_writes_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    store.ensure_root()
    with pytest.raises(RuntimeError):
        with store.staged_file("a.tar") as f:
            f.write(b"partial")
            raise RuntimeError("worker died")
    assert store.size("a.tar") is None, "a failed write must not publish anything"
    store.write_bytes("a.tar", b"done")
    assert store.read_bytes("a.tar") == b"done"
    assert list((tmp_path / "out" / "_state" / "tmp").iterdir()) == []


def test_manifest_round_trip_and_shard_urls(tmp_path: Path) -> None:
    manifest = Manifest(
        dataset="kinetics",
        split="train",
        modality="video",
        classes=["a", "b"],
        num_inputs=3,
        num_samples=2,
        num_rejected=1,
        total_bytes=20,
        shards=[ShardInfo("train-000000.tar", 2, 20, "ab" * 32)],
        tool_version="0.1.0",
        settings={"encoder": {"gop": 16}},
        class_ids=["a", "b"],
    )
    (tmp_path / "train.manifest.json").write_text(manifest.to_json())
    assert json.loads(manifest.to_json())["format"] == "mvit-shards/1"
    assert load_manifest(str(tmp_path), "train") == manifest
    assert list_shard_urls(str(tmp_path), "train") == [f"{tmp_path}/train-000000.tar"]
    assert list_shard_urls(f"file://{tmp_path}/", "train") == [f"file://{tmp_path}/train-000000.tar"]
    with pytest.raises(ValueError):
        load_manifest(str(tmp_path), "../train")


# ---- calibration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CountingImageEncoder(ImageEncoder):
    """The real encoder, appending each input's key to `log` when it encodes it (in whichever process)."""

    log: str = ""

    def encode_local(self, item: WorkItem, src: Any) -> Any:
        with open(self.log, "a") as log:
            log.write(item.key + "\n")
        return super().encode_local(item, src)

    def calls(self) -> dict[str, int]:
        keys = Path(self.log).read_text().split()
        return {key: keys.count(key) for key in keys}


def test_inputs_encoded_to_estimate_shard_sizes_are_not_encoded_again(tmp_path: Path) -> None:
    """--shard-bytes first encodes a few inputs to measure the output rate; those outputs (and
    rejections) go into the shards as they are, so every input is encoded exactly once, and the
    result equals a run that never calibrated (shard sizes by count only, same cut)."""
    items = []
    for i in range(40):
        path = tmp_path / "raw" / f"img{i}.JPEG"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_jpeg_bytes("RGB") if i != 3 else b"not a jpeg")  # one reject among the calibrated
        items.append(WorkItem(f"img{i:03d}", str(path), f"img{i}", "c", 0, path.stat().st_size))
    discovery = Discovery(["c"], ["n0"], items)

    def run(out: str, sharding: ShardingConfig, encoder: ImageEncoder) -> Manifest:
        job = SplitJob("imagenet", "train", out, encoder, sharding)
        return run_split(job, discovery, ParallelConfig(workers=1, progress=False)).manifest

    counting = _CountingImageEncoder(log=str(tmp_path / "encoded.log"))
    by_bytes = run(str(tmp_path / "a"), ShardingConfig(seed=1, shard_bytes=10**9, shard_samples=None), counting)
    assert counting.calls() == {item.key: 1 for item in items}  # 32 while calibrating + 8 in the shard
    assert by_bytes.num_samples == 39 and by_bytes.num_rejected == 1
    by_count = run(str(tmp_path / "b"), ShardingConfig(seed=1, shard_bytes=None, shard_samples=100), ImageEncoder())
    assert by_count.shards == by_bytes.shards
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() == (tmp_path / "b" / "train-000000.tar").read_bytes()
    assert (tmp_path / "a" / "train.rejects.jsonl").read_bytes() == (tmp_path / "b" / "train.rejects.jsonl").read_bytes()


def test_every_preprocessing_process_scrubs_its_log_records(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI, its spawned workers, its Ray tasks and its encoder child each install core.redact's record
    factory where they start, so a secret in a log record of any of them is written as ***."""
    import logging
    import sys

    from preprocessing import cli, parallel

    secret = "ghp_" + "a1B2c3D4" * 4 + "e5F6"
    default = logging.getLogRecordFactory()
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    entries = {
        "worker process": lambda: parallel._init_worker(None),
        "Ray task": lambda: parallel._call_in_ray_task(lambda job, progress: job, 1, None),
        "CLI": lambda: cli.main(["verify", str(tmp_path / "nothing"), "--split", "train"]),
    }
    try:
        for name, enter in entries.items():
            logging.setLogRecordFactory(logging.LogRecord)
            enter()
            record = logging.getLogger("preprocessing").makeRecord("preprocessing", logging.WARNING, __file__, 1,
                                                                   "pushing with %s", (secret,), None)  # fmt: skip
            assert secret not in record.getMessage() and "***" in record.getMessage(), name
    finally:
        logging.setLogRecordFactory(default)
    main = Path(isolated.__file__).read_text().split('if __name__ == "__main__":', 1)[1]
    assert "install_redaction()" in main  # the encoder child, before it serves a request
