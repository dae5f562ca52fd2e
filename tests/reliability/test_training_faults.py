"""Faults during training: a Ray Train worker killed, the driver killed and the job rerun (also on
another worker count), a decoder actor killed mid-epoch.

All runs are the demo job made small and deterministic (2 FSDP workers x 2 clips, 3 steps per epoch,
2 epochs, a checkpoint every step) on the session's local Ray; one uninterrupted run is the reference.
The driver case reruns on 1 worker x 4 clips and compares every step's loss with the 2-worker
reference, so it is also the job-level check that FSDP2 on 2 ranks trains as 1 rank does (the
model-level check is tests/models/test_fsdp.py).
The driver case reruns on 1 worker x 4 clips and compares every step's loss with the 2-worker
reference, so it is also the job-level check that FSDP2 on 2 ranks trains as 1 rank does (the
model-level check is tests/models/test_fsdp.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from faults import FaultProxy  # tests/reliability/faults.py
from processes import local_processes
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.trainer.job import run
from tests.train.helpers import demo_overrides

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiment" / "demo.yaml"
WORKERS, PER_WORKER = 2, 2


def _overrides(shards: Path, runs: Path, **extra: object) -> list[str]:
    """The small demo job, 2 FSDP workers x 2 clips (3 steps an epoch), a checkpoint every step."""
    return demo_overrides(shards, runs, **{
        "trainer.checkpoint_every_steps": 1,
        "trainer.num_workers": WORKERS,
        "data.batch_size": PER_WORKER,
        "data.eval_batch_size": 4,
        "optim.reference_batch_size": WORKERS * PER_WORKER,
        **extra,
    })


def _mlflow_run(uri: str) -> tuple[Any, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert len(runs) == 1, f"expected one MLflow run for the job, found {[r.info.run_id for r in runs]}"
    return client, runs[0]


def _losses(uri: str) -> dict[int, list[float]]:
    """Step -> every train/loss value logged at that step (a step redone after a restart logs twice)."""
    client, mlflow_run = _mlflow_run(uri)
    out: dict[int, list[float]] = {}
    for metric in client.get_metric_history(mlflow_run.info.run_id, "train/loss"):
        out.setdefault(metric.step, []).append(metric.value)
    return dict(sorted(out.items()))


def _identity_checked(uri: str) -> list[float]:
    """``data/identity_checked`` per trained epoch: 1 where the epoch's samples were checked against the
    manifest's keys, including an epoch resumed from a mid-epoch checkpoint (its carry)."""
    client, mlflow_run = _mlflow_run(uri)
    return [m.value for m in client.get_metric_history(mlflow_run.info.run_id, "data/identity_checked")]


def _weights(runs: Path) -> dict[str, torch.Tensor]:
    return load_file(str(runs / "demo" / "final_model" / "model.safetensors"))


def _snapshot_step(text: str | None) -> int:
    """Step of the latest checkpoint Ray Train has registered (the one a restart resumes from), read
    from its ``checkpoint_manager_snapshot.json`` text; 0 if there is none yet.

    A checkpoint directory appears in storage before the controller registers it, so its presence
    alone does not mean a restart would use it.
    """
    import json

    try:
        snapshot = json.loads(text) if text else {}
    except json.JSONDecodeError:  # caught mid-write
        return 0
    name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or "_step0"
    return int(name.rsplit("_step", 1)[1])


def _registered_step(runs: Path) -> int:
    try:
        return _snapshot_step((runs / "demo" / "checkpoint_manager_snapshot.json").read_text())
    except FileNotFoundError:
        return 0


def _assert_resumed_after(losses: dict[int, list[float]], registered: int) -> None:
    """Steps up to the resumed checkpoint were trained once: the restart did not start over."""
    assert registered >= 1
    assert all(len(losses[step]) == 1 for step in range(1, registered + 1)), losses


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 600, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive(), f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _processes(marker: str) -> list[psutil.Process]:
    return local_processes(marker)


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_worker_sigkill_restarts_from_the_latest_checkpoint_to_identical_weights(
    reliability_shards: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    """A Ray Train worker SIGKILLed mid-epoch: restarted from the latest checkpoint, same final weights, one MLflow run."""
    runs = tmp_path / "runs"
    thread, outcome = _run_in_thread(load_config(DEMO, _overrides(reliability_shards, runs, **{"trainer.max_failures": 2})))
    _wait_for(lambda: _registered_step(runs) >= 2, "a registered checkpoint at step 2",
              alive=_still_running(thread, outcome))
    workers = _processes("RayTrainWorker")
    assert len(workers) == WORKERS, [w.info["cmdline"] for w in workers]
    victim = workers[-1]
    victim.send_signal(signal.SIGKILL)
    registered = _registered_step(runs)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the job did not finish after a worker was killed"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].error is None
    assert not victim.is_running()

    assert registered < 6, "the job finished before the worker was killed"
    _assert_same_weights(_weights(runs), reference["weights"])
    losses = _losses(outcome["job"].tracking_uri)
    assert list(losses) == list(range(1, 7))  # one run, a continuous step axis to the same end
    _assert_resumed_after(losses, registered)
    for step, values in losses.items():  # a step redone after the restart repeats the same loss
        assert values == pytest.approx([reference["losses"][step]] * len(values), rel=1e-5), step
    _, mlflow_run = _mlflow_run(outcome["job"].tracking_uri)
    assert mlflow_run.info.status == "FINISHED"
    assert _identity_checked(outcome["job"].tracking_uri) == [1.0, 1.0]  # the resumed epoch checked whole


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "train.py"), "--config", str(DEMO), *overrides]


@pytest.mark.slow
def test_killed_driver_rerun_resumes_from_storage_on_another_worker_count(
    reliability_shards: Path, reference: dict[str, Any], ray_cluster: None, tmp_path: Path
) -> None:
    """The driver SIGKILLed, the same job rerun on 1 worker instead of 2: resumes from storage, same losses, one MLflow run."""
    import ray

    runs = tmp_path / "runs"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.Popen(_train_cmd(_overrides(reliability_shards, runs)), env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for(lambda: _registered_step(runs) >= 2, "a registered checkpoint at step 2",
                  alive=lambda: first.poll() is None)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    registered = _registered_step(runs)
    assert registered < 6, "the first driver finished before it was killed"

    # The same global batch (1 x 4 instead of 2 x 2), so the same steps and learning rates.
    rerun = _train_cmd(_overrides(reliability_shards, runs, **{"trainer.num_workers": 1, "data.batch_size": 4}))
    second = subprocess.run(rerun, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoint written by 2 workers" in second.stdout + second.stderr

    uri = f"sqlite:///{runs}/mlflow.db"
    losses = _losses(uri)
    assert list(losses) == list(range(1, 7))  # one run, steps 1..6
    _assert_resumed_after(losses, registered)
    for step, values in losses.items():
        # Summing gradients over 1 rank instead of 2 changes rounding only.
        assert values == pytest.approx([reference["losses"][step]] * len(values), rel=1e-4, abs=1e-5), step
    _, mlflow_run = _mlflow_run(uri)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["world_size"] == "1"
    # the epoch the rerun resumed mid-way, on another worker count, is checked whole (every sample once)
    assert _identity_checked(uri) == [1.0, 1.0]
    got = _weights(runs)
    assert got.keys() == reference["weights"].keys()


def test_decoder_actor_killed_mid_epoch_is_replaced_and_no_sample_is_lost(
    reliability_shards: Path, ray_cluster: None, ledger: Any
) -> None:
    """A decoder actor SIGKILLed during an epoch, twice: Ray Data restarts it and every sample arrives exactly once."""
    from pipeline.data.loader import ShardLoader
    from pipeline.data.service import build_dataset
    from tests.data.data_helpers import shard_keys, small_config

    cfg = small_config(str(reliability_shards), batch_size=2)
    cfg.decoder.min_actors = cfg.decoder.max_actors = 1
    cfg.augment.repeated_aug = 1
    loader = ShardLoader(build_dataset(cfg, "train", train=True).iterator(), prefetch_batches=1)
    delivered: list[str] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for batch in loader.epoch(0, 0):
                delivered.extend(batch["video_id"])
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    killed: list[int] = []
    # First kill: as soon as the actor exists, before it has delivered anything (so it certainly had
    # work left); second kill: the replacement, once the first batches have arrived.
    for wait_for_batches in (0, 2):
        _wait_for(lambda: len(delivered) >= wait_for_batches and _decoders(exclude=killed), "a decoder actor",
                  alive=consumer.is_alive)  # fmt: skip
        if wait_for_batches == 0:
            assert not delivered, "the epoch had started delivering before the actor was killed"
        for proc in _decoders(exclude=killed):
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)
    consumer.join(timeout=600)
    assert not consumer.is_alive() and not errors, errors
    assert len(killed) >= 2
    stats = loader.stats
    assert stats.complete and stats.failed == 0
    ledger.account(inputs=shard_keys(reliability_shards, "train"), delivered=delivered)


def _decoders(exclude: list[int]) -> list[psutil.Process]:
    return [p for p in _processes("MapBatches(Decoder)") if p.pid not in exclude]


def _s3_bucket(endpoint: str) -> str:
    import uuid

    import s3fs

    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
    return bucket


def _s3_registered_step(endpoint: str, prefix: str) -> int:
    """``_registered_step`` for storage on S3, read around the fault proxy (straight from moto)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    try:
        return _snapshot_step(fs.cat_file(f"{prefix}/demo/checkpoint_manager_snapshot.json").decode())
    except FileNotFoundError:
        return 0


def _run_in_thread(cfg: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"], outcome["job"] = run(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit)
    thread.start()
    return thread, outcome


def _still_running(thread: threading.Thread, outcome: dict[str, Any]) -> Callable[[], bool]:
    """``alive`` for ``_wait_for`` that says how the job ended if it did."""

    def alive() -> bool:
        if thread.is_alive():
            return True
        result = outcome.get("result")
        raise AssertionError(f"the job ended early: {outcome.get('error') or (result.error if result else None)}")

    return alive


@pytest.fixture(scope="module")
def reference(reliability_shards: Path, ray_cluster: None, s3_server: str,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # fmt: skip
    """The run every other training case is compared with, itself a fault case: an uninterrupted job
    whose checkpoints go to S3 through a proxy that answers the first uploads with 503 SlowDown, drops
    the next ones' connections, and drops every request for 3 s mid-run.

    Retried requests leave no trace in the training (no restart), so its weights are those of a
    fault-free run; ``test_checkpoint_writes_to_a_flaky_object_store_are_retried`` checks that claim.
    """
    import s3fs

    tmp = tmp_path_factory.mktemp("reference")
    prefix = f"s3://{_s3_bucket(s3_server)}/runs"
    with FaultProxy(s3_server) as proxy:
        cfg = load_config(DEMO, _overrides(reliability_shards, tmp, **{
            "trainer.storage_path": prefix, "data.s3_endpoint_url": proxy.url, "trainer.max_failures": 2}))
        proxy.fail_next(3, status=503, methods={"PUT"})  # the first checkpoint's uploads
        proxy.drop_next(2, methods={"PUT"})
        thread, outcome = _run_in_thread(cfg)
        _wait_for(lambda: _s3_registered_step(s3_server, prefix) >= 2, "a registered checkpoint",
                  alive=_still_running(thread, outcome))
        proxy.drop_for(3.0)  # every request for 3 s, mid-run
        thread.join(timeout=900)
        assert not thread.is_alive(), "the job hung"
        stats = dataclasses.replace(proxy.stats)
    assert "error" not in outcome, outcome.get("error")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    fs.get(f"{prefix}/demo/final_model/", str(tmp / "final"), recursive=True)
    losses = _losses(outcome["job"].tracking_uri)
    return {
        "weights": load_file(str(tmp / "final" / "model.safetensors")),
        "all_losses": losses,
        "losses": {s: v[0] for s, v in losses.items()},
        "faults": stats,
    }


@pytest.mark.slow
def test_checkpoint_writes_to_a_flaky_object_store_are_retried(reference: dict[str, Any]) -> None:
    """S3 answers checkpoint uploads with 503s and dropped connections for a while: retried, no restart, model exported."""
    assert reference["faults"].errors >= 3 and reference["faults"].drops >= 2  # the faults did happen
    # Every step trained once: the faults cost retries, not a restart from a checkpoint.
    assert {s: len(v) for s, v in reference["all_losses"].items()} == {s: 1 for s in range(1, 7)}
    assert reference["weights"]  # the final model reached S3 through the same flaky store
    # That these weights equal a fault-free run's is shown by the worker and driver cases, which
    # restore from local checkpoints and end with the same weights / losses.


@pytest.mark.slow
def test_a_lasting_object_store_outage_fails_the_job_clearly_within_bounds(
    reliability_shards: Path, fault_proxy: Any, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 goes down for good mid-run: the job fails with a clear storage error in bounded time; no partial checkpoint is registered."""
    import json

    import s3fs

    # 3 tries per request instead of 10 (read by the driver, shipped with the filesystem): the same
    # path to failure, sooner.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")

    prefix = f"s3://{_s3_bucket(s3_server)}/runs"
    cfg = load_config(DEMO, _overrides(reliability_shards, tmp_path, **{
        "trainer.storage_path": prefix, "data.s3_endpoint_url": fault_proxy.url, "trainer.max_failures": 1}))
    thread, outcome = _run_in_thread(cfg)
    _wait_for(lambda: _s3_registered_step(s3_server, prefix) >= 1, "a registered checkpoint",
              alive=_still_running(thread, outcome))
    fault_proxy.fail_always(status=None)  # connections dropped from now on
    outage = time.monotonic()
    thread.join(timeout=600)
    assert not thread.is_alive(), "the job hung on a storage outage"
    elapsed = time.monotonic() - outage
    assert elapsed < 180, f"the job took {elapsed:.0f} s to give up"
    from pipeline.trainer.job import JobFailed

    error = outcome.get("error")
    assert isinstance(error, JobFailed), f"expected a clear job failure, got {error!r}, result {outcome.get('result')}"
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    cause = message.split("): ", 1)[1]  # after the job summary, which names the storage path itself
    assert any(word in cause for word in ("AWS Error", "S3", "endpoint", "curl")), message

    # Every checkpoint the snapshot registers is complete: its state file, DCP metadata and every shard.
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    snapshot = json.loads(fs.cat_file(f"{prefix}/demo/checkpoint_manager_snapshot.json"))
    registered = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    assert registered
    for name in registered:
        files = {p.rsplit("/", 1)[1] for p in fs.find(f"{prefix}/demo/{name}")}
        assert {"train_state.json", ".metadata"} <= files, (name, files)
        assert sum(f.endswith(".distcp") for f in files) == WORKERS, (name, files)
