"""The training job end to end on a local Ray: FSDP equivalence across world sizes, resume after the
driver is killed, and a real `ray job submit` that leaves a complete MLflow run.

Real components throughout: shards made by the preprocessing CLI, Ray Data + decoder actors, Ray Train
with FSDP2 on gloo, DCP checkpoints, a SQLite MLflow store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.train.job import run

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiment" / "demo.yaml"

pytestmark = pytest.mark.slow


def _overrides(shards: Path, runs: Path, **extra: object) -> list[str]:
    """The demo config, made deterministic and small: no mixing, no random drop, logged every step."""
    values: dict[str, object] = {
        "data.root": str(shards),
        "trainer.storage_path": str(runs),
        "tracking.tracking_uri": f"sqlite:///{runs}/mlflow.db",
        "tracking.log_every_steps": 1,
        "tracking.log_system_metrics": False,
        "trainer.epochs": 2,
        "trainer.eval_every_epochs": 1,
        "data.sampling.eval_clips": 1,
        "data.decoder.num_cpus": 0.25,
        "trainer.cpus_per_worker": 0.5,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _loss_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]


def _only_run(uri: str, experiment: str = "demo"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_two_fsdp_workers_give_the_same_losses_as_one_with_the_same_global_batch(train_shards, ray_cluster, tmp_path):
    histories = {}
    for workers, per_worker in ((1, 4), (2, 2)):
        runs = tmp_path / f"w{workers}"
        cfg = load_config(DEMO, _overrides(train_shards, runs, **{
            "trainer.num_workers": workers, "data.batch_size": per_worker, "data.eval_batch_size": 4,
            "optim.reference_batch_size": 4, "trainer.epochs": 1}))
        result, job = run(cfg)
        assert result.error is None
        _, mlflow_run = _only_run(job["tracking_uri"])
        assert mlflow_run.data.tags["world_size"] == str(workers)
        histories[workers] = _loss_history(job["tracking_uri"], mlflow_run.info.run_id)
    assert [s for s, _ in histories[1]] == [s for s, _ in histories[2]] and len(histories[1]) >= 3
    for (_, one), (_, two) in zip(histories[1], histories[2]):
        assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    # Final weights are not compared: Adam moves a parameter by ~lr * sign(gradient) in its first
    # steps whatever the gradient's size, so where the true gradient is ~0 (e.g. the K-pooling norm
    # bias, which shifts a whole softmax row) rounding noise summed in another order on 2 ranks
    # becomes an lr-sized difference. The loss at every step already depends on all earlier updates.


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "train.py"), "--config", str(DEMO), *overrides]


def _checkpoints(runs: Path) -> list[Path]:
    return sorted(p for p in (runs / "demo").glob("checkpoint_*") if (p / "train_state.json").is_file())


def test_driver_killed_mid_epoch_resumes_from_storage_to_identical_weights(train_shards, ray_cluster, tmp_path):
    import ray

    extra = {"trainer.checkpoint_every_steps": 1}
    uninterrupted = tmp_path / "straight"
    result, job = run(load_config(DEMO, _overrides(train_shards, uninterrupted, **extra)))
    assert result.error is None
    expected = load_file(str(Path(job["export_dir"]) / "model.safetensors"))
    expected_losses = _loss_history(job["tracking_uri"], _only_run(job["tracking_uri"])[1].info.run_id)

    # The same job as separate driver processes on the same cluster: kill the first one (SIGKILL) once
    # a mid-epoch checkpoint is in storage, then run the identical command again.
    runs = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = _train_cmd(_overrides(train_shards, runs, **extra))
    first = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(_checkpoints(runs)) < 3 and first.poll() is None:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = _checkpoints(runs)
    assert killed_at, "the first driver made no checkpoint before it was killed"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]

    got = load_file(str(runs / "demo" / "final_model" / "model.safetensors"))
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    uri = f"sqlite:///{runs}/mlflow.db"
    client, mlflow_run = _only_run(uri)  # one run for the job across the restart
    assert mlflow_run.info.status == "FINISHED"
    losses = _loss_history(uri, mlflow_run.info.run_id)
    assert [s for s, _ in losses][-1] == expected_losses[-1][0]  # the step axis continued to the same end
    assert losses[-1][1] == pytest.approx(expected_losses[-1][1], rel=1e-4)
