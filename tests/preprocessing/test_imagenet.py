"""ImageNet end to end through the real CLI: label sources, quirky inputs, rejects, bounded side."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image
from shard_helpers import read_manifest, read_rejects, read_samples, run_cli

from core.manifest import list_shard_urls


def _synsets(raw: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in (raw / "LOC_synset_mapping.txt").read_text().splitlines())


def test_train_end_to_end_with_quirks_and_rejects(imagenet_raw: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(imagenet_raw, raw)
    wnid = sorted(p.name for p in (raw / "train").iterdir())[1]
    Image.new("1", (10_000, 10_000)).save(raw / "train" / wnid / f"{wnid}_bomb.JPEG", format="PNG")  # 100 Mpixel
    out = tmp_path / "shards"
    run_cli("imagenet", "--root", str(raw), "--split", "train", "--out", str(out), "--max-side", "64",
            "--shard-samples", "5", "--no-progress")  # fmt: skip

    manifest = read_manifest(out, "train")
    synsets = _synsets(raw)
    assert manifest["class_ids"] == sorted(synsets), "class index = sorted wnids"
    assert manifest["classes"] == [synsets[w] for w in sorted(synsets)], "names from LOC_synset_mapping.txt"
    assert (manifest["num_inputs"], manifest["num_samples"], manifest["num_rejected"]) == (14, 12, 2)
    reasons = {Path(r["source"]).name: r["reason"] for r in read_rejects(out, "train")}
    assert reasons[f"{wnid}_bomb.JPEG"].startswith("decompression-bomb guard")
    assert any(r.startswith("undecodable image") for name, r in reasons.items() if "bomb" not in name)

    samples = read_samples(list_shard_urls(str(out), "train"))
    assert len(samples) == 12
    for sample in samples:
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert (image.format, image.mode) == ("JPEG", "RGB")  # CMYK, grayscale and PNG inputs converted
        assert max(image.size) <= 64 and image.size == (sample["json"]["width"], sample["json"]["height"])
        assert set(sample["json"]) == {"label", "source_id", "width", "height"}
        class_wnid = manifest["class_ids"][sample["cls"]]
        assert sample["json"]["source_id"].startswith(class_wnid)
        assert sample["json"]["label"] == manifest["classes"][sample["cls"]]
    assert run_cli("verify", str(out), "--split", "train", "--decode", "5").returncode == 0


def _val_labels(out: Path) -> dict[str, int]:
    return {s["__key__"]: s["cls"] for s in read_samples(list_shard_urls(str(out), "val"))}


def test_val_labels_from_solution_csv_devkit_or_class_folders(imagenet_raw: Path, tmp_path: Path) -> None:
    by_csv, by_devkit, by_folders = tmp_path / "csv", tmp_path / "devkit", tmp_path / "folders"
    run_cli("imagenet", "--root", str(imagenet_raw), "--split", "val", "--out", str(by_csv), "--no-progress")

    # Devkit only: no LOC files at all, names come from meta.mat.
    devkit_root = tmp_path / "devkit_root"
    shutil.copytree(imagenet_raw / "val", devkit_root / "val")
    devkit = devkit_root / "ILSVRC2012_devkit_t12"
    shutil.copytree(imagenet_raw / "ILSVRC2012_devkit_t12", devkit)
    run_cli("imagenet", "--root", str(devkit_root), "--split", "val", "--devkit", str(devkit), "--out", str(by_devkit), "--no-progress")

    # Val re-arranged into class folders (no label file needed), class list from train/ folder names.
    folders_root = tmp_path / "folders_root"
    shutil.copytree(imagenet_raw / "train", folders_root / "train")
    solution = (imagenet_raw / "LOC_val_solution.csv").read_text().splitlines()[1:]
    for line in solution:
        image_id, prediction = line.split(",")
        (folders_root / "val" / prediction.split()[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(imagenet_raw / "val" / f"{image_id}.JPEG", folders_root / "val" / prediction.split()[0])
    run_cli("imagenet", "--root", str(folders_root), "--split", "val", "--out", str(by_folders), "--no-progress")

    expected = _val_labels(by_csv)
    assert len(expected) == 6
    assert _val_labels(by_devkit) == expected == _val_labels(by_folders)
    csv_manifest, devkit_manifest = read_manifest(by_csv, "val"), read_manifest(by_devkit, "val")
    assert devkit_manifest["class_ids"] == csv_manifest["class_ids"]
    assert devkit_manifest["classes"] == csv_manifest["classes"]  # synth writes the same names to both
    assert read_manifest(by_folders, "val")["classes"] == csv_manifest["class_ids"]  # no names given: wnids


def test_flat_val_without_labels_is_an_error(imagenet_raw: Path, tmp_path: Path) -> None:
    shutil.copytree(imagenet_raw / "val", tmp_path / "raw" / "val")
    result = run_cli("imagenet", "--root", str(tmp_path / "raw"), "--split", "val", "--out", str(tmp_path / "o"), check=False)
    assert result.returncode != 0 and "--val-labels" in result.stderr
