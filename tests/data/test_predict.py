"""python -m pipeline.predict on files: a shard's own video (and a JPEG) predicted by the command is seen
exactly as the data service's evaluation sees that sample (the decoder actor's rows for it, then
normalize, the model and VideoAccumulator as validation runs them), bit for bit; bad inputs cost one error
line each and the others still run; a bad reference or a model/data mismatch stops it before any input
is read. The models are tiny MViTv2s with random weights, written as a training job's final model folder."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data_helpers import decoder_batch, decoder_row, first_sample, shard_keys, shard_video
from PIL import Image
from safetensors.torch import save_file

from core import faults
from pipeline.config import load_config
from pipeline.data.decode import Decoder, decord_has_cuda
from pipeline.data.device import normalize
from pipeline.data.plan import OK
from pipeline.model_ref import load_for_inference
from pipeline.models.mvit import MViT
from pipeline.predict import Predictor, main
from pipeline.trainer.evaluate import VideoAccumulator
from pipeline.trainer.export import export_model
from tests.models.helpers import tiny_config

CLASSES = ["disk", "square", "triangle"]  # the kinetics_shards fixture's 3 classes (names are the model's)
REPO = Path(__file__).resolve().parents[2]


def _model(frames: int) -> MViT:
    torch.manual_seed(frames)
    model = MViT(tiny_config(2, depth=2, stage_starts=(1,), num_classes=len(CLASSES), num_frames=frames)).eval()
    with torch.no_grad():  # far from the initialisation, so that views and inputs give different probabilities
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, MViT]]:
    """{"video": (final model folder, model), "image": ..., "bare": (a .safetensors file, the video model)}."""
    out = {}
    for kind, frames in (("video", 4), ("image", 1)):
        model = _model(frames)
        folder = tmp_path_factory.mktemp(f"final_{kind}")
        export_model(model.state_dict(), model.cfg, folder, classes=CLASSES)
        out[kind] = (folder, model)
    bare = tmp_path_factory.mktemp("bare") / "weights.safetensors"
    save_file(out["video"][1].state_dict(), str(bare))
    out["bare"] = (bare, out["video"][1])
    return out


def _experiment(tmp_path: Path, model: MViT, name: str = "experiment.yaml", **data: object) -> str:
    """The demo's experiment with the tiny network as its model section (the class count left to the shard
    set, as the demo does) and a data recipe at its clip size, decoded in-process (no decode child to start)."""
    exp = yaml.safe_load((REPO / "configs/experiment/demo.yaml").read_text())
    plain = lambda v: [plain(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    exp["model"] = {"preset": "mvit_b_16x4", **{k: plain(v) for k, v in dataclasses.asdict(model.cfg).items()
                                                 if k != "num_classes"}}  # fmt: skip
    exp["data"]["sampling"].update(num_frames=model.cfg.num_frames, eval_clips=3, eval_crops=1)
    exp["data"]["augment"].update(crop_size=32, eval_short_side=36)
    exp["data"]["decoder"]["isolate"] = False
    for key, value in data.items():
        section, field = key.split("__")
        exp["data"][section][field] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(exp))
    return str(path)


def _jpeg() -> bytes:
    """500 x 375 (ImageNet's common size): decoded in Pillow's draft mode at the test's short side."""
    y, x = np.mgrid[0:375, 0:500]
    rgb = np.stack([(x * 255 // 499), (y * 255 // 374), ((x + y) % 97) * 2], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _evaluation(model: MViT, data, modality: str, key: str, media: bytes,
                meta: dict) -> tuple[np.ndarray, torch.Tensor]:
    """The data service's evaluation of one sample: the decoder actor's rows for it (as a validation read
    task hands it the shard member and its metadata), then what validation does with a batch of them."""
    rows = Decoder(data, modality, train=False)(decoder_batch([decoder_row(key, media, meta)]))
    assert (rows["status"] == OK).all(), rows["error"]
    acc = VideoAccumulator()
    with torch.no_grad():
        x = normalize(torch.from_numpy(rows["video"]), data.augment.mean, data.augment.std)
        acc.add(model(x), torch.from_numpy(rows["label"]), rows["video_id"])
    return rows["video"], acc.prob_sum[key] / acc.views[key]


def _json(capsys, argv: list[str]) -> tuple[int, dict, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_a_video_and_an_image_are_predicted_exactly_as_evaluation_sees_them(kinetics_shards, models, tmp_path, capsys):
    key, media, meta = first_sample(kinetics_shards, "val")
    video_file = tmp_path / f"{key}.mp4"
    video_file.write_bytes(media)
    folder, model = models["video"]
    config = _experiment(tmp_path, model)
    data = load_config(config).data
    data.sampling.eval_clips, data.sampling.eval_crops = 3, 3  # what --views 3x3 asks for
    views, expected = _evaluation(model, data, "video", key, media, meta)
    assert views.shape == (9, 3, 4, 32, 32) and len({v.tobytes() for v in views}) == 9  # 3 clips x 3 crops

    predictor = Predictor(load_for_inference(str(folder)), data, config, batch_size=9)
    try:  # the per-view model inputs, from the file and no metadata
        assert torch.equal(torch.from_numpy(predictor.decode(predictor.read(str(video_file)), str(video_file))),
                           torch.from_numpy(views))
    finally:
        predictor.close()
    code, out, err = _json(capsys, ["--model", str(folder), "--config", config, "--views", "3x3", "--batch-size", "9",
                                    "--json", str(video_file)])
    assert code == 0 and err == ""
    assert out["views"] == {"clips": 3, "crops": 3} and out["recipe"] == config and out["classes"] == CLASSES
    (result,) = out["results"]
    assert result["input"] == str(video_file) and result["views"] == 9
    values, indices = expected.topk(3)
    assert [(t["index"], t["class"]) for t in result["top"]] == [(i, CLASSES[i]) for i in indices.tolist()]
    assert [t["probability"] for t in result["top"]] == values.tolist()  # exact: the same float32 sums
    assert values[0] - values[-1] > 0.01

    image_folder, image_model = models["image"]
    jpeg = _jpeg()
    (tmp_path / "photo.jpg").write_bytes(jpeg)
    image_config = _experiment(tmp_path, image_model, "image.yaml", augment__mean=[0.485, 0.456, 0.406])
    image_data = load_config(image_config).data
    _, expected = _evaluation(image_model, image_data, "image", "photo", jpeg, {"width": 500, "height": 375})
    code, out, err = _json(capsys, ["--model", str(image_folder), "--config", image_config, "--json",
                                    str(tmp_path / "photo.jpg")])
    assert code == 0 and out["results"][0]["views"] == 1 and out["modality"] == "image"
    assert [t["probability"] for t in out["results"][0]["top"]] == expected.topk(3).values.tolist()


def test_bad_inputs_cost_one_error_line_each_and_the_rest_is_predicted(kinetics_shards, models, tmp_path, capsys,
                                                                      monkeypatch):
    """The defaults (no --config: the Kinetics recipe at the model's clip size, each input decoded in a decode
    child process, as the data service does): good videos among a missing file, a text file named .mp4, a
    truncated video, an image given to a video model and a video whose decode segfaults (planted)."""
    keys = shard_keys(kinetics_shards, "val")[:2]
    good = []
    for key in keys:
        good.append(tmp_path / f"{key}.mp4")
        good[-1].write_bytes(shard_video(kinetics_shards, "val", key))
    (tmp_path / "notes.mp4").write_text("not a video\n")
    (tmp_path / "cut.mp4").write_bytes(good[0].read_bytes()[:4000])
    (tmp_path / "photo.jpg").write_bytes(_jpeg())
    (tmp_path / "crash.mp4").write_bytes(good[0].read_bytes())
    monkeypatch.setenv(faults.ENV, json.dumps({"decode": {str(tmp_path / "crash.mp4"): "segfault"}}))
    bad = {"missing.mp4": "no such file", "notes.mp4": "ValueError: unreadable container",
           "cut.mp4": "ValueError: unreadable container",
           "photo.jpg": "an image (.jpg), but the model takes video clips",
           "crash.mp4": "decode process was killed by SIGSEGV on each of 2 attempts"}
    inputs = [str(good[0]), *(str(tmp_path / name) for name in bad), str(good[1])]
    assert main(["--model", str(models["video"][0]), *inputs]) == 1
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert len(errors) == len(bad), captured.err
    for line, (name, reason) in zip(errors, bad.items()):
        assert line.startswith(f"error: {tmp_path / name}: {reason}"), line
    lines = captured.out.splitlines()
    assert lines[0] == f"{good[0]}  (5 views)" and lines[4] == f"{good[1]}  (5 views)" and len(lines) == 8
    assert {line.split()[1] for line in lines[1:4]} == set(CLASSES)  # top-5 capped at the 3 classes
    assert abs(sum(float(line.split()[0]) for line in lines[1:4]) - 1.0) < 1e-3


def test_an_input_over_the_data_services_size_cap_is_not_read(models, tmp_path, capsys):
    folder, model = models["video"]
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * 2000)
    config = _experiment(tmp_path, model)
    assert main(["--model", str(folder), "--config", config, str(big), "data.max_member_bytes=1000"]) == 1
    assert capsys.readouterr().err == f"error: {big}: 2000 bytes, over data.max_member_bytes=1000: not read\n"


def _refused(capsys, argv: list[str], *words: str) -> None:
    """Exit 2 with one line, before any input is read (every input here would fail with its own line)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and captured.out == "", captured
    for word in words:
        assert word in err, err


def test_a_bad_reference_config_or_option_is_refused_before_any_input(models, tmp_path, capsys):
    folder, model = models["video"]
    missing = str(tmp_path / "missing.mp4")
    config = _experiment(tmp_path, model)
    _refused(capsys, ["--model", str(tmp_path / "nowhere"), missing], "no such file or folder")
    _refused(capsys, ["--model", str(folder), "--config", str(REPO / "configs/experiment/demo.yaml"), missing],
             "model/data mismatch", "data.sampling.num_frames=8", "frames is 4")
    _refused(capsys, ["--model", str(folder), "--config", config, missing, "model.num_classes=5"],
             "model/data mismatch")
    _refused(capsys, ["--model", str(folder), "--config", config, missing, "data.sampling.nope=1"],
             "data.sampling.nope")
    _refused(capsys, ["--model", str(folder), missing, "data.decoder.isolate=false"], "give --config")
    _refused(capsys, ["--model", str(folder), "--views", "2x2", missing], "--views '2x2': crops must be 1")
    _refused(capsys, ["--model", str(folder), "--top-k", "0", missing], "--top-k must be >= 1")
    if not decord_has_cuda():  # a decoder this machine does not have: refused, not an error line per input
        _refused(capsys, ["--model", str(folder), "--config", config, missing, "data.decoder.device=gpu"],
                 "decoder.device=gpu but Decord was built without CUDA")
    # weights that do not record their network: the experiment's model section builds it, with a class count
    bare = str(models["bare"][0])
    _refused(capsys, ["--model", bare, "--config", config, missing], "sets model.num_classes")
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0 and "--views KxC" in capsys.readouterr().out


def test_weights_without_class_names_and_inputs_in_s3(kinetics_shards, models, s3_bucket, tmp_path, capsys):
    """A bare checkpoint file (the network from --config, no class names: indices are printed) and inputs
    read from S3 through fsspec with --s3-endpoint-url; a missing object is that input's error line."""
    import s3fs

    key, media, _ = first_sample(kinetics_shards, "val")
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    fs.pipe(f"{s3_bucket.url}/{key}.mp4", media)
    bare, model = models["bare"]
    config = _experiment(tmp_path, model)
    argv = ["--model", str(bare), "--config", config, "--s3-endpoint-url", s3_bucket.endpoint_url, "--top-k", "2",
            f"{s3_bucket.url}/{key}.mp4", f"{s3_bucket.url}/missing.mp4", "model.num_classes=3"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {s3_bucket.url}/missing.mp4: no such file\n"
    lines = captured.out.splitlines()
    assert lines[0] == f"{s3_bucket.url}/{key}.mp4  (3 views)" and len(lines) == 3
    assert all(line.split(None, 1)[1].startswith("class ") for line in lines[1:])
    code, out, _ = _json(capsys, ["--model", str(models["video"][0]), "--config", config, "--json",
                                  "--s3-endpoint-url", s3_bucket.endpoint_url, f"{s3_bucket.url}/{key}.mp4"])
    top = out["results"][0]["top"]  # the same weights as a final model folder: the same numbers, with names
    shown = [f"{t['probability']:.4f}  class {t['index']}" for t in top[:2]]
    assert code == 0 and shown == [line.strip() for line in lines[1:]]
