"""Something-Something v2: the release layout read (labels through templates, official indices, rejects, the
unlabelled test split), synth ssv2 -> preprocessing ssv2 -> verify through the real CLI, check_release on a
good and a damaged tree, and the commands' help. Tiny videos (64x48, 2 s at 8 fps) keep it quick."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import av
import decord
import pytest
from shard_helpers import read_manifest, read_rejects, read_samples, run_cli

from core.manifest import UNLABELED, list_shard_urls
from preprocessing import ssv2
from preprocessing.synth import SSV2_TEMPLATES, SynthSsv2, synth_ssv2

SMALL = dict(classes=4, per_class=2, val_per_class=1, test=2, size=(64, 48), seconds=2, fps=8)
LABELS = "labels/" + ssv2.LABELS_FILE


def _json(path: Path) -> object:
    return json.loads(path.read_text())


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=1))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic release with one train record without a video and one train video that does not decode."""
    root = tmp_path_factory.mktemp("ssv2_raw")
    synth_ssv2(SynthSsv2(str(root), **SMALL, missing=1, corrupt=1))
    return root


@pytest.fixture(scope="module")
def shards(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ssv2_shards")
    for split in ("train", "validation", "test"):
        run_cli("ssv2", "--root", str(raw), "--split", split, "--out", str(out), "--short-side", "48", "--workers", "1",
                "--no-progress")  # fmt: skip
    return out


def _copy(raw: Path, tmp_path: Path) -> Path:
    root = tmp_path / "release"
    shutil.copytree(raw, root)
    return root


def test_synth_writes_the_release_layout(raw: Path) -> None:
    labels = _json(raw / LABELS)
    templates = [t for t, _, _ in SSV2_TEMPLATES[:4]]
    assert labels == {ssv2.class_name(t): str(i) for i, t in enumerate(templates)}
    train = _json(raw / "labels" / ssv2.SPLIT_FILES["train"])
    assert len(train) == 4 * 2 + 1
    for record in train:
        assert set(record) == {"id", "label", "template", "placeholders"} and record["id"].isdigit()
        assert record["template"] in templates
        filled = record["template"].replace("[something]", record["placeholders"][0])
        assert record["label"] == filled[:1].lower() + filled[1:]
    assert all(set(r) == {"id"} for r in _json(raw / "labels" / ssv2.SPLIT_FILES["test"]))
    videos = sorted((raw / ssv2.VIDEO_FOLDER).iterdir())
    assert len(videos) == 4 * 2 + 4 * 1 + 2 and all(p.suffix == ".webm" for p in videos)
    with av.open(str(videos[0])) as container:  # VP9 in WebM, as released
        stream = container.streams.video[0]
        assert (container.format.name.split(",")[0], stream.codec_context.name) == ("matroska", "vp9")
        assert (stream.width, stream.height) == (64, 48)


def test_labels_come_from_templates_with_the_official_indices(raw: Path, tmp_path: Path) -> None:
    root = _copy(raw, tmp_path)
    # Indices given out of file order, and more classes than the records use: the class list is by index.
    _write_json(root / LABELS, {
        "Turning the camera left while filming something": "3", "Approaching something with your camera": "0",
        "Pulling something from right to left": "5", "Pushing something from left to right": "1",
        "Pulling something from left to right": "4", "Pushing something from right to left": "2",
    })  # fmt: skip
    found = ssv2.discover(ssv2.Ssv2Source(str(root), "train"))
    assert found.classes[:3] == ["Approaching something with your camera", "Pushing something from left to right",
                                 "Pushing something from right to left"]  # fmt: skip
    records = {r["id"]: r for r in _json(root / "labels" / ssv2.SPLIT_FILES["train"])}
    assert found.items and len(found.items) + len(found.rejects) == len(records)
    for item in found.items:
        template = records[item.source_id]["template"]
        assert item.label == template.replace("[", "").replace("]", "")
        assert item.label_index == found.classes.index(item.label)
        assert item.key == item.source_id and item.source.endswith(f"{ssv2.VIDEO_FOLDER}/{item.source_id}.webm")
    assert {i.label_index for i in found.items} == {1, 2, 4, 5}


@pytest.mark.parametrize("labels, says", [
    ({"Pushing something from left to right": "1", "Pushing something from right to left": "2"}, "exactly 0..1"),
    ({"Pushing something from left to right": "0", "Pushing something from right to left": "0"}, "given to both"),
    ({"Pushing something from left to right": "zero"}, "not a whole number"),
    (["Pushing something from left to right"], "expected a non-empty JSON object"),
])  # fmt: skip
def test_a_labels_file_that_does_not_number_classes_0_to_n_is_an_error(labels: object, says: str, tmp_path: Path) -> None:
    path = tmp_path / ssv2.LABELS_FILE
    _write_json(path, labels)
    with pytest.raises(ValueError, match=says):
        ssv2.load_classes(str(path))


def test_missing_unknown_malformed_and_duplicate_records_are_rejected_with_a_reason(raw: Path, tmp_path: Path) -> None:
    root = _copy(raw, tmp_path)
    split_file = root / "labels" / ssv2.SPLIT_FILES["validation"]
    records = _json(split_file)
    good = records[0]
    records += [
        {**good, "id": "1", "template": "Spinning [something] so it continues spinning"},  # not in the labels file
        "not a record", {"label": "no id"}, {**good, "id": "../../etc/passwd"}, {"id": "2", "label": "no template"},
        dict(good),  # the same id again
    ]  # fmt: skip
    _write_json(split_file, records)
    (root / ssv2.VIDEO_FOLDER / "1.webm").write_bytes(b"\x1a\x45")
    found = ssv2.discover(ssv2.Ssv2Source(str(root), "val"))
    reasons = {r.source: r.reason for r in found.rejects}
    assert len(found.items) == len(records) - 6 and len(found.rejects) == 6
    assert reasons["1"].startswith("template 'Spinning [something] so it continues spinning' is not in the labels file")
    assert reasons[good["id"]] == "duplicate record: id already listed in the split file"
    n = len(records) - 6
    assert reasons[f"{split_file}:{n + 1}"].startswith("malformed record: not a JSON object")
    assert reasons[f"{split_file}:{n + 2}"].startswith("malformed record: no usable id")
    assert "is not a plain name" in reasons[f"{split_file}:{n + 3}"]
    assert "no template" in reasons[f"{split_file}:{n + 4}"]


def test_synth_to_shards_to_verify_round_trip(raw: Path, shards: Path) -> None:
    train, val, test = (read_manifest(shards, split) for split in ("train", "val", "test"))
    classes = [ssv2.class_name(t) for t, _, _ in SSV2_TEMPLATES[:4]]
    for manifest in (train, val, test):
        assert (manifest["dataset"], manifest["modality"], manifest["classes"]) == ("ssv2", "video", classes)
    assert (train["num_inputs"], train["num_samples"], train["num_rejected"], train["num_unlabeled"]) == (9, 7, 2, 0)
    reasons = sorted(r["reason"].split(":")[0] for r in read_rejects(shards, "train"))
    assert reasons == ["missing", "undecodable video"]
    assert (val["num_samples"], val["num_rejected"], val["settings"]["source"]) == (4, 0, {"release_split": "validation"})
    assert test["num_samples"] == test["num_unlabeled"] == 2  # written, unlabelled: for prediction only

    records = {r["id"]: r for r in _json(raw / "labels" / ssv2.SPLIT_FILES["train"])}
    samples = read_samples(list_shard_urls(str(shards), "train"))
    assert len(samples) == 7
    for sample in samples:
        record, meta = records[sample["__key__"]], sample["json"]
        assert classes[sample["cls"]] == meta["label"] == ssv2.class_name(record["template"])
        assert meta["source_id"] == record["id"] and meta["segment"] is None
        assert (meta["fps"], meta["frames"], meta["width"], meta["height"]) == (8.0, 16, 64, 48)
    reader = decord.VideoReader(io.BytesIO(samples[0]["mp4"]))  # as the data service decodes it
    assert len(reader) == 16 and reader.get_batch([0, 15]).asnumpy().shape == (2, 48, 64, 3)
    assert {s["cls"] for s in read_samples(list_shard_urls(str(shards), "test"))} == {UNLABELED}

    verified = run_cli("verify", str(shards), "--split", "train", "--split", "val", "--split", "test", "--decode", "2")
    assert verified.stdout.count(": OK:") == 3, verified.stdout


def test_training_and_evaluation_refuse_the_unlabelled_test_split(shards: Path) -> None:
    from core.errors import ConfigError
    from pipeline.config import load_config
    from pipeline.evaluate import prepare
    from pipeline.trainer.job import labelled_manifest

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/experiment/demo.yaml", [f"data.root={shards}"])
    says = "split 'test': 2 of 2 samples are unlabelled (class -1)"
    with pytest.raises(ConfigError, match=re.escape(says)):
        labelled_manifest(cfg, "test")  # what a training job reads its train and val splits with
    with pytest.raises(ConfigError, match=re.escape(says)):
        prepare(cfg, "no-such-model-reference", "test")  # refused before the model reference is read
    assert labelled_manifest(cfg, "val").num_samples == 4


def test_check_release_on_a_good_and_a_damaged_tree(raw: Path, tmp_path: Path) -> None:
    good_root = tmp_path / "good"
    synth_ssv2(SynthSsv2(str(good_root), **SMALL))
    good = ssv2.check_release(str(good_root))
    assert good.ok, good.summary()
    assert good.records == {"train": 8, "validation": 4, "test": 2} and good.classes == 4
    assert good.summary().splitlines()[0].endswith(f"OK (JSON files in {good_root}/labels, videos in "
                                                   f"{good_root}/{ssv2.VIDEO_FOLDER})")  # fmt: skip

    root = _copy(good_root, tmp_path)
    test_ids = [r["id"] for r in _json(root / "labels" / ssv2.SPLIT_FILES["test"])]
    (root / ssv2.VIDEO_FOLDER / f"{test_ids[0]}.webm").unlink()
    train_file = root / "labels" / ssv2.SPLIT_FILES["train"]
    train = _json(train_file)
    (root / ssv2.VIDEO_FOLDER / f"{train[0]['id']}.webm").write_bytes(b"")
    train[1]["template"] = "Spinning [something] so it continues spinning"
    _write_json(train_file, train)
    damaged = ssv2.check_release(str(root))
    assert not damaged.ok
    assert (damaged.missing_videos, damaged.empty_videos, damaged.unknown_templates) == (
        {"train": 0, "validation": 0, "test": 1}, {"train": 1, "validation": 0, "test": 0},
        {"train": 1, "validation": 0, "test": 0})  # fmt: skip
    text = damaged.summary()
    assert "INCOMPLETE" in text and "train: 8 records, 1 empty video, 1 unknown template" in text
    assert "test: 2 records, 1 missing video" in text and f"no {test_ids[0]}.webm" in text and "fix:" in text

    (root / "labels" / ssv2.SPLIT_FILES["validation"]).write_text("[{")
    (root / "labels" / ssv2.SPLIT_FILES["test"]).unlink()
    broken = ssv2.check_release(str(root))
    assert not broken.ok and "validation" not in broken.records and "test" not in broken.records
    assert any("not valid JSON" in p for p in broken.problems), broken.problems
    assert f"problem: missing: {root}/labels/{ssv2.SPLIT_FILES['test']}" in broken.summary()


def test_cli_help_and_errors(tmp_path: Path) -> None:
    overview = run_cli("--help").stdout
    assert "python -m preprocessing synth ssv2" in overview and "python -m preprocessing ssv2 --root" in overview
    text = run_cli("ssv2", "--help").stdout
    assert "--root" in text and "--split {train,validation,val,test}" in text and "unlabelled" in text
    assert "ssv2 only" in run_cli("synth", "--help").stdout
    refused = run_cli("ssv2", "--root", str(tmp_path), "--split", "testing", "--out", str(tmp_path / "o"), check=False)
    assert refused.returncode == 2 and "unknown SSv2 split 'testing'" in refused.stderr
    missing = run_cli("ssv2", "--root", str(tmp_path), "--split", "train", "--out", str(tmp_path / "o"), check=False)
    assert missing.returncode == 2 and ssv2.LABELS_FILE in missing.stderr, missing.stderr
    odd = run_cli("synth", "ssv2", "--out", str(tmp_path / "s"), "--classes", "3", check=False)
    assert odd.returncode == 2 and "classes must be 2, 4 or 6" in odd.stderr


def test_pipeline_predict_reads_the_test_split(raw: Path, shards: Path, tmp_path: Path, capsys) -> None:
    """The unlabelled test split serves prediction: pipeline.predict reads its released VP9 videos and the
    H.264 videos of its shards (tiny MViTv2 with random weights, as tests/data/test_predict.py builds them)."""
    import dataclasses

    import torch
    import yaml

    from pipeline.models.mvit import MViT
    from pipeline.predict import main
    from pipeline.trainer.export import export_model
    from tests.models.helpers import tiny_config

    classes = read_manifest(shards, "test")["classes"]
    torch.manual_seed(0)
    model = MViT(tiny_config(2, depth=2, stage_starts=(1,), num_classes=len(classes), num_frames=4)).eval()
    export_model(model.state_dict(), model.cfg, tmp_path / "final", classes=classes)
    exp = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/experiment/demo.yaml").read_text())
    plain = lambda v: [plain(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    exp["model"] = {"preset": "mvit_b_16x4", **{k: plain(v) for k, v in dataclasses.asdict(model.cfg).items()
                                                 if k != "num_classes"}}  # fmt: skip
    exp["data"]["sampling"].update(num_frames=4, eval_clips=1, eval_crops=1)
    exp["data"]["augment"].update(crop_size=32, eval_short_side=36)
    exp["data"]["decoder"]["isolate"] = False
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(exp))
    sample = read_samples(list_shard_urls(str(shards), "test"))[0]
    stored = tmp_path / f"{sample['__key__']}.mp4"
    stored.write_bytes(sample["mp4"])
    released = raw / ssv2.VIDEO_FOLDER / f"{sample['__key__']}.webm"
    code = main(["--model", str(tmp_path / "final"), "--config", str(tmp_path / "experiment.yaml"), "--json",
                 str(released), str(stored)])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert [r["input"] for r in out["results"]] == [str(released), str(stored)]
    for result in out["results"]:
        assert "error" not in result and {t["class"] for t in result["top"]} <= set(classes), result
