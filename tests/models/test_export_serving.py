"""Serving exports (python -m pipeline.export): a tiny two-block MViTv2 (relative position bias, residual
pooling, Q and K/V pooling, a stage change) written as a training job's final model folder, exported to ONNX with a dynamic and a
fixed batch and with torch.export, each read back and compared with the eager model here, independently
of the CLI's own check; the metadata a server reads; and the one-line refusals, which write nothing."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline.export import main
from pipeline.models.mvit import MViT
from pipeline.serving.exporters import export_onnx, export_program
from pipeline.serving.model import ServingError, load_model
from pipeline.serving.verify import ATOL, RTOL, verify
from pipeline.trainer.export import export_model
from tests.models.helpers import tiny_config

CLASSES = [f"class {i}" for i in range(7)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(final model folder, the eager model it holds): weights far from the init, as after training."""
    torch.manual_seed(0)
    model = MViT(tiny_config(2, depth=2, stage_starts=(1,))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("final_model")
    export_model(model.state_dict(), model.cfg, folder, classes=CLASSES)
    return folder, model


def _eager(model, clips: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(clips)).numpy()


def _clips(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, 4, 32, 32), dtype=np.float32)


def _one_line_refusal(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err


def _recipe(tmp_path, model_lines: str = ""):
    """The demo's experiment config at the tiny model's clip size (4 frames, 32 x 32)."""
    path = tmp_path / "experiment.yaml"
    path.write_text(open("configs/experiment/demo.yaml").read().replace("num_frames: 8,", "num_frames: 4,")
                    .replace("crop_size: 64", "crop_size: 32").replace("eval_short_side: 64", "eval_short_side: 36")
                    .replace("model:\n", "model:\n" + model_lines))
    return str(path)


def test_onnx_dynamic_batch_matches_eager_and_carries_the_metadata(trained, tmp_path, capsys):
    folder, model = trained
    out = tmp_path / "model.onnx"
    assert main(["--model", str(folder), "--out", str(out), "--config", _recipe(tmp_path)]) == 0
    assert "batch 1: max |logit diff|" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 4, 32, 32]
    for batch in (1, 5):
        clips = _clips(batch)
        got, want = session.run(None, {"clip": clips})[0], _eager(model, clips)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        assert np.abs(want).max() > 0.5  # logits of a size that makes the comparison mean something
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["classes"] == CLASSES
    spec = meta["input"]
    assert spec["shape"] == ["batch", 3, 4, 32, 32] and spec["layout"] == "NCTHW"
    assert spec["normalization"]["mean"] == [0.45] * 3 and spec["normalization"]["std"] == [0.225] * 3
    assert spec["sampling"]["frame_stride"] == 4 and spec["eval_views"]["short_side"] == 36
    assert spec["eval_views"]["clips"] == 2 and spec["recipe"] == _recipe(tmp_path)
    assert meta["export"]["opset"] == 23 and meta["export"]["batch"] == "dynamic"
    assert "Attention" in {n.op_type for n in onnx.load(str(out)).graph.node}
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert {k: sidecar[k] for k in meta} == meta
    assert sidecar["verification"]["passed"] and [c["batch"] for c in sidecar["verification"]["checks"]] == [1, 3]


def test_onnx_fixed_batch_takes_only_that_batch(trained, tmp_path):
    folder, model = trained
    out = tmp_path / "fixed.onnx"
    assert main(["--model", str(folder), "--out", str(out), "--batch", "2", "--opset", "18"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 4, 32, 32]
    assert "Attention" not in {n.op_type for n in onnx.load(str(out)).graph.node}  # decomposed
    clips = _clips(2)
    np.testing.assert_allclose(session.run(None, {"clip": clips})[0], _eager(model, clips), rtol=RTOL, atol=ATOL)
    with pytest.raises(Exception, match="[Ii]nvalid"):
        session.run(None, {"clip": _clips(3)})


def test_torch_export_round_trip_through_s3(trained, s3_bucket, tmp_path):
    """Model folder read from and the program written to S3; torch.export.load gives back the program and
its metadata."""
    import s3fs

    folder, model = trained
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    fs.put(str(folder) + "/", f"{s3_bucket.url}/final_model/", recursive=True)
    out = f"{s3_bucket.url}/serving/model.pt2"
    assert main(["--model", f"{s3_bucket.url}/final_model", "--out", out, "--format", "torch-export",
                 "--s3-endpoint-url", s3_bucket.endpoint_url]) == 0
    local = tmp_path / "model.pt2"
    fs.get(out, str(local))
    extra = {"serving.json": ""}
    program = torch.export.load(str(local), extra_files=extra)
    assert json.loads(extra["serving.json"])["classes"] == CLASSES
    assert json.loads(fs.cat(out + ".json"))["verification"]["passed"]
    for batch in (1, 3):
        clips = _clips(batch)
        with torch.no_grad():
            got = program.module()(torch.from_numpy(clips)).numpy()
        np.testing.assert_allclose(got, _eager(model, clips), rtol=RTOL, atol=ATOL)
    assert zipfile.is_zipfile(local)


def test_verification_fails_for_other_weights(trained):
    """The check the CLI runs after writing a file tells a different network apart."""
    _, model = trained
    other = MViT(model.cfg).eval()
    result = verify(model, model.cfg, lambda clips: _eager(other, clips), "another model", (1, 2))
    assert not result.passed and result.max_abs_diff > 100 * ATOL


def test_a_model_data_mismatch_is_refused(trained, tmp_path, capsys):
    folder, _ = trained
    _one_line_refusal(capsys, ["--model", str(folder), "--out", str(tmp_path / "m.onnx"),
                               "--config", "configs/experiment/demo.yaml"],
                      "model/data mismatch", "data.sampling.num_frames=8", "frames is 4")
    recipe = _recipe(tmp_path, "  num_classes: 5\n")
    _one_line_refusal(capsys, ["--model", str(folder), "--out", str(tmp_path / "m.onnx"), "--config", recipe],
                      "model/data mismatch", "model.num_classes=5", "classes is 7")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("batch", ["0", "-2", "two", "1.5"])
def test_a_bad_batch_is_refused(trained, tmp_path, capsys, batch):
    folder, _ = trained
    _one_line_refusal(capsys, ["--model", str(folder), "--out", str(tmp_path / "m.onnx"), f"--batch={batch}"],
                      "--batch must be 'dynamic' or a positive integer")
    assert not list(tmp_path.iterdir())


def test_a_reference_that_cannot_be_used_is_refused(trained, tmp_path, capsys):
    folder, _ = trained
    out = str(tmp_path / "m.onnx")
    _one_line_refusal(capsys, ["--model", str(tmp_path / "nowhere"), "--out", out], "no such file or folder")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (broken / "model_config.json").write_text("{not json")
    _one_line_refusal(capsys, ["--model", str(broken), "--out", out], "cannot read it", "Expecting property name")
    meta = json.loads((folder / "model_config.json").read_text())
    meta["mvit_config"]["embed_dim"] = 24  # weights of a 16-wide network under a 24-wide config
    (broken / "model_config.json").write_text(json.dumps(meta))
    _one_line_refusal(capsys, ["--model", str(broken), "--out", out], "does not fit the model", "shape mismatch")
    meta["mvit_config"]["embed_dim"], meta["classes"] = 16, CLASSES[:3]
    (broken / "model_config.json").write_text(json.dumps(meta))
    _one_line_refusal(capsys, ["--model", str(broken), "--out", out], "3 class names for a 7-class head")
    torch.save(load_model(str(folder)).model.state_dict(), tmp_path / "bare.pt")  # weights only: no network
    _one_line_refusal(capsys, ["--model", str(tmp_path / "bare.pt"), "--out", out], "does not say which network",
                      "model.num_classes")
    _one_line_refusal(capsys, ["--model", str(folder), "--out", str(tmp_path / "m.pt2")], "must end in .onnx")
    _one_line_refusal(capsys, ["--model", str(folder), "--out", out, "--opset", "17"], "needs opset >= 18")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.pt2").exists()
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0 and "--batch" in capsys.readouterr().out


class _Eig(torch.nn.Module):
    """A real network with an operator ONNX has no translation for (general eigenvalues)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x[:, 0, 0, :4, :4]).real


def test_a_model_that_does_not_export_is_refused_naming_the_operator(trained, tmp_path):
    folder, _ = trained
    cfg = load_model(str(folder)).config
    with pytest.raises(ServingError, match=r"operator aten\.linalg_eig has no translation"):
        export_onnx(_Eig(), cfg, tmp_path / "eig.onnx", None, {})
    assert not (tmp_path / "eig.onnx").exists()

    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean() if x.sum() > 0 else x.max()

    with pytest.raises(ServingError, match="does not export to torch.export: GuardOnDataDependentSymNode"):
        export_program(DataDependent(), cfg, tmp_path / "dd.pt2", 2, {})
