"""No silent hang: every fault that used to leave a job waiting forever now ends in bounded time, either
absorbed (a poison sample counted FAILED while the epoch goes on) or as one line naming the cause.

Faults are planted with ``MVIT_FAULTS`` (core/faults.py) in the real code paths; the training jobs are
the small demo job of test_training_faults.py, run by ``pipeline/train.py`` on the session's Ray, which
carries the plan to every worker and actor through the job's runtime environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import faults
from tests.data.data_helpers import shard_keys, small_config
from tests.train.helpers import demo_overrides

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiment" / "demo.yaml"


def _job(shards: Path, runs: Path, plan: dict, timeout: float, **extra: object) -> tuple[subprocess.CompletedProcess, float]:
    """The small 2-worker demo job with ``plan`` planted; (its outcome, seconds it ran)."""
    import ray

    overrides = demo_overrides(shards, runs, **{"trainer.num_workers": 2, "data.batch_size": 2,
                                                "data.eval_batch_size": 4, "optim.reference_batch_size": 4, **extra})
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, faults.ENV: json.dumps(plan)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "pipeline" / "train.py"), "--config", str(DEMO), *overrides],
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return done, time.monotonic() - started


def _error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-4000:]
    return lines[0]


def test_unplaceable_decoder_actors_fail_in_bounded_time_naming_what_is_missing(
    reliability_shards: Path, ray_cluster: None
) -> None:
    """Decoder actors that cannot be placed end the epoch after decoder.start_timeout_s, naming the missing resource."""
    from pipeline.data.loader import DataStalled, ShardLoader
    from pipeline.data.service import build_dataset

    cfg = small_config(str(reliability_shards))
    cfg.decoder.resources = {"mvit_cpu_node": 1.0}  # the CPU group, gone (this cluster never had it)
    cfg.decoder.start_timeout_s = 5
    loader = ShardLoader(build_dataset(cfg, "train", train=True).iterator(), prefetch_batches=1)
    started = time.monotonic()
    with pytest.raises(DataStalled) as raised:
        for _ in loader.epoch(0, 0):
            pass
    assert time.monotonic() - started < 120
    message = str(raised.value)
    assert "the decoder actors were not placed within data.decoder.start_timeout_s" in message
    assert "need {CPU: 1, mvit_cpu_node: 1} each, 1 at least" in message
    assert "the cluster lacks mvit_cpu_node (free 0 of 0)" in message


@pytest.mark.slow
def test_poison_samples_in_a_job_are_counted_failed_by_name_and_training_goes_on(
    reliability_shards: Path, ray_cluster: None, tmp_path: Path, ledger: object
) -> None:
    """A segfault, an abort, an OOM kill and a hang planted in four videos: the job finishes, each is FAILED with key and reason."""
    from mlflow.tracking import MlflowClient

    keys = shard_keys(reliability_shards, "train")
    poison = dict(zip(keys[:4], ("segfault", "abort", "kill", "hang")))
    runs = tmp_path / "runs"
    done, took = _job(reliability_shards, runs, {"decode": poison}, timeout=900,
                      **{"data.decoder.sample_timeout_s": 5, "data.decoder.sample_retries": 1})  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    for name in ("data/failed", "data/samples"):
        history = [m.value for m in client.get_metric_history(run.info.run_id, name)]
        expected = {"data/failed": 4.0, "data/samples": len(keys) - 4.0}[name]
        assert history == [expected, expected], (name, history)  # both epochs: the others delivered
    for epoch in (0, 1):
        path = client.download_artifacts(run.info.run_id, f"data/failed-epoch-{epoch:04d}.json", str(tmp_path))
        listed = json.loads(Path(path).read_text())
        reasons = dict(listed["listed"])
        assert set(reasons) == set(poison)
        assert all(f"killed by {sig}" in reasons[k] for k, sig in
                   zip(keys[:3], ("SIGSEGV", "SIGABRT", "SIGKILL")))  # fmt: skip
        assert "did not finish within decoder.sample_timeout_s=5 s" in reasons[keys[3]]
    assert "samples failed and were skipped" in done.stderr
    ledger.account_epochs(len(keys), client, run.info.run_id, epochs=2)  # each epoch whole, keys checked


@pytest.mark.slow
def test_a_rank_that_raises_mid_epoch_ends_the_job_promptly_naming_it(
    reliability_shards: Path, ray_cluster: None, tmp_path: Path
) -> None:
    """Rank 1 raises before step 2 while rank 0 waits in a collective: the job ends within bounds, naming rank 1's error."""
    done, took = _job(reliability_shards, tmp_path / "runs", {"raise_at": {"rank": 1, "step": 2}}, timeout=600)
    assert done.returncode == 1
    line = _error_line(done)
    assert "rank 1: core.faults.PlantedFault: planted failure on rank 1 before step 2" in line or \
        "rank 1: PlantedFault: planted failure on rank 1 before step 2" in line, line
    assert took < 300, took  # a whole uninterrupted job takes about 100 s here


@pytest.mark.slow
def test_a_data_service_that_stops_delivering_ends_the_job_with_a_diagnosis(
    reliability_shards: Path, ray_cluster: None, tmp_path: Path
) -> None:
    """A decode that hangs inside the actor itself (isolation off): the ranks stop after data.batch_timeout_s, saying why."""
    victim = shard_keys(reliability_shards, "train")[5]
    done, took = _job(reliability_shards, tmp_path / "runs", {"decode": {victim: "hang"}}, timeout=600,
                      **{"data.decoder.isolate": False, "data.batch_timeout_s": 20})  # fmt: skip
    assert done.returncode == 1
    line = _error_line(done)
    assert "the data service stopped delivering in epoch 0" in line and "no batch for 20 s (data.batch_timeout_s)" in line
    assert "a stage is stuck" in line, line
    assert took < 300, took


def _ray_job_ids() -> set[str]:
    from ray.util.state import list_jobs

    return {j.job_id for j in list_jobs(limit=10_000) if j.job_id}


def _failed_job(shards: Path, runs: Path, plan: dict, error: str, **extra: object) -> str:
    """Runs the job with ``plan`` and ``trainer.max_failures=0``, checks it failed within bounds with one
    line containing ``error``; returns its Ray job id (the driver, pipeline/train.py, is a Ray job of its
    own), whose task and actor records Ray's state API keeps after it ended."""
    before = _ray_job_ids()
    done, took = _job(shards, runs, plan, timeout=600, **{"trainer.max_failures": 0, **extra})
    assert done.returncode == 1, done.stderr[-4000:]
    line = _error_line(done)
    assert error in line, line
    assert took < 300, took
    (job_id,) = _ray_job_ids() - before
    return job_id


def _gcs() -> str:
    """This test process's Ray cluster: the state API would refuse to guess when other clusters run on the
    machine (a namespace cluster of tests/cluster, another session's)."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.mark.slow
def test_a_read_task_that_keeps_dying_is_retried_exactly_read_max_retries_times(
    reliability_shards: Path, ray_cluster: None, tmp_path: Path
) -> None:
    """A read task whose process dies on every attempt: Ray runs it 1 + data.read_max_retries times, then the job fails."""
    from ray.util.state import list_tasks

    shard = sorted(p.name for p in reliability_shards.glob("train-*.tar"))[0]
    job_id = _failed_job(reliability_shards, tmp_path / "runs", {"kill_read": [shard]},
                         "WorkerCrashedError: The worker died unexpectedly while executing this task",
                         **{"data.read_max_retries": 1})  # fmt: skip
    tasks = list_tasks(address=_gcs(), filters=[("job_id", "=", job_id)], limit=10_000, detail=True,
                       raise_on_missing_output=False)  # fmt: skip
    attempts: dict[str, set[int]] = {}
    for task in tasks:
        if task.name.startswith("ReadMViTShards") and task.state == "FAILED":
            attempts.setdefault(task.task_id, set()).add(task.attempt_number)
    # A read task tried twice (1 + read_max_retries) failed the job. The same shard's read for the next
    # epoch (read ahead by the same execution) runs beside it and may have used its tries too by then; no
    # task is ever tried more often.
    assert any(tries == {0, 1} for tries in attempts.values()), attempts
    assert all(tries <= {0, 1} for tries in attempts.values()), attempts
    assert len(attempts) <= 2, attempts  # this epoch's read of the shard and the next epoch's, nothing else


@pytest.mark.slow
def test_a_decoder_actor_that_keeps_dying_is_restarted_exactly_max_restarts_times(
    reliability_shards: Path, ray_cluster: None, tmp_path: Path
) -> None:
    """A decoder actor that dies on every try of one batch: Ray restarts it data.decoder.max_restarts times, then the job fails."""
    from ray.util.state import list_actors

    key = shard_keys(reliability_shards, "train")[0]
    job_id = _failed_job(reliability_shards, tmp_path / "runs", {"kill_decoder_actor": [key]},
                         "ActorDiedError: The actor died unexpectedly before finishing this task",
                         **{"data.decoder.max_restarts": 2})  # fmt: skip
    actors = list_actors(address=_gcs(), filters=[("job_id", "=", job_id)], limit=10_000, detail=True,
                         raise_on_missing_output=False)  # fmt: skip
    decoders = [(a.state, a.num_restarts) for a in actors if "Decoder" in a.class_name]
    assert decoders.count(("DEAD", 2)) == 1, decoders  # the one that got the batch: restarted twice, then gone
    assert all(restarts <= 2 for _, restarts in decoders), decoders
