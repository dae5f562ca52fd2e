"""Kinetics end to end through the real CLI: layouts, rejects, sample format, decodability."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import av
import decord
import numpy as np
import pytest
from shard_helpers import read_manifest, read_rejects, read_samples, run_cli

from preprocessing import kinetics
from core.manifest import list_shard_urls


def _kinetics(raw: Path, out: Path, *extra: str, csv_name: str = "train.csv", videos: str = "train") -> None:
    run_cli(
        "kinetics", "--csv", str(raw / "annotations" / csv_name), "--videos", str(raw / videos), "--out", str(out),
        "--short-side", "64", "--no-progress", *extra,
    )  # fmt: skip


def test_flat_layout_end_to_end(kinetics_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _kinetics(kinetics_raw, out, "--shard-samples", "3", "--workers", "2")
    manifest = read_manifest(out, "train")
    rows = list(csv.DictReader((kinetics_raw / "annotations" / "train.csv").open()))

    assert manifest["format"] == "mvit-shards/1"
    assert (manifest["dataset"], manifest["split"], manifest["modality"]) == ("kinetics", "train", "video")
    assert manifest["classes"] == sorted({r["label"] for r in rows})
    assert manifest["num_inputs"] == len(rows) == 10
    assert (manifest["num_samples"], manifest["num_rejected"]) == (8, 2)
    assert [s["samples"] for s in manifest["shards"]] == [3, 2, 3]  # a reject made one shard smaller
    assert manifest["settings"]["encoder"]["gop"] == 16 and manifest["settings"]["encoder"]["short_side"] == 64

    reasons = sorted(r["reason"].split(":")[0] for r in read_rejects(out, "train"))
    assert reasons == ["missing", "undecodable video"]

    samples = read_samples(list_shard_urls(str(out), "train"))
    assert len(samples) == 8 and len({s["__key__"] for s in samples}) == 8
    by_clip = {f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}": r for r in rows}
    for sample in samples:
        meta, row = sample["json"], by_clip[sample["__key__"]]
        assert set(sample) >= {"mp4", "cls", "json"}
        assert manifest["classes"][sample["cls"]] == meta["label"] == row["label"]
        assert meta["source_id"] == row["youtube_id"]
        assert meta["segment"] == [float(row["time_start"]), float(row["time_end"])]
        assert meta["trimmed"] is True and meta["start_in_source"] == meta["segment"][0]  # a pre-cut clip file
        assert (meta["fps"], meta["frames"], meta["duration"]) == (15.0, 30, 2.0)
        assert (meta["width"], meta["height"]) == (96, 64)
    _check_decodes_like_the_loader(samples[0])
    # Shards were filled in a seeded random order, not class by class.
    shard_classes = [{s["cls"] for s in read_samples([url])} for url in list_shard_urls(str(out), "train")]
    assert any(len(classes) > 1 for classes in shard_classes)


def _check_decodes_like_the_loader(sample: dict) -> None:
    """PyAV sees H.264 with keyframes every <= 16 frames; Decord (the loader's decoder) agrees."""
    with av.open(io.BytesIO(sample["mp4"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        keyframes = [i for i, frame in enumerate(container.decode(stream)) if frame.key_frame]
    assert keyframes == [0, 16]
    reader = decord.VideoReader(io.BytesIO(sample["mp4"]))
    assert len(reader) == sample["json"]["frames"]
    assert reader.get_avg_fps() == pytest.approx(sample["json"]["fps"])
    assert reader[20].shape == (64, 96, 3)


def test_per_class_layout_and_validate_csv(kinetics_per_class: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _kinetics(kinetics_per_class, out, "--shard-samples", "2", csv_name="train.csv", videos="train")
    _kinetics(kinetics_per_class, out, csv_name="validate.csv", videos="val")  # split name comes from the CSV
    train, val = read_manifest(out, "train"), read_manifest(out, "val")
    assert (train["num_samples"], val["num_samples"]) == (9, 3)
    assert val["classes"] == train["classes"], "val must use train.csv's class indices"
    assert len(val["shards"]) == 1  # default 1 GB byte target
    for sample in read_samples(list_shard_urls(str(out), "val")):
        assert val["classes"][sample["cls"]] == sample["json"]["label"]


def test_full_videos_are_trimmed_to_the_segment(kinetics_full_videos: Path, tmp_path: Path) -> None:
    """Uncut videos, with and without --trim: the metadata says which, and locates the action either way."""
    out = tmp_path / "shards"
    _kinetics(kinetics_full_videos, out, "--trim", csv_name="validate.csv", videos="val")
    samples = read_samples(list_shard_urls(str(out), "val"))
    assert len(samples) == 3
    for sample in samples:
        meta = sample["json"]
        start, end = meta["segment"]
        assert start >= 1 and end - start == 2
        assert meta["frames"] == 30  # only the 2 s segment of a 2 + 2 * start second video
        assert meta["trimmed"] is True and meta["start_in_source"] == start
        assert _moving_frames(sample["mp4"]) == _segment_frames(meta) == set(range(1, 30))
    untrimmed = tmp_path / "untrimmed"
    _kinetics(kinetics_full_videos, untrimmed, csv_name="validate.csv", videos="val")
    samples = read_samples(list_shard_urls(str(untrimmed), "val"))
    assert len(samples) == 3
    for sample in samples:
        meta = sample["json"]
        assert meta["frames"] == (2 * meta["segment"][0] + 2) * 15  # the whole source video
        # `segment` is still the annotated one, in source time; the stored video starts at source time 0.
        assert meta["trimmed"] is False and meta["start_in_source"] == 0.0
        assert _moving_frames(sample["mp4"]) == _segment_frames(meta)  # the action is where the metadata says


def _segment_frames(meta: dict) -> set[int]:
    """Indices of the stored frames inside the annotated segment, computed from the metadata alone
    (frame 0 excluded: `_moving_frames` compares each frame with the one before)."""
    first, end = (round((t - meta["start_in_source"]) * meta["fps"]) for t in meta["segment"])
    return set(range(max(first, 1), end))


def _moving_frames(mp4: bytes) -> set[int]:
    """Indices of frames where the synthetic object moved since the previous frame. The synth videos
    hold it still outside the annotated segment; a move changes some pixels by > 80 grey levels, x264
    noise on a still picture by < 45 (measured), hence the threshold."""
    with av.open(io.BytesIO(mp4)) as container:
        grey = [frame.to_ndarray(format="gray").astype(np.int16) for frame in container.decode(video=0)]
    return {i for i in range(1, len(grey)) if np.abs(grey[i] - grey[i - 1]).max() > 60}


def test_unlabeled_test_csv_and_unknown_labels(kinetics_raw: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader((kinetics_raw / "annotations" / "validate.csv").open()))
    test_csv = tmp_path / "test.csv"
    with test_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["youtube_id", "time_start", "time_end", "split"])
        writer.writerows([r["youtube_id"], r["time_start"], r["time_end"], "test"] for r in rows)
    source = kinetics.KineticsSource(str(test_csv), str(kinetics_raw / "val"), str(kinetics_raw / "annotations" / "train.csv"))
    found = kinetics.discover(source)
    assert len(found.items) == 3 and {i.label_index for i in found.items} == {-1}
    assert kinetics.default_split(kinetics.read_annotations(str(test_csv)), str(test_csv)) == "test"

    relabelled = tmp_path / "validate.csv"
    relabelled.write_text((kinetics_raw / "annotations" / "validate.csv").read_text().replace("disk heading", "blob heading"))
    found = kinetics.discover(kinetics.KineticsSource(str(relabelled), str(kinetics_raw / "val"), source.classes_from))
    assert [r.reason.split(" is not")[0] for r in found.rejects] == ["label 'blob heading 000.0 degrees'"]
    assert found.num_inputs == 3
