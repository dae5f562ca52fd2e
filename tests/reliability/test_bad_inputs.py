"""Bad inputs: every bad video, image, CSV row or damaged shard is rejected with a reason or handled
correctly, no run crashes, and every input is accounted for (``ledger``).

One Kinetics raw folder holds good synthetic clips plus every kind of bad file and bad CSV row; the
real CLI preprocesses it once (module fixture) and each case checks its own item. The shards it
writes then go once through the data service. ImageNet gets the same treatment with its image
quirks. Last, copies of the shards are damaged (a member cut off, a garbage payload, a manifest
sha256 that does not match) and both ``verify`` and the data service are run on them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from collections.abc import Callable
from csv import DictReader
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image
from preprocess_helpers import cli, shard_keys, shard_samples

from pipeline.data.loader import EpochStats
from pipeline.trainer.validation import check_epoch_counts, check_epoch_identity
from preprocessing.synth import SynthImageNet, SynthKinetics, synth_imagenet, synth_kinetics
from tests.data.data_helpers import epoch_through_service, small_config

WRITTEN = "written"
_SYNTH = SynthKinetics("", classes=2, per_class=2, val_per_class=0, seconds=1, fps=15, width=96, height=64, seed=3)
LABELS = [_SYNTH.label(c) for c in range(_SYNTH.classes)]


# ---- raw inputs ---------------------------------------------------------------------------------


def _pattern(width: int, height: int, i: int) -> np.ndarray:
    """Top half bright, bottom half dark, a red strip down the left edge, a moving grey bar: which
    way is up is visible in every frame."""
    frame = np.full((height, width, 3), 30, np.uint8)
    frame[: height // 2] = 230
    frame[:, : max(2, width // 12)] = (255, 0, 0)
    bar = (i * 3) % width
    frame[height // 2 :, bar : bar + 4] = 128
    return frame


def _write_video(path: Path, frames: int, width: int = 96, height: int = 64, rate: int = 15,
                 pts_ms: list[int] | None = None, rotation: int | None = None, faststart: bool = False) -> None:  # fmt: skip
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        stream.codec_context.thread_count = 1
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_pattern(width, height, i), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _truncated(faststart: bool) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        _write_video(path, 30, faststart=faststart)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return make


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=44100)
        stream.layout = "mono"
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


VFR_PTS_MS = [0, 40, 80, 200, 210, 220, 400, 440, 800, 810, 900, 1000, 1100, 1120, 1500]


@dataclass(frozen=True)
class Row:
    """One annotation CSV row of the matrix, the file it names (if any) and the expected outcome:
    WRITTEN, or a regex the reject reason must match."""

    case: str
    youtube_id: str
    expect: str
    make: Callable[[Path], None] | None = None
    start: str = "10"
    end: str = "11"
    label: str = LABELS[0]
    malformed: bool = False
    duplicate_of: str | None = None

    @property
    def clip_id(self) -> str:
        return f"{self.youtube_id}_{int(float(self.start)):06d}_{int(float(self.end)):06d}"


MATRIX = [
    Row("truncated_mp4", "truncMoov01", r"^(undecodable video: InvalidDataError|no video stream \(no streams at all)",
        _truncated(faststart=False)),
    Row("truncated_faststart_mp4", "truncMdat01", r"^undecodable video: InvalidDataError", _truncated(faststart=True)),
    Row("random_bytes", "randomBytes", r"^undecodable video: InvalidDataError", _random_bytes),
    Row("zero_length", "zeroLength1", r"^undecodable video: InvalidDataError", lambda p: p.write_bytes(b"")),
    Row("audio_only", "audioOnly01", r"^no video stream \(audio\)$", _audio_only),
    Row("one_frame", "oneFrame001", WRITTEN, lambda p: _write_video(p, 1), label=LABELS[1]),
    Row("shorter_than_a_clip", "shortClip01", WRITTEN, lambda p: _write_video(p, 5)),
    Row("huge_resolution", "hugeRes0001", WRITTEN, lambda p: _write_video(p, 3, 4096, 2160), label=LABELS[1]),
    Row("variable_frame_rate", "varFrameRte", WRITTEN, lambda p: _write_video(p, len(VFR_PTS_MS), pts_ms=VFR_PTS_MS)),
    Row("rotated_90", "rotated0090", WRITTEN, lambda p: _write_video(p, 10, rotation=-90), label=LABELS[1]),
    Row("unknown_label", "unknownLbl1", r"^label 'juggling chainsaws' is not in the class list",
        lambda p: _write_video(p, 15), label="juggling chainsaws"),
    Row("malformed_start", "badStart001", r"^malformed CSV row: time_start '12x' is not a number$", start="12x",
        malformed=True),
    Row("empty_end", "emptyEnd001", r"^malformed CSV row: time_end '' is not a number$", end="", malformed=True),
    Row("nan_start", "nanStart001", r"^malformed CSV row: time_start 'nan' is not a finite time", start="nan",
        malformed=True),
    Row("end_before_start", "endBefore01", r"^malformed CSV row: time_end 10 is before time_start 20$", start="20",
        end="10", malformed=True),
    Row("missing_file", "missingFile", r"^missing: no missingFile_000010_000011 or missingFile video"),
    Row("duplicate_row", "oneFrame001", r"^duplicate row: clip already listed", label=LABELS[1],
        duplicate_of="one_frame"),
]  # fmt: skip
BY_CASE = {row.case: row for row in MATRIX}


@dataclass(frozen=True)
class KineticsRun:
    raw: Path
    out: Path
    csv: Path
    ids: dict[int, str]  # CSV line -> input id for the ledger
    case_ids: dict[str, str]  # matrix case -> input id
    good: list[str]  # clip ids of the good synthetic rows
    summary: str
    manifest: dict[str, Any]
    rejects: list[dict[str, str]]
    samples: dict[str, tuple[dict[str, Any], bytes]]  # key -> (metadata, mp4)


@pytest.fixture(scope="module")
def kinetics_run(tmp_path_factory: pytest.TempPathFactory) -> KineticsRun:
    """The Kinetics matrix, preprocessed once by the real CLI (3 samples per shard)."""
    root = tmp_path_factory.mktemp("bad_kinetics")
    raw, out = root / "raw", root / "shards"
    synth_kinetics(SynthKinetics(str(raw), **{k: v for k, v in _SYNTH.__dict__.items() if k != "out"}))
    csv = raw / "annotations" / "train.csv"
    lines = csv.read_text().splitlines()
    good = [f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}" for r in DictReader(lines)]
    for row in MATRIX:
        if row.make is not None:
            row.make(raw / "train" / f"{row.clip_id}.mp4")
        lines.append(",".join([f'"{row.label}"', row.youtube_id, row.start, row.end, "train", "0"]))
    csv.write_text("\n".join(lines) + "\n")
    classes = root / "classes.txt"
    classes.write_text("\n".join(LABELS) + "\n")
    ids = {n + 2: clip for n, clip in enumerate(good)}  # line 1 is the header
    case_ids = {}
    for n, row in enumerate(MATRIX, start=len(good) + 2):
        ids[n] = case_ids[row.case] = (f"line {n}" if row.malformed else f"duplicate {row.clip_id}" if row.duplicate_of
                                       else row.clip_id)  # fmt: skip

    result = cli("kinetics", "--csv", str(csv), "--videos", str(raw / "train"), "--classes-from", str(classes),
                 "--out", str(out), "--short-side", "64", "--shard-samples", "3", "--shard-bytes", "0",
                 "--workers", "2", "--no-progress")  # fmt: skip
    samples = {}
    for path in sorted(out.glob("train-*.tar")):
        for key, parts in shard_samples(path):
            samples[key] = (json.loads(parts["json"]), parts["mp4"])
    rejects = [json.loads(line) for line in (out / "train.rejects.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "train.manifest.json").read_text())
    return KineticsRun(raw, out, csv, ids, case_ids, good, result.stdout, manifest, rejects, samples)


def _reject_id(run: KineticsRun, reject: dict[str, str]) -> str:
    """The ledger id of a rejects.jsonl entry: its CSV line, clip (file stem) or duplicate row."""
    source = reject["source"]
    if source.startswith(f"{run.csv}:"):
        return f"line {source.rsplit(':', 1)[1]}"
    if reject["reason"].startswith("duplicate row"):
        return f"duplicate {source}"
    return Path(source).stem if source.endswith(".mp4") else source


def _reason(run: KineticsRun, case: str) -> str | None:
    """The reject reason recorded for a case's CSV row (None if it was not rejected)."""
    found = [r["reason"] for r in run.rejects if _reject_id(run, r) == run.case_ids[case]]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_every_csv_row_is_written_or_rejected_with_a_reason(kinetics_run: KineticsRun, ledger: Any) -> None:
    """Kinetics matrix: the run completes; each CSV row is one sample or one reject with a reason"""
    run = kinetics_run
    rows = len(run.ids)
    written = len(run.good) + sum(r.expect == WRITTEN for r in MATRIX)
    assert f"{rows} inputs = {written} written + {rows - written} rejected" in run.summary
    assert all(r["reason"].strip() for r in run.rejects)
    ledger.account(inputs=list(run.ids.values()), delivered=list(run.samples), rejected=[_reject_id(run, r) for r in run.rejects])
    assert (run.manifest["num_inputs"], run.manifest["num_samples"]) == (rows, written)


@pytest.mark.parametrize("case", [r.case for r in MATRIX if r.expect != WRITTEN])
def test_bad_video_or_csv_row_is_rejected_with_its_reason(kinetics_run: KineticsRun, case: str) -> None:
    """Undecodable/audio-only files, unknown labels, malformed times, missing files, duplicates: rejected with the reason"""
    row = BY_CASE[case]
    reason = _reason(kinetics_run, case)
    assert reason is not None, f"{case}: not in rejects.jsonl"
    assert re.search(row.expect, reason), f"{case}: reason {reason!r} does not match {row.expect!r}"
    assert row.malformed or row.duplicate_of or row.clip_id not in kinetics_run.samples


def _decoded(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_one_frame_and_short_videos_keep_all_their_frames(kinetics_run: KineticsRun) -> None:
    """A 1-frame video and a 0.3 s video (shorter than one clip) are written with every frame"""
    for case, frames in (("one_frame", 1), ("shorter_than_a_clip", 5)):
        meta, data = kinetics_run.samples[BY_CASE[case].clip_id]
        assert meta["frames"] == frames and len(_decoded(data)) == frames, case
        assert (meta["width"], meta["height"]) == (96, 64) and meta["fps"] == 15.0


def test_huge_resolution_is_downscaled_to_the_short_side(kinetics_run: KineticsRun) -> None:
    """A 4096x2160 video is written at short side 64 (122x64), aspect kept"""
    meta, data = kinetics_run.samples[BY_CASE["huge_resolution"].clip_id]
    frames = _decoded(data)
    assert (meta["width"], meta["height"], meta["frames"]) == (122, 64, 3)
    assert frames[0].shape == (64, 122, 3)


def test_variable_frame_rate_keeps_every_frame_and_the_duration(kinetics_run: KineticsRun) -> None:
    """A variable-frame-rate video keeps every frame once, at its average rate, with its duration"""
    row = BY_CASE["variable_frame_rate"]
    with av.open(str(kinetics_run.raw / "train" / f"{row.clip_id}.mp4")) as source:
        stream = source.streams.video[0]
        duration = float(stream.duration * stream.time_base)  # as the container states it
    meta, data = kinetics_run.samples[row.clip_id]
    frames = len(VFR_PTS_MS)
    assert meta["frames"] == frames and len(_decoded(data)) == frames
    assert meta["fps"] == pytest.approx(frames / duration, rel=0.01)
    assert meta["duration"] == pytest.approx(duration, abs=1 / meta["fps"])


def test_rotated_video_is_stored_upright(kinetics_run: KineticsRun) -> None:
    """A video with a 90-degree display matrix is stored upright (rotation applied, no matrix left)"""
    meta, data = kinetics_run.samples[BY_CASE["rotated_90"].clip_id]
    assert (meta["width"], meta["height"]) == (64, 96), "stored 96x64 sideways, displayed 64x96"
    with av.open(io.BytesIO(data)) as container:
        frame = next(container.decode(video=0))
        assert frame.rotation == 0
        pixels = frame.to_ndarray(format="rgb24").astype(int)
    # Displayed turned clockwise: the bright top half is on the right, the red left strip at the top.
    assert pixels[:, 40:].mean() > 150 > 80 > pixels[:, :24].mean()
    top = pixels[:3].mean(axis=(0, 1))
    assert top[0] > 180 and top[1] < 80 and top[2] < 80


def test_data_service_delivers_every_written_sample_once(kinetics_run: KineticsRun, ray_cluster: None, ledger: Any) -> None:
    """The matrix's shards through the data service: every sample once, short videos clamped, none failed"""
    first_views, total, batches = epoch_through_service(kinetics_run.out)
    ledger.account(inputs=list(kinetics_run.samples), delivered=first_views, rejected=[k for k, _ in total.failures])
    assert total.complete and total.failed == 0 and total.samples == len(kinetics_run.samples)
    assert all(b["video"].shape[1:] == (3, 8, 48, 48) for b in batches)
    one_frame = [video for b in batches for vid, video in zip(b["video_id"], b["video"])
                 if vid == BY_CASE["one_frame"].clip_id]  # fmt: skip
    assert len(one_frame) == small_config("").augment.repeated_aug
    for clip in one_frame:  # clamped: the only frame, 8 times (the same augmentation on every frame)
        assert all((clip[:, t] == clip[:, 0]).all() for t in range(clip.shape[1]))


# ---- ImageNet -----------------------------------------------------------------------------------


def _base_image() -> np.ndarray:
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, :32] = (200, 30, 30)
    pixels[:, 32:] = (20, 40, 220)
    pixels[:8] = 240
    return pixels


def _save(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


IMAGE_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "cmyk": (lambda: _save(Image.fromarray(_base_image()).convert("CMYK"), "JPEG", quality=95), WRITTEN),
    "grayscale": (lambda: _save(Image.fromarray(_base_image()).convert("L"), "JPEG", quality=95), WRITTEN),
    "png_named_jpeg": (lambda: _save(Image.fromarray(_base_image()), "PNG"), WRITTEN),
    "truncated_jpeg": (lambda: (lambda data: data[: len(data) * 2 // 3])(_save(Image.fromarray(_base_image()), "JPEG")),
                       r"^undecodable image: OSError: (image file is truncated|Truncated File Read)"),
    "random_bytes": (lambda: np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
                     r"^undecodable image: UnidentifiedImageError"),
    "zero_length": (lambda: b"", r"^undecodable image: UnidentifiedImageError"),
    "decompression_bomb": (lambda: _save(Image.new("1", (10_000, 10_000)), "PNG"),
                           r"^decompression-bomb guard \(max_pixels=89478485\)"),
}  # fmt: skip


@dataclass(frozen=True)
class ImageNetRun:
    files: dict[str, Path]  # input id (file stem) -> file
    cases: dict[str, str]  # case -> input id
    rejects: dict[str, str]  # input id -> reason
    samples: dict[str, bytes]  # key -> jpg


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory: pytest.TempPathFactory) -> ImageNetRun:
    root = tmp_path_factory.mktemp("bad_imagenet")
    raw, out = root / "raw", root / "shards"
    synth_imagenet(SynthImageNet(str(raw), classes=2, per_class=3, val_per_class=1, quirks=False, size=64))
    wnid = (raw / "LOC_synset_mapping.txt").read_text().split()[0]
    cases = {}
    for case, (make, _) in IMAGE_CASES.items():
        cases[case] = f"{wnid}_{case}"
        (raw / "train" / wnid / f"{wnid}_{case}.JPEG").write_bytes(make())
    cli("imagenet", "--root", str(raw), "--split", "train", "--out", str(out), "--shard-samples", "4",
        "--shard-bytes", "0", "--workers", "2", "--no-progress")  # fmt: skip
    files = {p.stem: p for p in (raw / "train").rglob("*.JPEG")}
    rejects = {}
    for line in (out / "train.rejects.jsonl").read_text().splitlines():
        entry = json.loads(line)
        rejects[Path(entry["source"]).stem] = entry["reason"]
    samples = {key: parts["jpg"] for path in sorted(out.glob("train-*.tar")) for key, parts in shard_samples(path)}
    return ImageNetRun(files, cases, rejects, samples)


def test_every_image_is_written_or_rejected_with_a_reason(imagenet_run: ImageNetRun, ledger: Any) -> None:
    """ImageNet matrix: the run completes; each image file is one sample or one reject with a reason"""
    ledger.account(inputs=imagenet_run.files, delivered=list(imagenet_run.samples), rejected=list(imagenet_run.rejects))


@pytest.mark.parametrize("case", [c for c, (_, expect) in IMAGE_CASES.items() if expect == WRITTEN])
def test_image_quirk_is_converted_to_rgb_jpeg(imagenet_run: ImageNetRun, case: str) -> None:
    """CMYK, grayscale and PNG-named-.JPEG images become RGB JPEGs with the right colours"""
    data = imagenet_run.samples[imagenet_run.cases[case]]
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 48))
        pixels = np.asarray(image).astype(int)
    expected = _base_image().astype(int)
    if case == "grayscale":
        assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 2
        expected = np.asarray(Image.fromarray(_base_image()).convert("L").convert("RGB")).astype(int)
    assert np.abs(pixels - expected).mean() < 6, "colours changed (CMYK inverted or channels swapped?)"


@pytest.mark.parametrize("case", [c for c, (_, expect) in IMAGE_CASES.items() if expect != WRITTEN])
def test_bad_image_is_rejected_with_its_reason(imagenet_run: ImageNetRun, case: str) -> None:
    """Truncated, random-byte, empty and decompression-bomb images are rejected with the reason"""
    reason = imagenet_run.rejects.get(imagenet_run.cases[case])
    assert reason is not None and re.search(IMAGE_CASES[case][1], reason), reason


# ---- damaged shards -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DamagedSet:
    keys: dict[str, list[str]]  # shard -> sample keys in tar order (before the damage)
    roles: dict[str, str]  # "cut" | "garbage" | "sha" -> shard name
    verify_rc: int
    verify_out: str
    delivered: list[str]
    failures: dict[str, str]  # failed sample id -> error
    stats: EpochStats


def _member(path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


@pytest.fixture(scope="module")
def damaged_set(kinetics_run: KineticsRun, tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> DamagedSet:
    """A copy of the matrix's shards with one shard cut inside its second video, another's first video
    overwritten with noise, and a third's manifest sha256 changed; verified and read once."""
    root = tmp_path_factory.mktemp("damaged") / "shards"
    shutil.copytree(kinetics_run.out, root)
    keys = shard_keys(root, "train")
    cut_name = next(name for name, k in keys.items() if len(k) >= 2)
    garbage_name, sha_name = [name for name, k in keys.items() if k and name != cut_name][:2]
    cut = root / cut_name
    member = _member(cut, f"{keys[cut_name][1]}.mp4")
    cut.write_bytes(cut.read_bytes()[: member.offset_data + member.size // 2])
    garbage = root / garbage_name
    member = _member(garbage, f"{keys[garbage_name][0]}.mp4")
    data = bytearray(garbage.read_bytes())
    data[member.offset_data : member.offset_data + member.size] = bytes((i * 7919 + 13) % 251 for i in range(member.size))
    garbage.write_bytes(bytes(data))
    manifest_path = root / "train.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    next(s for s in manifest["shards"] if s["name"] == sha_name)["sha256"] = hashlib.sha256(b"another shard").hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2))

    verified = cli("verify", str(root), "--split", "train", "--decode", "100", check=False)
    delivered, total, _ = epoch_through_service(root)
    roles = {"cut": cut_name, "garbage": garbage_name, "sha": sha_name}
    return DamagedSet(keys, roles, verified.returncode, verified.stdout, delivered, dict(total.failures), total)


def _resolve(failed_id: str, keys: dict[str, list[str]]) -> str:
    """A failed sample's key; ``shard#i`` (a sample the reader never reached) -> the i-th key of that shard."""
    shard, hash_, index = failed_id.partition("#")
    return keys[shard][int(index)] if hash_ else failed_id


def test_shard_cut_inside_a_member_is_skipped_counted_and_named_by_verify(damaged_set: DamagedSet, ledger: Any) -> None:
    """Shard cut inside a member: samples before the cut delivered, the rest counted failed; verify names it"""
    d = damaged_set
    shard = d.roles["cut"]
    keys = d.keys[shard]
    assert d.verify_rc == 1
    assert re.search(rf"^FAIL train: {shard}: \d+ bytes, manifest says \d+$", d.verify_out, re.M)
    cut_member = rf"member '{keys[1]}\.\w+' claims \d+ bytes but the shard ends before them"
    assert re.search(rf"^FAIL train: {shard}: {cut_member}$", d.verify_out, re.M), d.verify_out
    failed = {_resolve(k, d.keys): e for k, e in d.failures.items() if _resolve(k, d.keys) in keys}
    assert [k for k in d.delivered if k in keys] == keys[:1], "the complete sample before the cut is delivered"
    assert sorted(failed) == sorted(keys[1:])
    assert re.search(cut_member, failed[keys[1]]), failed  # the sample cut is named with its member
    assert all("reading the shard stopped" in e for k, e in failed.items() if k != keys[1])
    ledger.account(inputs=keys, delivered=[k for k in d.delivered if k in keys], rejected=failed)


def test_garbage_payload_is_skipped_counted_and_named_by_verify(damaged_set: DamagedSet, ledger: Any) -> None:
    """A sample whose video is garbage: skipped and counted by the data service; verify names shard and sample"""
    d = damaged_set
    shard = d.roles["garbage"]
    keys, bad = d.keys[shard], d.keys[shard][0]
    assert re.search(rf"^FAIL train: {shard}/{bad}: does not decode", d.verify_out, re.M)
    assert re.search(rf"^FAIL train: {shard}: sha256 [0-9a-f]+ != manifest", d.verify_out, re.M)
    failed = [k for k in d.failures if k in keys]
    assert failed == [bad] and d.failures[bad]
    ledger.account(inputs=keys, delivered=[k for k in d.delivered if k in keys], rejected=failed)


def test_manifest_sha256_mismatch_fails_verify_and_the_service_reads_the_shard(damaged_set: DamagedSet, ledger: Any) -> None:
    """Shard bytes differ from the manifest sha256: verify fails naming the shard; the service does not hash, reads it"""
    d = damaged_set
    shard = d.roles["sha"]
    assert re.search(rf"^FAIL train: {shard}: sha256 [0-9a-f]+ != manifest [0-9a-f]+$", d.verify_out, re.M)
    assert f"{shard}: unreadable" not in d.verify_out and f"{shard}/" not in d.verify_out
    keys = d.keys[shard]
    ledger.account(inputs=keys, delivered=[k for k in d.delivered if k in keys])
    # The whole epoch: every sample of the set delivered once or counted as failed (cut shard's tail + garbage).
    assert d.stats.complete and d.stats.failed == len(d.keys[d.roles["cut"]]) - 1 + 1


# ---- a duplicate hiding a loss --------------------------------------------------------------------


def _swap_first_sample(target: Path, donor: Path) -> tuple[str, str]:
    """Rewrite ``target`` with its first sample replaced by ``donor``'s first (same key and bytes):
    one sample twice in the set, one gone, every count unchanged. Returns (duplicated, lost) keys."""
    with tarfile.open(donor) as tar:
        donor_members = tar.getmembers()
        dup_key = donor_members[0].name.split(".", 1)[0]
        incoming = [(m, tar.extractfile(m).read()) for m in donor_members if m.name.split(".", 1)[0] == dup_key]
    with tarfile.open(target) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    lost_key = members[0][0].name.split(".", 1)[0]
    kept = [(m, data) for m, data in members if m.name.split(".", 1)[0] != lost_key]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in incoming + kept:
            tar.addfile(member, io.BytesIO(data))
    target.write_bytes(out.getvalue())
    return dup_key, lost_key


def test_a_duplicated_sample_hiding_a_lost_one_is_caught_by_verify_and_by_the_epoch_check(
    kinetics_run: KineticsRun, tmp_path: Path, ray_cluster: None
) -> None:
    """One sample written twice and another not at all (counts, sizes and sha256 consistent): verify and the epoch identity check both catch it"""
    root = tmp_path / "shards"
    shutil.copytree(kinetics_run.out, root)
    keys = shard_keys(root, "train")
    target, donor = [name for name, k in keys.items() if k][:2]
    duplicated, lost = _swap_first_sample(root / target, root / donor)
    # The manifest is made consistent with the new bytes (as a buggy writer would leave it): only the
    # key digest still says which samples the shard should hold.
    manifest_path = root / "train.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = next(s for s in manifest["shards"] if s["name"] == target)
    entry["bytes"], entry["sha256"] = (root / target).stat().st_size, hashlib.sha256((root / target).read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2))

    verified = cli("verify", str(root), "--split", "train", check=False)
    assert verified.returncode == 1
    assert re.search(rf"^FAIL train: {target}: key digest [0-9a-f]{{16}} != manifest [0-9a-f]{{16}}", verified.stdout, re.M)

    delivered, total, _ = epoch_through_service(root)
    assert delivered.count(duplicated) == 2 and lost not in delivered
    assert total.complete and total.failed == 0, "the counts alone see nothing wrong"
    check_epoch_counts(total, "epoch 0")
    with pytest.raises(RuntimeError, match=r"epoch 0: the samples delivered are not the split's samples \(a sample was duplicated or lost\)"):
        check_epoch_identity(total, "epoch 0")
