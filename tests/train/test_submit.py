"""The main job of README.md's demo (scripts/demo.sh): `ray job submit` of pipeline/train.py to a local
Ray cluster with token auth, on a synthetic Kinetics dataset, ending in an MLflow run that learned (well
above chance)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import local_cluster
from tests.train.helpers import synthetic_kinetics_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ray_job_submit_of_the_demo_learns_and_leaves_a_complete_mlflow_run(tmp_path):
    # the same data as scripts/demo.sh
    shards = synthetic_kinetics_shards(tmp_path, classes=4, per_class=40, val_per_class=8, shard_samples=20)
    runs = tmp_path / "runs"

    cluster = local_cluster.start(num_cpus=4, token_file=tmp_path / "ray_token")
    try:
        # A client without the cluster's token is refused.
        (tmp_path / "wrong_token").write_text("0" * 64)
        denied = subprocess.run(
            [local_cluster.ray_executable(), "job", "list", "--address", cluster.dashboard_url],
            env={**cluster.env(), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong_token")}, capture_output=True,
            text=True, timeout=120)
        assert denied.returncode != 0 and "token" in (denied.stdout + denied.stderr).lower()

        uri = f"sqlite:///{runs}/mlflow.db"
        done = cluster.submit(["python", "pipeline/train.py", "--config", "configs/experiment/demo.yaml",
                               f"data.root={shards}", f"trainer.storage_path={runs}", f"tracking.tracking_uri={uri}"],
                              working_dir=REPO, timeout=1200)
        assert done.returncode == 0
    finally:
        cluster.stop()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["model.preset"] == "mvit_b_16x4" and params["trainer.epochs"] == "10"
    assert params["model.num_classes"] == "4" and params["data.root"] == str(shards)
    assert {"git_commit", "config_hash", "dataset_manifest_hash", "world_size", "ray_version",
            "torch_version"} <= tags.keys()
    assert metrics["val/video_top1"] >= 60.0, metrics  # 4 classes: chance is 25%
    assert metrics["data/failed"] == 0 and metrics["data/samples"] == 160
    for name in ("train/loss", "train/lr", "train/clips_per_s", "train/data_wait_fraction"):
        assert len(client.get_metric_history(run.info.run_id, name)) >= 10, name
    artifacts = {a.path for folder in ("config", "data", "model") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"config/resolved_config.yaml", "data/train.manifest.json", "model/model.safetensors",
            "model/torchvision_state_dict.pt"} <= artifacts
    resolved = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config/resolved_config.yaml")).read_text())
    assert resolved["name"] == "demo" and resolved["data"]["root"] == str(shards)
