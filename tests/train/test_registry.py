"""Registering a job's final model in the MLflow Model Registry (``pipeline.tracking.register_final_model``,
``python -m pipeline.register``), against a local SQLite store and a real ``mlflow server``.

Each run here is made as a job makes its own: tagged with a job key, its final model written by the job's
exporter (``export_model``) and logged as the run's ``model/`` artifacts. What is registered must come back
through ``pipeline.model_ref`` (``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``) as exactly the exported
weights and classes. The job's own registration (``tracking.register_as``) is checked on a real job in
tests/train/test_init_from.py.
"""

from __future__ import annotations

import io
import json
import shlex
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline.model_ref import resolve
from pipeline.models.mvit import MViT
from pipeline.register import main as register_main
from pipeline.tracking import (
    EXAMPLE_FILE,
    JOB_KEY_TAG,
    RegistryError,
    TrackingConfig,
    default_artifact_location,
    example_clip,
    find_job_run,
    register_final_model,
    register_job_model,
)
from pipeline.trainer.export import export_model
from tests.models.helpers import tiny_config

CLASSES = ["archery", "bowling", "cooking", "dancing", "eating", "fencing", "golf"]  # tiny_config: 7 classes


def _job_run(uri: str, experiment: str, job_key: str, folder: Path, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    """A finished run as a job leaves it; returns its id and the exported weights."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=default_artifact_location(uri))
    run_id = client.create_run(experiment_id, tags={JOB_KEY_TAG: job_key}).info.run_id
    torch.manual_seed(seed)
    model = MViT(tiny_config(1))
    export_model(model.state_dict(), model.cfg, folder, classes=CLASSES)
    client.log_artifacts(run_id, str(folder), "model")
    client.set_terminated(run_id)
    return run_id, model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_registered_final_model_resolves_by_version_and_alias(tracking_uri: str, tmp_path: Path) -> None:
    uri, name, experiment = tracking_uri, f"tiny-{uuid.uuid4().hex[:8]}", f"reg-{uuid.uuid4().hex[:8]}"
    run_id, weights = _job_run(uri, experiment, "job-a", tmp_path / "a", seed=1)
    assert find_job_run(uri, experiment, "job-a") == run_id

    registered = register_final_model(uri, run_id, name, "candidate")
    assert (registered.version, registered.run_id, registered.created) == ("1", run_id, True)
    for ref in (f"models:/{name}/1", f"models:/{name}@candidate"):
        resolved = resolve(ref, tracking_uri=uri)
        assert resolved.kind == "final_model" and resolved.classes == CLASSES, ref
        assert resolved.model_config == tiny_config(1), ref
        _same(resolved.state, weights)
    again = register_final_model(uri, run_id, name, "candidate")  # the same run again: the same version
    assert (again.version, again.created) == ("1", False)


def test_what_a_version_holds(sqlite_uri: str, tmp_path: Path) -> None:
    """Tags (classes, shape, network), the job's own files plus MLmodel and the input example, which runs as is;
    a second run of the same name is version 2, and the alias moves to it."""
    uri, name = sqlite_uri, "tiny"
    run_id, weights = _job_run(uri, "reg", "job-a", tmp_path / "a", seed=1)
    register_final_model(uri, run_id, name, "candidate")
    client = MlflowClient(uri)
    version = client.get_model_version(name, "1")
    assert version.run_id == run_id and json.loads(version.tags["classes"]) == CLASSES
    assert version.tags["input_shape"] == "[-1, 3, 4, 32, 32]" and version.tags["num_classes"] == "7"
    assert json.loads(version.tags["model_config"])["embed_dim"] == 16
    assert "logits for 7 classes" in version.description
    folder = Path(client.download_artifacts(run_id, "model", str(tmp_path / "download")))
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "model_config.json", "torchvision_state_dict.pt",
                                                  "MLmodel", EXAMPLE_FILE}
    from mlflow.models import Model

    mlmodel = Model.load(str(folder / "MLmodel"))
    assert mlmodel.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 3, 4, 32, 32)}
    assert mlmodel.metadata["classes"] == CLASSES and mlmodel.metadata["input"]["layout"] == "NCTHW"
    with np.load(folder / EXAMPLE_FILE, allow_pickle=False) as example:
        clip = example["clip"]
    assert clip.shape == (1, 3, 4, 32, 32) and clip.dtype == np.float32
    assert MViT(tiny_config(1)).eval()(torch.from_numpy(clip)).shape == (1, 7)  # runs as is

    other_id, other = _job_run(uri, "reg", "job-b", tmp_path / "b", seed=2)
    assert register_final_model(uri, other_id, name, "candidate").version == "2"
    _same(resolve(f"models:/{name}@candidate", tracking_uri=uri).state, other)
    _same(resolve(f"models:/{name}/1", tracking_uri=uri).state, weights)


def test_the_input_example_of_a_full_size_model_stays_small() -> None:
    clip = example_clip((3, 16, 224, 224), (0.45, 0.45, 0.45), (0.225, 0.225, 0.225))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, clip=clip)
    assert clip.shape == (1, 3, 16, 224, 224) and len(buffer.getvalue()) < 200_000
    assert -2.1 < clip.min() < clip.max() < 2.5  # normalised: (pixel / 255 - mean) / std


def test_a_refused_registration_keeps_the_run_and_says_how_to_register_by_hand(
        sqlite_uri: str, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store refuses new versions (a trigger in its database); the error is one line ending with the command
    that registers the model, which then works once the store accepts versions again."""
    uri = sqlite_uri
    db = uri.removeprefix("sqlite:///")
    run_id, weights = _job_run(uri, "reg", "job-c", tmp_path / "c", seed=3)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TRIGGER refuse BEFORE INSERT ON model_versions BEGIN SELECT RAISE(ABORT, 'no'); END")
    with pytest.raises(RegistryError) as caught:
        register_job_model(uri, TrackingConfig(experiment="reg", register_as="tiny", register_alias="prod"), "job-c")
    message = str(caught.value)
    assert "\n" not in message and f"registering runs:/{run_id}/model as 'tiny' failed" in message
    command = message.split("register it by hand: ")[1]
    assert command == f"python -m pipeline.register --model runs:/{run_id}/model --name tiny --alias prod " \
                      f"--tracking-uri '{uri}'"
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED" and not client.search_model_versions("name = 'tiny'")
    with pytest.raises(RegistryError, match=r"no finished run tagged mvit.job_key=job-x .* register it by hand: "
                                            r"python -m pipeline.register --model runs:/RUN_ID/model --name tiny "):
        register_job_model(uri, TrackingConfig(experiment="reg", register_as="tiny"), "job-x")

    with sqlite3.connect(db) as con:
        con.execute("DROP TRIGGER refuse")
    assert register_main(shlex.split(command)[3:]) == 0
    printed = capsys.readouterr().out
    assert f"registered models:/tiny/1 (alias @prod: models:/tiny@prod) from runs:/{run_id}/model" in printed
    _same(resolve("models:/tiny@prod", tracking_uri=uri).state, weights)

    # a store that cannot be reached: one line, its password redacted
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(RegistryError) as caught:
        register_job_model("http://bob:Sw0rdfish-42@127.0.0.1:9/", TrackingConfig(register_as="tiny"), "job-c")
    assert "Sw0rdfish" not in str(caught.value) and "--tracking-uri 'http://bob:***@127.0.0.1:9/'" in str(caught.value)


def test_the_cli_refuses_bad_arguments_before_asking_the_store(capsys: Any) -> None:
    for argv, says in [(["--model", "/some/folder", "--name", "m"], "expected runs:/RUN_ID/model"),
                       (["--model", "runs:/abc/model", "--name", "a/b"], "must be a registered model name"),
                       (["--model", "runs:/abc/model", "--name", "m", "--alias", "v2"], "reserved by MLflow")]:
        with pytest.raises(SystemExit) as caught:
            register_main([*argv, "--tracking-uri", "sqlite:////nonexistent/x.db"])
        assert caught.value.code == 2 and says in capsys.readouterr().err, argv
