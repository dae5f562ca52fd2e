"""Hostile bytes inside a shard set: tar members that claim more than they hold or than any sample is,
members that are no files, a compressed shard, media whose metadata lies, frames and images too big to
decode. Each becomes a FAILED sample by name (or a verify finding), never an allocation of what it claims.

The shard sets are copies of the suite's ``reliability_shards`` (made by the real preprocessing CLI) with
one shard replaced the way an attacker who cannot rewrite the manifest would replace it. Sizes are the
findings' where a crafted header costs nothing (a sparse member claiming 1 GiB), and scaled down where
real bytes must be made (the gzip bomb, the oversized frame) while the bound is what is tested. Memory is
measured where it is the risk: tracemalloc's peak for the reader (Python bytes), the process's RSS for a
decode (Decord and Pillow allocate outside Python).
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil
import pytest
from preprocess_helpers import cli

from pipeline.data.plan import FAILED, OK
from tests.data.data_helpers import decoder_batch, decoder_row, first_sample, small_config
from tests.preprocessing.crafted import huge_png

_ONE_GIB = 1 << 30
_BOMB_BYTES = 64 << 20  # the finding's bomb inflated to 1 GiB: 64 MiB of zeros is the same shape, cheaper to make


def _samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """A shard's samples, key -> extension -> bytes, in tar order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields: Any) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for field, value in fields.items():
        setattr(info, field, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def _crafted_members(samples: dict[str, dict[str, bytes]], cap: int) -> bytes:
    """The shard's 4 samples, each with its media member made hostile: sparse (claiming 1 GiB from 512
    stored bytes), a symbolic link to /etc/passwd, a character device (/dev/zero's numbers), and a real
    regular member twice the shard's cap."""
    keys = list(samples)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key in keys:
            for ext in ("mp4", "cls", "json"):
                name, data = f"{key}.{ext}", samples[key][ext]
                if ext != "mp4":
                    _add(tar, name, data)
                elif key == keys[0]:
                    _add(tar, name, bytes(512), pax_headers={"GNU.sparse.size": str(_ONE_GIB), "GNU.sparse.map": "0,512"})
                elif key == keys[1]:
                    _add(tar, name, type=tarfile.SYMTYPE, linkname="/etc/passwd")
                elif key == keys[2]:
                    _add(tar, name, type=tarfile.CHRTYPE, devmajor=1, devminor=5)
                else:
                    _add(tar, name, np.random.default_rng(0).bytes(2 * cap))
    return out.getvalue()


def _gzip_bomb(samples: dict[str, dict[str, bytes]]) -> bytes:
    """The shard's samples in a gzip-compressed tar whose first member is 64 MiB of zeros (64 KiB packed)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as packed:
        with tarfile.open(fileobj=packed, mode="w|") as tar:
            info = tarfile.TarInfo("zeros.mp4")
            info.size = _BOMB_BYTES
            tar.addfile(info, _Zeros(_BOMB_BYTES))
            for key, parts in samples.items():
                for ext, data in parts.items():
                    _add(tar, f"{key}.{ext}", data)
    return out.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


@pytest.fixture
def hostile_set(reliability_shards: Path, tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """A copy of the set whose 3 train shards are replaced (their manifest entries kept, as an attacker
    who cannot sign a manifest would leave them): crafted members, cut inside a member, gzip bomb.
    Returns the set and each shard's keys."""
    from core.manifest import load_manifest
    from core.tar_members import member_cap

    root = tmp_path / "shards"
    shutil.copytree(reliability_shards, root)
    manifest = load_manifest(str(root), "train")
    assert [s.samples for s in manifest.shards] == [4, 4, 4]
    keys: dict[str, list[str]] = {}
    for entry in manifest.shards:
        path = root / entry.name
        samples = _samples(path)
        keys[entry.name] = list(samples)
        if entry.name.endswith("0.tar"):
            path.write_bytes(_crafted_members(samples, member_cap(entry.bytes, entry.samples)))
        elif entry.name.endswith("1.tar"):
            data = path.read_bytes()
            second = keys[entry.name][1]
            cut = data.index(samples[second]["mp4"]) + len(samples[second]["mp4"]) // 2  # inside its media
            path.write_bytes(data[:cut])
        else:
            path.write_bytes(_gzip_bomb(samples))
    return root, keys


def test_hostile_shard_members_are_failed_by_name_and_never_held(hostile_set: tuple[Path, dict[str, list[str]]],
                                                                  ray_cluster: None, ledger: Any) -> None:  # fmt: skip
    """Sparse, link, device and oversized members, a member cut short and a gzip bomb: each sample FAILED by name, the reader's peak under 32 MiB for 1 GiB + 64 MiB claimed."""
    from pipeline.data.plan import ShardRef
    from pipeline.data.source import _exactly
    from pipeline.trainer.validation import check_epoch_counts
    from tests.data.data_helpers import epoch_through_service

    root, keys = hostile_set
    crafted, cut, bomb = (keys[f"train-00000{i}.tar"] for i in range(3))

    # The reader itself, in this process, under tracemalloc: what each shard costs to read.
    from core.manifest import load_manifest
    from core.tar_members import member_cap

    manifest = load_manifest(str(root), "train")
    tracemalloc.start()
    try:
        rows = [row for entry in manifest.shards for row in _exactly(
            ShardRef(str(root / entry.name), entry.samples, member_cap(entry.bytes, entry.samples)), "mp4", 3, {})]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"reading the hostile shards peaked at {peak / 2**20:.1f} MiB"
    assert len(rows) == 12 and sum(row["kind"] == 0 for row in rows) == 1  # cut's first sample only

    delivered, total, _ = epoch_through_service(root)
    failed = dict(total.failures)
    assert delivered == [cut[0]]
    assert "is sparse (it would expand to 1073741824 bytes)" in failed[crafted[0]], failed
    assert "is a symbolic link" in failed[crafted[1]] and "is a device" in failed[crafted[2]], failed
    assert "over the cap of" in failed[crafted[3]], failed
    assert "claims" in failed[cut[1]] and "the shard ends before them" in failed[cut[1]], failed
    missing_cut = [f"train-000001.tar#{i}" for i in (2, 3)]
    missing_bomb = [f"train-000002.tar#{i}" for i in range(4)]
    for name in missing_cut:
        assert "reading the shard stopped: ShardTruncatedError" in failed[name], failed
    for name in missing_bomb:
        assert "the shard is gzip-compressed" in failed[name], failed
    # 1 delivered + 11 FAILED of 12. Samples never read have no key the reader could see (their rows are
    # named shard#index), so the epoch is checked by its counts; its key identity cannot be.
    assert (total.samples, total.failed, total.expected) == (1, 11, 12), total
    check_epoch_counts(total, "epoch 0")
    # Every input accounted for: by key where the reader saw one, by position where it could not.
    inputs = [k for k in crafted + cut[:2]] + missing_cut + missing_bomb
    ledger.account(inputs=inputs, delivered=delivered, rejected=failed)

    verified = cli("verify", str(root), "--split", "train", check=False)
    assert verified.returncode == 1
    for finding in (f"train-000000.tar: member '{crafted[0]}.mp4' is sparse", f"member '{crafted[1]}.mp4' is a symbolic link",
                    f"member '{crafted[2]}.mp4' is a device", f"member '{crafted[3]}.mp4' claims",
                    f"train-000001.tar: member '{cut[1]}.mp4' claims", "the shard ends before them",
                    "train-000002.tar: unreadable tar: ShardFormatError: the shard is gzip-compressed"):  # fmt: skip
        assert finding in verified.stdout, (finding, verified.stdout)


# ---- the stream is the truth ----------------------------------------------------------------------------------


def _h264(width: int, height: int, frames: int) -> bytes:
    """A real H.264 MP4 of dark frames: a large picture in few bytes, as the 198 KB 8192x8192 finding."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=15)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(frames):
            picture = np.full((height, width, 3), 16 + i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def _rss_growth(decode: Any) -> int:
    """How much this process's RSS grew over ``decode()`` (Decord and Pillow allocate outside Python)."""
    before = psutil.Process().memory_info().rss
    decode()
    return psutil.Process().memory_info().rss - before


def test_media_whose_metadata_disagrees_with_the_stream_is_failed(reliability_shards: Path, ledger: Any) -> None:
    """Metadata claiming 20000x20 for a 96x72 clip, or another frame count: FAILED naming both, and the decode is sized by the stream."""
    from pipeline.data.decode import Decoder
    from pipeline.data.sample_decode import SampleDecoder

    key, data, meta = first_sample(reliability_shards)
    assert (meta["width"], meta["height"]) == (96, 72)
    cfg = small_config(str(reliability_shards))
    wide = {**meta, "width": 20000, "height": 20}
    miscounted = {**meta, "frames": meta["frames"] * 100}
    rows = [decoder_row("true", data, meta), decoder_row("wide", data, wide), decoder_row("miscounted", data, miscounted)]
    decoder = Decoder(cfg, "video", train=True)  # decodes in its child process, as in a job
    try:
        out = decoder(decoder_batch(rows))
    finally:
        del decoder
    views = len(out["status"]) // 3
    assert out["status"].tolist() == [OK] * views + [FAILED] * 2 * views, out["error"]
    errors = dict(zip(out["video_id"].tolist(), out["error"].tolist()))
    assert "metadata says 20000x20, the stream is 96x72" in errors["wide"], errors
    assert f"metadata says {meta['frames'] * 100} frames, the stream has {meta['frames']}" in errors["miscounted"]
    ledger.account(inputs=["true", "wide", "miscounted"], delivered=["true"],
                   rejected={k: errors[k] for k in ("wide", "miscounted")})  # fmt: skip
    # in this process: the lie costs nothing (the finding: Decord built 224000x224 frames and aborted)
    local = SampleDecoder(cfg, "video", train=True)
    with pytest.raises(ValueError, match="metadata says 20000x20"):
        local.decode(data, wide, "wide", 0)
    growth = _rss_growth(lambda: pytest.raises(ValueError, local.decode, data, wide, "wide", 0))
    assert growth < 16 << 20, f"refusing the sample grew RSS by {growth / 2**20:.0f} MiB"


def test_frames_over_the_pixel_caps_are_refused_before_decoding(tmp_path: Path, ledger: Any) -> None:
    """A 2560x2560 H.264 of a few hundred KB over decoder.max_frame_pixels, and a sample over max_decoded_pixels: FAILED with the figures, RSS under 24 MiB where a decode needs 150+."""
    from pipeline.data.decode import Decoder
    from pipeline.data.sample_decode import SampleDecoder

    data = _h264(2560, 2560, 16)
    assert len(data) < 512 << 10, len(data)  # 16 frames of 6.5 Mpx in a few hundred KB: the finding's shape
    meta = {"width": 2560, "height": 2560, "fps": 15.0, "frames": 16}
    cfg = small_config(str(tmp_path))
    cfg.decoder.max_frame_pixels = 1024 * 1024  # the default (4096^2) scaled down with the clip
    local = SampleDecoder(cfg, "video", train=False)
    growth = _rss_growth(lambda: pytest.raises(ValueError, local.decode, data, meta, "big", 0))
    assert growth < 24 << 20, f"refusing the frame grew RSS by {growth / 2**20:.0f} MiB"
    with pytest.raises(ValueError, match=r"2560x2560 = 6553600 pixels, over data.decoder.max_frame_pixels=1048576"):
        local.decode(data, meta, "big", 0)

    small = _h264(128, 96, 16)
    small_meta = {"width": 128, "height": 96, "fps": 15.0, "frames": 16}
    cfg.decoder.max_decoded_pixels = 10_000  # under one 48 px eval view's frames
    decoder = Decoder(cfg, "video", train=False)
    try:
        out = decoder(decoder_batch([decoder_row("big", data, meta), decoder_row("many", small, small_meta)]))
    finally:
        del decoder
    assert set(out["status"].tolist()) == {FAILED}
    errors = dict(zip(out["video_id"].tolist(), out["error"].tolist()))
    assert "over data.decoder.max_frame_pixels=1048576: not decoded" in errors["big"], errors
    assert "frames of 64x48" in errors["many"] and "over data.decoder.max_decoded_pixels=10000" in errors["many"]
    ledger.account(inputs=["big", "many"], delivered=[], rejected=errors)


@pytest.mark.parametrize("side", [12000, 9000])
def test_an_image_over_the_pixel_cap_is_refused_before_decoding(tmp_path: Path, side: int, ledger: Any) -> None:
    """A PNG named .jpg of 12000^2 (over Pillow's warning) or 9000^2 (under it, over decoder.max_image_pixels): FAILED as an error, RSS under 24 MiB."""
    from pipeline.data.decode import Decoder
    from pipeline.data.sample_decode import SampleDecoder

    data = huge_png(side, side)
    meta = {"width": side, "height": side}
    cfg = small_config(str(tmp_path))
    local = SampleDecoder(cfg, "image", train=False)
    growth = _rss_growth(lambda: pytest.raises(Exception, local.decode, data, meta, "huge.jpg", 0))
    assert growth < 24 << 20, f"refusing the image grew RSS by {growth / 2**20:.0f} MiB (RGB would be {3 * side * side >> 20})"
    decoder = Decoder(cfg, "image", train=False)
    try:
        out = decoder(decoder_batch([decoder_row("huge", data, meta)]))
    finally:
        del decoder
    assert out["status"].tolist() == [FAILED]
    error = out["error"][0]
    if side * side > 89_478_485:  # over Pillow's own limit, which only warned: now an error, raised first
        assert "DecompressionBomb" in error, error
    else:
        assert f"{side}x{side} = {side * side} pixels, over data.decoder.max_image_pixels" in error, error
    ledger.account(inputs=["huge"], delivered=[], rejected={"huge": error})
