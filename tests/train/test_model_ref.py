"""``pipeline.model_ref``: every reference form that needs no job (a checkpoint file of each layout, a
final model folder, the same on S3 through the moto server) and every refusal, each one line.

References to a real job's outputs (DCP checkpoint, runs:/, models:/) and their refusals are in
test_init_from.py, which has the MLflow store.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.model_ref import ModelRefError, check_against, fit, main, resolve
from pipeline.models.convert import to_torchvision
from pipeline.models.mvit import MViT
from pipeline.trainer.export import export_model
from tests.models.helpers import pyslowfast_cfg, save_pyslowfast_checkpoint, tiny_config

CLASSES = ["a", "b", "c", "d", "e", "f", "g"]


@pytest.fixture(scope="module")
def model() -> MViT:
    torch.manual_seed(0)
    return MViT(tiny_config(1))


def _pytorchvideo_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PyTorchVideo's names for this project's, as its ``create_multiscale_vision_transformers`` has them."""
    rename = [("patch_embed.proj.", "patch_embed.patch_model."), ("cls_token", "cls_positional_encoding.cls_token"),
              ("pos_embed_", "cls_positional_encoding.pos_embed_"), ("norm.", "norm_embed."),
              ("head.projection.", "head.proj.")]
    out = {}
    for key, value in state.items():
        for ours, theirs in rename:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        out[key] = value
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_file_of_every_layout_resolves_to_native_weights(model: MViT, tmp_path: Path) -> None:
    native = model.state_dict()
    torch.save(native, tmp_path / "native.pt")
    torch.save(to_torchvision(native, model.cfg), tmp_path / "torchvision.pt")
    torch.save({"model_state": _pytorchvideo_names(native)}, tmp_path / "pytorchvideo.pt")
    save_file({k: v.contiguous() for k, v in native.items()}, str(tmp_path / "native.safetensors"))
    for name, fmt in [("native.pt", "native"), ("torchvision.pt", "torchvision"), ("pytorchvideo.pt", "pytorchvideo"),
                      ("native.safetensors", "native")]:
        resolved = resolve(str(tmp_path / name))
        assert (resolved.kind, resolved.fmt, resolved.model_config) == ("file", fmt, None), name
        _assert_same(resolved.state, native)
    # PySlowFast's own file (separate q/k/v, GPU-tagged tensors, optimiser state, cfg text)
    cfg = pyslowfast_cfg(1, SEPARATE_QKV=True)
    written = save_pyslowfast_checkpoint(tmp_path / "slowfast.pyth", cfg)
    resolved = resolve(f"file://{tmp_path / 'slowfast.pyth'}")
    assert resolved.fmt == "slowfast" and resolved.pyslowfast_cfg is not None
    fitted = fit(resolved, MViT(tiny_config(1)))
    assert torch.equal(fitted.state["blocks.0.attn.qkv.weight"], torch.cat(
        [written[f"blocks.0.attn.{x}.weight"] for x in "qkv"]))
    # ... and its cfg still refuses a network its weights cannot show
    save_pyslowfast_checkpoint(tmp_path / "residual.pyth", pyslowfast_cfg(1, RESIDUAL_POOLING=True))
    with pytest.raises(ModelRefError, match="MVIT.RESIDUAL_POOLING is True"):
        fit(resolve(str(tmp_path / "residual.pyth")), MViT(tiny_config(1)))


def test_a_final_model_folder_brings_its_network_and_classes(model: MViT, tmp_path: Path) -> None:
    export_model(model.state_dict(), model.cfg, tmp_path / "final", classes=CLASSES)
    resolved = resolve(str(tmp_path / "final"))
    assert (resolved.kind, resolved.model_config, resolved.classes) == ("final_model", model.cfg, CLASSES)
    _assert_same(resolved.state, model.state_dict())
    check_against(resolved, model.cfg, CLASSES, "keep")
    with pytest.raises(ModelRefError, match="in another order or with other names"):
        check_against(resolved, model.cfg, CLASSES[::-1], "keep")
    assert fit(resolved, MViT(tiny_config(1)), "new", CLASSES[::-1]).reinitialized == (
        "head.projection.bias", "head.projection.weight")  # same count, other classes: a new classifier
    with pytest.raises(ModelRefError, match="residual_pooling=False"):
        check_against(resolved, tiny_config(1, residual_pooling=True), CLASSES, "keep")


def test_s3_files_and_folders_resolve_through_the_projects_endpoint(model: MViT, tmp_path: Path, s3_bucket) -> None:
    import s3fs

    export_model(model.state_dict(), model.cfg, tmp_path / "final", classes=CLASSES)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    fs.put(str(tmp_path / "final") + "/", f"{s3_bucket.url}/final", recursive=True)
    fs.put_file(str(tmp_path / "weights.pt"), f"{s3_bucket.url}/weights.pt")
    folder = resolve(f"{s3_bucket.url}/final/", s3_endpoint_url=s3_bucket.endpoint_url)
    assert folder.kind == "final_model" and folder.classes == CLASSES
    _assert_same(folder.state, model.state_dict())
    _assert_same(resolve(f"{s3_bucket.url}/weights.pt", s3_endpoint_url=s3_bucket.endpoint_url).state,
                 model.state_dict())
    with pytest.raises(ModelRefError, match="no such file or folder in S3"):
        resolve(f"{s3_bucket.url}/missing.pt", s3_endpoint_url=s3_bucket.endpoint_url)


class _Payload:
    def __reduce__(self):  # executing this on load would be arbitrary code execution
        return (print, ("pwned",))


def test_bad_references_are_refused_with_one_line(model: MViT, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with open(tmp_path / "code.pt", "wb") as f:
        pickle.dump({"model_state": _Payload()}, f)
    torch.save({"step": 3}, tmp_path / "no_tensors.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    cases = [
        ("", "empty model reference"),
        (str(tmp_path / "missing.pt"), "no such file or folder"),
        ("gs://bucket/weights.pt", "unknown scheme 'gs'"),
        ("models:/name/Production", "stages are not supported"),
        (str(tmp_path / "empty"), "the folder holds no weights"),
        (str(tmp_path / "garbage.pt"), "cannot read it"),
        (str(tmp_path / "code.pt"), "refused to load checkpoint"),
        (str(tmp_path / "no_tensors.pt"), "contains no tensors"),
        (str(tmp_path / "cut.safetensors"), "cannot read it"),
    ]
    for ref, message in cases:
        with pytest.raises(ModelRefError, match=message) as err:
            resolve(ref)
        assert "\n" not in str(err.value), ref
    torch.save(MViT(tiny_config(1, embed_dim=32)).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ModelRefError, match="does not fit the model: .*shape mismatch") as err:
        fit(resolve(str(tmp_path / "wide.pt")), model)
    assert "\n" not in str(err.value)


def test_the_command_line_says_what_a_reference_holds(model: MViT, tmp_path: Path, capsys) -> None:
    export_model(model.state_dict(), model.cfg, tmp_path / "final", classes=CLASSES)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "models:/NAME@ALIAS" in capsys.readouterr().out
    assert main([str(tmp_path / "final")]) == 0
    out = capsys.readouterr().out
    assert "(final_model, native layout, 92 tensors, 7 classes)" in out and "depth 4, embed_dim 16" in out
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or folder" in err
