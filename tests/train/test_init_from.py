"""Starting a job from trained weights, end to end on the session's local Ray.

The source is a final model folder for the demo's network with 3 other classes, written by the job's own
exporter (``export_model``). A tiny job (the demo made small: 1 epoch of 2 steps) fine-tunes from it with
``init_head: new`` and the embedding and every block frozen: those come out equal to the source's bit for
bit, the re-initialised head trained, and MLflow records where the job started. The job's own outputs are
then the references a user would give (its final model folder and job folder, its DCP checkpoint,
``runs:/``, ``models:/`` by version and alias), which must all resolve to its weights; rerunning the job
with init_from pointing elsewhere resumes its own checkpoint and keeps its weights.
"""

from __future__ import annotations

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
                                            "optim.freeze_epochs": 1, "optim.layer_decay": 0.75})
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


def test_every_reference_to_a_real_run_resolves_to_its_weights(tuned: dict[str, Any]) -> None:
    """The final model folder and the job folder above it, the DCP checkpoint, runs:/ and models:/ (version
    and alias, registered as a user would) all give the job's final weights and what they know of it."""
    runs, uri, weights = tuned["runs"], tuned["uri"], tuned["weights"]
    (checkpoint,) = sorted(runs.joinpath("finetune").glob("checkpoint_epoch0001_*"))
    client, mlflow_run = _mlflow_run(uri, "finetune")
    run_ref = f"runs:/{mlflow_run.info.run_id}/model"
    client.create_registered_model("tiny-demo")
    version = client.create_model_version("tiny-demo", run_ref, run_id=mlflow_run.info.run_id).version
    client.set_registered_model_alias("tiny-demo", "champion", version)
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
