"""Starting a job from trained weights, end to end on the session's local Ray.

The source is a final model folder for the demo's network with 3 other classes, written by the job's own
exporter (``export_model``). A tiny job (the demo made small: 1 epoch of 2 steps) fine-tunes from it with
``init_head: new`` and the embedding and every block frozen: those come out equal to the source's bit for
bit, the re-initialised head trained, and MLflow records where the job started. The job's own outputs are
then the references a user would give (its final model folder and job folder, its DCP checkpoint,
``runs:/``, ``models:/`` by version and alias: the job registers its final model, ``tracking.register_as``),
which must all resolve to its weights; rerunning the job with init_from pointing elsewhere resumes its own
checkpoint, keeps its weights and registers nothing new.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import build_model_config, load_config
from pipeline.model_ref import ModelRefError, resolve
from pipeline.models.mvit import MViT
from pipeline.trainer.export import export_model
from pipeline.trainer.job import run
from tests.models.helpers import tiny_config
from tests.train.helpers import demo_overrides, synthetic_kinetics_shards

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiment" / "demo.yaml"
DEPTH = 4  # the demo model's blocks


def _overrides(shards: Path, runs: Path, **extra: object) -> list[str]:
    """The demo job, 1 epoch of 2 steps (4 training clips, batch 2), validated once."""
    return demo_overrides(shards, runs, **{"trainer.epochs": 1, "data.batch_size": 2, "data.eval_batch_size": 2,
                                           "optim.reference_batch_size": 2, **extra})


def _final(runs: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(runs / name / "final_model" / "model.safetensors"))


def _mlflow_run(uri: str, name: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id],
                                  filter_string=f"attributes.run_name = '{name}'")
    return client, found


def _demo_network(classes: int, seed: int) -> MViT:
    """The demo's network for ``classes`` classes, initialised from ``seed``."""
    cfg = load_config(DEMO, [f"model.num_classes={classes}"])
    torch.manual_seed(seed)
    return MViT(build_model_config(cfg.model))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def tuned(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fine-tuning job (name ``finetune``) and its source."""
    root = tmp_path_factory.mktemp("init_from")
    shards = synthetic_kinetics_shards(root, classes=2, per_class=2, val_per_class=1, shard_samples=2, fps=15)
    source = _demo_network(classes=3, seed=1)
    export_model(source.state_dict(), source.cfg, root / "source", classes=["a", "b", "c"])
    runs = root / "runs"
    overrides = _overrides(shards, runs, **{"name": "finetune", "model.init_from": str(root / "source"),
                                            "model.init_head": "new", "optim.freeze_blocks": DEPTH,
                                            "optim.freeze_epochs": 1, "optim.layer_decay": 0.75,
                                            "tracking.register_as": "tiny-demo", "tracking.register_alias": "champion",
                                            # and the training step's augment.on_device path: the actors send
                                            # crops, the worker resizes (and would flip and augment) them
                                            "data.augment.on_device": True})
    result, job = run(load_config(DEMO, overrides))
    assert result.error is None, result.error
    return {"root": root, "runs": runs, "uri": job.tracking_uri, "source": source.state_dict(), "job": job,
            "overrides": overrides, "weights": _final(runs, "finetune")}


def test_a_job_fine_tunes_from_a_final_model_with_a_new_head_and_frozen_blocks(tuned: dict[str, Any]) -> None:
    weights, source = tuned["weights"], tuned["source"]
    frozen = [k for k in weights if not k.startswith(("head.", "norm."))]
    _assert_same({k: weights[k] for k in frozen}, {k: source[k] for k in frozen})
    assert weights["head.projection.weight"].shape == (2, source["head.projection.weight"].shape[1])
    assert not torch.equal(weights["norm.weight"], source["norm.weight"])  # the unfrozen layers trained
    _, mlflow_run = _mlflow_run(tuned["uri"], "finetune")
    assert mlflow_run.data.tags["init_from"].startswith(str(tuned["root"] / "source") + " (final_model")
    assert mlflow_run.data.tags["init_reinitialized"] == "head.projection.bias,head.projection.weight"
    assert mlflow_run.data.params["model.init_from"] == str(tuned["root"] / "source")
    assert mlflow_run.data.params["data.augment.on_device"] == "True"


def test_every_reference_to_a_real_run_resolves_to_its_weights(tuned: dict[str, Any]) -> None:
    """The final model folder and the job folder above it, the DCP checkpoint, runs:/ and models:/ (version
    and alias, registered by the job) all give the job's final weights and what they know of it."""
    runs, uri, weights = tuned["runs"], tuned["uri"], tuned["weights"]
    (checkpoint,) = sorted(runs.joinpath("finetune").glob("checkpoint_epoch0001_*"))
    client, mlflow_run = _mlflow_run(uri, "finetune")
    run_ref = f"runs:/{mlflow_run.info.run_id}/model"
    (registered,) = client.search_model_versions("name = 'tiny-demo'")  # by the job: tracking.register_as
    version = str(registered.version)
    assert (version, registered.run_id) == ("1", mlflow_run.info.run_id)
    assert str(client.get_model_version_by_alias("tiny-demo", "champion").version) == version
    assert json.loads(registered.tags["classes"]) == tuned["job"].classes
    from mlflow.models import Model  # the input recipe registered is the job's own config

    mlmodel = Model.load(client.download_artifacts(mlflow_run.info.run_id, "model/MLmodel", str(tuned["root"])))
    assert mlmodel.metadata["input"]["recipe"] == f"runs:/{mlflow_run.info.run_id}/config/resolved_config.yaml"
    for ref, kind in [(str(runs / "finetune" / "final_model"), "final_model"), (str(runs / "finetune"), "final_model"),
                      (str(checkpoint), "dcp"), (run_ref, "final_model"), (f"models:/tiny-demo/{version}", "final_model"),
                      ("models:/tiny-demo@champion", "final_model")]:
        resolved = resolve(ref, tracking_uri=uri)
        assert resolved.kind == kind, ref
        _assert_same(resolved.state, weights)
        if kind == "final_model":
            assert resolved.classes == tuned["job"].classes and resolved.model_config.depth == DEPTH, ref
    for ref in ("runs:/0123456789abcdef/model", "models:/tiny-demo/7", "models:/tiny-demo@nobody", "models:/nobody/1"):
        with pytest.raises(ModelRefError, match="not found in the MLflow store") as err:
            resolve(ref, tracking_uri=uri)
        assert "\n" not in str(err.value)


def test_rerunning_the_job_resumes_its_checkpoint_whatever_init_from_says(tuned: dict[str, Any]) -> None:
    other = tuned["root"] / "other.pt"  # weights that fit the job's network, and are not its own
    torch.save(_demo_network(classes=2, seed=2).state_dict(), other)
    overrides = [f"model.init_from={other}" if o.startswith("model.init_from=") else o for o in tuned["overrides"]]
    result, _ = run(load_config(DEMO, overrides))
    assert result.error is None, result.error
    _assert_same(_final(tuned["runs"], "finetune"), tuned["weights"])
    client, _ = _mlflow_run(tuned["uri"], "finetune")  # registered again: the version it has already
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny-demo'")] == ["1"]


def test_refusals_come_before_any_worker_starts(tuned: dict[str, Any], tmp_path: Path) -> None:
    """An empty reference (a preset's placeholder), a missing path and weights of another network are refused
    by the driver, one line each."""
    from pipeline.config import ConfigError

    base = [o for o in tuned["overrides"] if not o.startswith(("model.init_from=", "trainer.storage_path="))]
    base.append(f"trainer.storage_path={tmp_path / 'runs'}")
    with pytest.raises(ConfigError, match="model.init_from is empty"):
        run(load_config(DEMO, base + ["model.init_from=''"]))
    with pytest.raises(ConfigError, match="no such file or folder"):
        run(load_config(DEMO, base + [f"model.init_from={tmp_path / 'missing'}"]))
    wrong = tmp_path / "wrong.pt"
    torch.save(MViT(tiny_config(1)).state_dict(), wrong)
    with pytest.raises(ConfigError, match="does not fit the model") as err:
        run(load_config(DEMO, base + [f"model.init_from={wrong}"]))
    assert "\n" not in str(err.value)


def test_evaluating_the_final_model_reproduces_the_jobs_last_validation(tuned: dict[str, Any], tmp_path: Path) -> None:
    """``pipeline.evaluate`` of the job's final model, with the job's config, on the Ray cluster: the same
    numbers as the job's last validation, a report and a PNG in MLflow and in --out, linked to the job's run."""
    from pipeline.evaluate import CONFUSION_FILE, EVALUATES_TAG, KIND_TAG, REPORT_FILE, evaluate

    report = evaluate(load_config(DEMO, tuned["overrides"]), str(tuned["runs"] / "finetune" / "final_model"),
                      out=str(tmp_path / "eval"))
    client, trained = _mlflow_run(tuned["uri"], "finetune")
    for key in ("video_top1", "video_top5", "view_top1", "view_top5", "videos", "views"):
        assert report["metrics"][f"eval/{key}"] == trained.data.metrics[f"val/{key}"], key
    assert report["training_run"] == trained.info.run_id and report["data"]["failed"] == 0
    videos = int(report["metrics"]["eval/videos"])
    assert sum(map(sum, report["confusion"])) == videos == len(report["predictions"])
    assert [c["videos"] for c in report["per_class"]] == [sum(row) for row in report["confusion"]]
    evaluation = client.get_run(report["mlflow_run"])
    assert evaluation.data.tags[KIND_TAG] == "evaluation" and evaluation.data.tags[EVALUATES_TAG] == trained.info.run_id
    assert evaluation.data.metrics["eval/video_top1"] == report["metrics"]["eval/video_top1"]
    assert {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluation")} == {
        f"evaluation/{REPORT_FILE}", f"evaluation/{CONFUSION_FILE}"}
    assert json.loads((tmp_path / "eval" / REPORT_FILE).read_text()) == report
    assert (tmp_path / "eval" / CONFUSION_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_a_bad_reference_or_a_mismatch_before_any_worker_starts(tuned: dict[str, Any],
                                                                                 tmp_path: Path) -> None:
    from pipeline.config import ConfigError
    from pipeline.evaluate import main, parse_views, prepare

    cfg = load_config(DEMO, tuned["overrides"])
    final = str(tuned["runs"] / "finetune" / "final_model")
    cases = [(cfg, str(tmp_path / "missing"), "no such file or folder"),
             (cfg, str(tuned["root"] / "source"), r"model/data mismatch: .* takes classes 3 \(for split 'val': 2\)"),
             (load_config(DEMO, tuned["overrides"] + ["data.sampling.num_frames=4"]), final,
              r"model/data mismatch: the model takes 8x64\^2 clips but the data service makes 4x64\^2"),
             (load_config(DEMO, tuned["overrides"] + ["model.num_classes=5"]), final, "model.num_classes=5 but split")]
    for config, ref, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            prepare(config, ref, "val")
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no manifest for split 'test'"):
        prepare(cfg, final, "test")
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0
    assert parse_views("10x3") == (10, 3)
    for bad in ("10", "0x1", "2x2", "ax3"):
        with pytest.raises(ConfigError, match="--views"):
            parse_views(bad)
