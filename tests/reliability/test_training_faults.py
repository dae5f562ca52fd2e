"""Faults during training: a Ray Train worker killed, the driver killed and the job rerun (also on
another worker count), a decoder actor killed mid-epoch.

All runs are the demo job made small and deterministic (2 FSDP workers x 2 clips, 3 steps per epoch,
2 epochs, a checkpoint every step) on the session's local Ray; one uninterrupted, fault-free run
(``clean``) is what every fault case is compared with. On CPU with gloo a job on the same worker count
is bit-reproducible, so a fault that costs retries or a restart on the same world size must end with
exactly the clean run's weights and losses. The driver case reruns on 1 worker x 4 clips and compares
every step's loss and the final weights with the 2-worker run within a stated tolerance, so it is also
the job-level check that FSDP2 on 2 ranks trains as 1 rank does (the model-level check is
tests/models/test_fsdp.py).
"""

from __future__ import annotations

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
# Resumed on 1 worker instead of 2, the same global batch gives the same gradients up to the order of
# float additions (one rank sums 4 clips' gradients; two ranks sum 2 each, then all-reduce): about 1e-7
# relative per gradient. AdamW divides each update by the gradient's running RMS, which can magnify that
# for a weight whose gradient is near zero: measured, the largest weight difference after the resumed
# steps is 2e-5 (blocks.3.attn.norm_k.bias). A real error (a step skipped or doubled, optimiser moments
# lost in the resharding, a shard of weights not restored) moves weights by a whole update, about the
# learning rate (1e-3) each. The tolerance sits between the two.
RESHARD_WEIGHT_ATOL = 1e-4


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


def _split_size(shards: Path) -> int:
    from core.manifest import load_manifest

    return load_manifest(str(shards), "train").num_samples


def _attempts(uri: str) -> list[tuple[int, int]]:
    """(step it started from, world size) of every attempt of the job: the trainer logs ``world_size``
    once per (re)start, at the step it resumed from."""
    client, mlflow_run = _mlflow_run(uri)
    history = client.get_metric_history(mlflow_run.info.run_id, "world_size")
    return [(m.step, int(m.value)) for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


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
    """Bit-equal: the same world size on CPU gloo reproduces every float."""
    assert got.keys() == expected.keys()
    differ = [name for name, value in expected.items() if not torch.equal(got[name], value)]
    assert not differ, f"{len(differ)} tensors differ from the fault-free run's, e.g. {differ[:3]}"


def _assert_same_losses(losses: dict[int, list[float]], expected: dict[int, float]) -> None:
    """Every step of the fault-free run, each logged loss (a step redone logs twice) exactly its loss."""
    assert list(losses) == list(expected)
    for step, values in losses.items():
        assert values == [expected[step]] * len(values), step


@pytest.mark.slow
def test_worker_sigkill_restarts_from_the_latest_checkpoint_to_identical_weights(
    reliability_shards: Path, clean: dict[str, Any], tmp_path: Path, ledger: Any
) -> None:
    """A Ray Train worker SIGKILLed mid-epoch: restarted from the latest checkpoint, same final weights, one MLflow run."""
    runs = tmp_path / "runs"
    thread, outcome = _run_in_thread(load_config(DEMO, _overrides(reliability_shards, runs, **{"trainer.max_failures": 2})))
    _wait_for(lambda: _registered_step(runs) >= 2, "a registered checkpoint at step 2",
              alive=_still_running(thread, outcome))
    workers = _processes("RayTrainWorker")
    assert len(workers) == WORKERS, [w.cmdline() for w in workers]
    victim = workers[-1]
    victim.send_signal(signal.SIGKILL)
    registered = _registered_step(runs)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the job did not finish after a worker was killed"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].error is None
    assert not victim.is_running()

    assert registered < 6, "the job finished before the worker was killed"
    _assert_same_weights(_weights(runs), clean["weights"])
    losses = _losses(outcome["job"].tracking_uri)
    # one run, a continuous step axis to the same end; a step redone after the restart repeats its loss
    _assert_same_losses(losses, clean["losses"])
    _assert_resumed_after(losses, registered)
    # The kill cost exactly one restart, on 2 workers again, from the checkpoint registered before it.
    (first, resumed) = _attempts(outcome["job"].tracking_uri)
    assert first == (0, 2) and resumed[1] == 2 and resumed[0] >= registered, (first, resumed, registered)
    client, mlflow_run = _mlflow_run(outcome["job"].tracking_uri)
    assert mlflow_run.info.status == "FINISHED"
    # every epoch, the resumed one included (its carry), checked whole: counts and key identity
    ledger.account_epochs(_split_size(reliability_shards), client, mlflow_run.info.run_id, epochs=2)


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / "train.py"), "--config", str(DEMO), *overrides]


@pytest.mark.slow
def test_killed_driver_rerun_resumes_from_storage_on_another_worker_count(
    reliability_shards: Path, clean: dict[str, Any], ray_cluster: None, tmp_path: Path, ledger: Any
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
    (first_attempt, rerun_attempt) = _attempts(uri)  # the killed driver's, then the rerun's on 1 worker
    assert first_attempt == (0, 2) and rerun_attempt[1] == 1 and rerun_attempt[0] >= registered
    for step, values in losses.items():
        # Summing gradients over 1 rank instead of 2 changes rounding only.
        assert values == pytest.approx([clean["losses"][step]] * len(values), rel=1e-4, abs=1e-5), step
    client, mlflow_run = _mlflow_run(uri)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["world_size"] == "1"
    # the epoch the rerun resumed mid-way, on another worker count, is checked whole (every sample once)
    ledger.account_epochs(_split_size(reliability_shards), client, mlflow_run.info.run_id, epochs=2)
    got = _weights(runs)
    assert got.keys() == clean["weights"].keys()
    drift = {name: (got[name] - value).abs().max().item() for name, value in clean["weights"].items()}
    worst = max(drift, key=drift.get)
    print(f"largest weight difference to the 2-worker run: {drift[worst]:.3g} ({worst})")
    assert drift[worst] <= RESHARD_WEIGHT_ATOL, (worst, drift[worst])


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
def clean(reliability_shards: Path, ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fault-free run every training fault case is compared with: its final weights and each step's loss."""
    runs = tmp_path_factory.mktemp("clean")
    result, job = run(load_config(DEMO, _overrides(reliability_shards, runs)))
    assert result.error is None, result.error
    losses = _losses(job.tracking_uri)
    assert {s: len(v) for s, v in losses.items()} == {s: 1 for s in range(1, 7)}, losses
    assert _attempts(job.tracking_uri) == [(0, WORKERS)]
    return {"weights": _weights(runs), "losses": {s: v[0] for s, v in losses.items()}}


@pytest.mark.slow
def test_checkpoint_writes_to_a_flaky_object_store_are_retried(
    reliability_shards: Path, clean: dict[str, Any], s3_server: str, tmp_path: Path, ledger: Any
) -> None:
    """S3 answers checkpoint uploads with 503s and dropped connections for a while: retried, no restart, the fault-free run's exact weights."""
    import s3fs

    prefix = f"s3://{_s3_bucket(s3_server)}/runs"
    with FaultProxy(s3_server) as proxy:
        cfg = load_config(DEMO, _overrides(reliability_shards, tmp_path, **{
            "trainer.storage_path": prefix, "data.s3_endpoint_url": proxy.url, "trainer.max_failures": 2}))
        rules = [proxy.fail_next(3, status=503, methods={"PUT"}),  # the first checkpoint's uploads
                 proxy.drop_next(2, methods={"PUT"})]
        thread, outcome = _run_in_thread(cfg)
        _wait_for(lambda: _s3_registered_step(s3_server, prefix) >= 2, "a registered checkpoint",
                  alive=_still_running(thread, outcome))
        outage = proxy.drop_for(3.0)  # every request for 3 s, mid-run
        outage_at = _s3_registered_step(s3_server, prefix)
        thread.join(timeout=900)
        assert not thread.is_alive(), "the job hung"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].error is None
    # Each planted fault happened: all 3 errors, both drops, and the outage while the job still had work.
    assert [rule.fired for rule in rules] == [3, 2], [rule.fired for rule in rules]
    assert outage.fired >= 1 and outage_at < 6, (outage.fired, outage_at)
    uri = outcome["job"].tracking_uri
    assert _attempts(uri) == [(0, WORKERS)], "the faults cost retries, not a restart"
    _assert_same_losses(_losses(uri), clean["losses"])  # every step trained once, the same loss
    client, mlflow_run = _mlflow_run(uri)
    ledger.account_epochs(_split_size(reliability_shards), client, mlflow_run.info.run_id, epochs=2)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    fs.get(f"{prefix}/demo/final_model/", str(tmp_path / "final"), recursive=True)
    # The final model reached S3 through the same flaky store, and it is the fault-free model.
    _assert_same_weights(load_file(str(tmp_path / "final" / "model.safetensors")), clean["weights"])


def _s3_snapshot(fs: Any, prefix: str) -> list[str]:
    """Names of the checkpoints Ray Train has registered (kept), from its snapshot in storage."""
    import json

    snapshot = json.loads(fs.cat_file(f"{prefix}/demo/checkpoint_manager_snapshot.json"))
    return [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]


def _assert_complete(fs: Any, prefix: str, names: list[str]) -> None:
    """Each checkpoint has its state file, DCP metadata and one shard per rank."""
    for name in names:
        files = {p.rsplit("/", 1)[1] for p in fs.find(f"{prefix}/demo/{name}")}
        assert {"train_state.json", ".metadata"} <= files, (name, files)
        assert sum(f.endswith(".distcp") for f in files) == WORKERS, (name, files)


@pytest.mark.slow
def test_a_checkpoint_whose_shard_uploads_fail_is_never_registered(
    reliability_shards: Path, fault_proxy: Any, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only step 3's checkpoint shards fail to upload (S3 otherwise fine): step 3 is never registered; the job fails clearly."""
    import s3fs

    from pipeline.trainer.job import JobFailed

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # the same path to failure as the default 10, sooner
    prefix = f"s3://{_s3_bucket(s3_server)}/runs"
    broken = fault_proxy.fail_always(status=503, methods={"PUT", "POST"}, paths=r"_step00000003/dcp/[^/?]*\.distcp")
    cfg = load_config(DEMO, _overrides(reliability_shards, tmp_path, **{
        "trainer.storage_path": prefix, "data.s3_endpoint_url": fault_proxy.url, "trainer.max_failures": 1}))
    thread, outcome = _run_in_thread(cfg)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the job hung on a checkpoint that cannot be uploaded"
    error = outcome.get("error")
    assert isinstance(error, JobFailed), f"expected a clear job failure, got {error!r}, result {outcome.get('result')}"
    assert "\n" not in str(error) and "Traceback" not in str(error), error
    assert broken.fired >= 2, "both attempts (the first and the restart) tried step 3's shards"

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    registered = _s3_snapshot(fs, prefix)
    assert [int(n.rsplit("_step", 1)[1]) for n in registered] == [1, 2], registered
    _assert_complete(fs, prefix, registered)


@pytest.mark.slow
def test_a_lasting_object_store_outage_fails_the_job_clearly_within_bounds(
    reliability_shards: Path, fault_proxy: Any, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 goes down for good mid-run: the job fails with a clear storage error in bounded time; what is registered is complete."""
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
    outage = fault_proxy.fail_always(status=None)  # connections dropped from now on
    started = time.monotonic()
    thread.join(timeout=600)
    assert not thread.is_alive(), "the job hung on a storage outage"
    elapsed = time.monotonic() - started
    assert elapsed < 180, f"the job took {elapsed:.0f} s to give up"
    from pipeline.trainer.job import JobFailed

    error = outcome.get("error")
    assert isinstance(error, JobFailed), f"expected a clear job failure, got {error!r}, result {outcome.get('result')}"
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    cause = message.split("): ", 1)[1]  # after the job summary, which names the storage path itself
    assert any(word in cause for word in ("AWS Error", "S3", "endpoint", "curl")), message

    assert outage.fired >= 1
    # Every checkpoint the snapshot registers is complete: its state file, DCP metadata and every shard.
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    registered = _s3_snapshot(fs, prefix)
    assert registered
    _assert_complete(fs, prefix, registered)
