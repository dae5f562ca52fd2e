"""Node faults under the training job on the namespace cluster (docs/cluster.md, "Faults"): a GPU-group
node SIGKILLed under an elastic job (it goes on with one worker and grows back to two when the node
returns), the same under a fixed-size job (it fails in bounded time with one line naming the node), and a
node SIGTERMed as Kubernetes evicts a pod (Ray drains it with a deadline, the job checkpoints on the notice
and resumes from that step once the node is back).

One cluster for the module (head with 0 CPUs, w1 w2 in the GPU group, w3 w4 in the CPU group, 1 CPU each,
no S3 node: shards, checkpoints and the MLflow sqlite file are in local folders, which every node shares),
always torn down. Every test leaves all four workers running for the next. Nodes are lost by
``NetnsCluster.kill_node`` (SIGKILL to the node's PID 1: the kernel ends every process of its PID namespace
at once) and drained by ``NetnsCluster.signal_node(name, SIGTERM)``; ``restart_node`` brings one back at the
same address. Nothing contacts an address outside the cluster's namespaces.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import netns_cluster as nc
from pipeline.netns_job import (
    ELASTIC_JOB,
    FAULT_NODE_ENV,
    PREEMPTED_JOB,
    ClusterJob,
    lose_node,
    preempt_node,
    restore_node,
)
from tests.train.helpers import synthetic_kinetics_shards

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SAMPLES = 48  # 3 classes x 16: 6 steps an epoch on 2 workers x 4 clips (netns.yaml), 12 on 1 worker
DRAIN_S = float(FAULT_NODE_ENV["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])  # the drain a SIGTERM starts


# ---- the cluster, the data, a job ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nc.NetnsCluster]:
    state_file = tmp_path_factory.mktemp("node-loss-cluster") / "state.json"
    try:
        cluster = nc.start(workers=4, gpu_workers=2, cpus_per_worker=1, object_store_mb=256, state_file=state_file,
                           node_env=FAULT_NODE_ENV)
    except nc.NetnsError as err:
        pytest.fail(f"cannot start the namespace cluster: {err}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop(grace_s=5.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Kinetics (3 classes, 16 train and 1 val video each) preprocessed on this machine into a local
    folder, 3 samples a shard: every node reads it through the shared filesystem."""
    out = synthetic_kinetics_shards(tmp_path_factory.mktemp("node-loss-data"), classes=3, per_class=16,
                                    val_per_class=1, shard_samples=3)
    assert json.loads((out / "train.manifest.json").read_text())["num_samples"] == TRAIN_SAMPLES
    return out


@pytest.fixture(scope="module")
def undisturbed(fault_cluster: nc.NetnsCluster, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The preemption case's job run to the end without a fault on the same cluster: the weights and each
    step's loss a preempted run must end with (same world size, so bit for bit)."""
    runs = tmp_path_factory.mktemp("undisturbed")
    job = job_on(fault_cluster, shards, runs, list(PREEMPTED_JOB))
    assert job.wait(900) == 0, job.tail()
    losses = {step: value for step, value, _ in job.metric("train/loss")}
    assert len(losses) == len(job.steps()), "a step logged twice without a fault"
    return {"weights": _final_weights(runs, job), "losses": losses}


def _final_weights(runs: Path, job: ClusterJob) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(runs / job.name / "final_model" / "model.safetensors"))


def job_on(cluster: nc.NetnsCluster, shards: Path, runs: Path, overrides: list[str]) -> ClusterJob:
    """``pipeline/train.py`` with ``configs/experiment/netns.yaml`` on the local shards, its checkpoints and
    MLflow store in ``runs`` (pipeline/netns_job.py)."""
    return ClusterJob(cluster, shards, runs, overrides, prefix="faults")


# ---- quick: no cluster ------------------------------------------------------------------------------------------


@pytest.mark.reliability
def test_failure_summary_names_the_node_of_a_lost_worker() -> None:
    """The one error line of a job whose worker's node died names that node (address and node id).

    A worker whose node died fails Ray Train's health check; the line names the node from Ray's description
    of the worker, not only the RPC error. The error below has
    the shape of Ray 2.60's ``WorkerHealthCheckFailedError`` (a private class; the slow test below gets the
    real one from a node SIGKILLed under a job)."""
    from ray.exceptions import ActorUnavailableError
    from ray.train import WorkerGroupError

    from pipeline.config import load_config
    from pipeline.trainer.job import failure_summary

    class HealthCheckFailed(RuntimeError):  # ray/train/v2/_internal/execution/worker_group/worker_group.py
        def __init__(self, message: str, failure: Exception) -> None:
            super().__init__(message)
            self.health_check_failure = failure

        def __str__(self) -> str:
            return f"{self.args[0]}\n{self.health_check_failure}"

    cfg = load_config("configs/experiment/netns.yaml", ["trainer.max_failures=0"])
    worker = ("Worker(\n  actor=Actor(RayTrainWorker, 9c7a9785e2f147dc62dacc0402000000),\n  metadata=ActorMetadata(\n"
              "    hostname='host',\n    node_id='81e6f099ad1e67f0b6399092d45fb4d4497b08a11fcf918ac7bfdd44',\n"
              "    node_ip='10.213.0.3',\n    pid=142,\n  ),\n  distributed_context=DistributedContext(world_rank=0, "
              "world_size=2, local_rank=0, local_world_size=1, node_rank=0),\n  log_file_path=None,\n)")
    lost = HealthCheckFailed(f"A worker health check failed.\nWorker info: {worker}", ActorUnavailableError(
        "RpcError: failed to connect to all addresses; ipv4:10.213.0.3:19317: Connection refused", None))
    collateral = RuntimeError("RuntimeError: [gloo/pair.cc:561] Connection closed by peer [10.213.0.3]:39599")
    for failures in ({0: lost, 1: collateral}, {0: collateral, 1: lost}):
        summary = failure_summary(cfg, WorkerGroupError("...", failures))
        rank = next(r for r, e in failures.items() if e is lost)
        assert "\n" not in summary and f"rank {rank} on node 10.213.0.3 (node id 81e6f099ad1e): " in summary, summary
    plain = failure_summary(cfg, WorkerGroupError("...", {0: ValueError("Traceback\nValueError: bad")}))
    assert plain.endswith("rank 0: ValueError: bad"), plain


def test_fault_api_and_cli_refuse_what_they_are_not_for(tmp_path: Path) -> None:
    """``kill_node``, ``restart_node`` and ``set_link`` act on worker nodes only (never the head or the client
    namespace), and the CLI offers them as ``kill``, ``term``, ``restart`` and ``link`` (and ``--node-env``)."""
    cluster = nc.new_cluster(workers=2, state_file=tmp_path / "state.json")
    for name in ("head", "client"):
        with pytest.raises(nc.NetnsError, match="worker nodes"):
            cluster.kill_node(name)
        with pytest.raises(nc.NetnsError, match="worker nodes"):
            cluster.restart_node(name)
        with pytest.raises(nc.NetnsError, match="worker nodes"):
            cluster.set_link(name, up=False)
    with pytest.raises(nc.NetnsError, match="does not run"):
        cluster.signal_node("w1", signal.SIGTERM)  # described, never started
    assert cluster.init_pid("w1") is None
    out = subprocess.run([sys.executable, "-m", "pipeline.netns_cluster", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout
    assert all(word in out for word in ("kill", "term", "restart", "link")), out
    out = subprocess.run([sys.executable, "-m", "pipeline.netns_cluster", "start", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    assert "--node-env" in out, out


# ---- slow: one cluster for the module ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.reliability
def test_elastic_job_goes_on_with_one_worker_and_grows_back_when_the_node_returns(
        fault_cluster: nc.NetnsCluster, shards: Path, tmp_path: Path, ledger: Any) -> None:
    """A node SIGKILLed under an elastic job: it goes on with 1 worker, grows back to 2, every epoch whole.

    trainer.min_workers=1 of 2: rank 0's node SIGKILLed mid-epoch (after a registered checkpoint) -> the
    job resumes on 1 worker from the latest checkpoint; the node restarted -> the group grows back to 2
    (Ray Train's resize check, trainer.resize_check_s). One MLflow run: world_size 2 -> 1 -> 2, a placement
    artifact per attempt, every epoch's samples checked whole (counts and identity)."""
    job = job_on(fault_cluster, shards, tmp_path, list(ELASTIC_JOB))
    loss = lose_node(job, rank=0)
    victim, output = loss.victim, job.output()
    print(f"killed {victim.name} ({victim.ip}, rank 0) at step {loss.killed_at_step} (registered checkpoint: step "
          f"{loss.registered_step}); next completed step ({loss.next_step}) {loss.to_next_step_s:.1f}s later; node "
          f"restarted in {loss.restart_s:.1f}s")
    assert loss.rc == 0 and f"finished {job.name}: epoch 3" in output, output[-6000:]

    client, run = job.mlflow()
    sizes = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "world_size"),
                                     key=lambda m: (m.timestamp, m.step))]
    print(f"world_size history: {sizes}; placement artifacts: "
          f"{[a.path for a in client.list_artifacts(run.info.run_id, 'placement')]}")
    assert sizes == [2.0, 1.0, 2.0], sizes
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    ledger.account_epochs(TRAIN_SAMPLES, client, run.info.run_id, epochs=3)  # every epoch whole, keys checked
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "placement")]
    assert len(artifacts) == 3 and artifacts[0] == "placement/from-step-00000000.json", artifacts
    ranks = [json.loads(Path(client.download_artifacts(run.info.run_id, a)).read_text())["ranks"] for a in artifacts]
    assert [len(r) for r in ranks] == [2, 1, 2], ranks
    assert victim.ip not in ranks[1].values(), ranks


@pytest.mark.slow
@pytest.mark.reliability
def test_fixed_size_job_fails_in_bounded_time_with_one_line_naming_the_lost_node(
        fault_cluster: nc.NetnsCluster, shards: Path, tmp_path: Path) -> None:
    """A node SIGKILLed under a fixed-size job without restarts: it fails in < 120 s, one line naming the node.

    A fixed size of 2 (no min_workers) and trainer.max_failures=0: rank 0's node SIGKILLed mid-epoch -> the
    job fails within a bound, and the driver's one error line names the lost node by its address."""
    cluster = fault_cluster
    job = job_on(cluster, shards, tmp_path, ["trainer.epochs=2", "trainer.eval_every_epochs=2",
                                             "trainer.checkpoint_every_steps=1", "trainer.max_failures=0"])
    victim = None
    try:
        job.wait_for(lambda: job.registered_step() >= 1 and len(job.placement()) == 2, "a registered checkpoint")
        victim = job.gpu_node(0)
        cluster.kill_node(victim.name)
        killed = time.monotonic()
        rc = job.wait(300)
        took = time.monotonic() - killed
    finally:
        job.stop()
        if victim is not None:
            restore_node(cluster, victim.name)
    output = job.output()
    # what the job printed, as `ray job submit` streamed it: on a failure the CLI then repeats the tail of the
    # job's log in its status message, which would show the error line twice
    streamed = output.split(f"Job '{job.submission}' failed")[0]
    errors = [line for line in streamed.splitlines() if line.startswith("error: ")]
    print(f"node {victim.name} ({victim.ip}) lost -> job ended {took:.1f}s later with: {errors}")
    assert rc != 0 and len(errors) == 1, output[-6000:]
    assert errors[0].startswith(f"error: training job {job.name!r} failed (automatic restarts allowed: "
                                "trainer.max_failures=0;"), errors
    assert f"node {victim.ip}" in errors[0], errors
    assert took < 120, took


@pytest.mark.slow
@pytest.mark.reliability
def test_preempted_node_checkpoints_on_the_notice_and_resumes_from_that_step(
        fault_cluster: nc.NetnsCluster, shards: Path, tmp_path: Path, ledger: Any, undisturbed: dict[str, Any]) -> None:
    """A node SIGTERMed (drained, as a pod evicted): the job checkpoints on the notice, resumes there, <= 1 step redone.

    A fixed-size job of 2 (2 clips a rank: 12 steps an epoch), no periodic mid-epoch checkpoint: SIGTERM to
    rank 1's node's ``ray start`` (what Kubernetes sends on an eviction) -> Ray drains the node (reason
    PREEMPTION, deadline DRAIN_S ahead) ->
    every rank sees ``ray.train.get_preemption_info()``, checkpoints at that step and waits; the node goes at
    its deadline, comes back (restart_node) and the job resumes from the notice's step: no step redone.

    trainer.max_failures=1, not 0: Ray 2.60 charges the restart to ``max_preemption_failures`` only when its
    controller sees the deadline pass before it sees the preempted worker gone (``PreemptionError``,
    ``Source: preemption``). ``ray start`` ends the node's processes at its own deadline, a moment before the
    one it gave the GCS, and the node's death is recorded as an expected termination ("received SIGTERM"),
    not a preemption, so when the controller polls in between, the restart is a worker-group failure
    (``Source: worker group``) and counts under max_failures: seen once in five runs, on a loaded machine."""
    job = job_on(fault_cluster, shards, tmp_path, list(PREEMPTED_JOB))
    steps_per_epoch = TRAIN_SAMPLES // (2 * 2)
    seen = preempt_node(job, rank=1)
    output, step = job.output(), seen.notice_step
    print(f"SIGTERM to {seen.victim.name} ({seen.victim.ip}) after step {seen.sigterm_after_step}: notice at step "
          f"{step} {seen.notice_after_s:.1f}s later; node gone {seen.gone_after_s:.1f}s after it")
    assert seen.rc == 0 and f"finished {job.name}: epoch 2" in output, output[-6000:]
    assert seen.notices == 1 and step % steps_per_epoch != 0, seen  # once, mid-epoch (not at an epoch's end)
    assert re.search(rf"rank 0 resumed at epoch \d, step {step}, ", output), output[-6000:]
    sources = re.findall(r"Source: (preemption|worker group|controller)", output)
    assert "preemption" in sources or "worker group" in sources, output[-6000:]
    losses = job.steps()
    redone = job.redone_steps()
    print(f"steps logged: {losses}; redone after the preemption: {len(redone)} {redone}; restarts charged to: "
          f"{sources}")
    assert len(redone) <= 1, losses
    assert sorted(set(losses)) == list(range(1, max(losses) + 1)), losses
    client, run = job.mlflow()
    ledger.account_epochs(TRAIN_SAMPLES, client, run.info.run_id, epochs=2)
    sizes = [m.value for m in client.get_metric_history(run.info.run_id, "world_size")]
    assert sizes == [2.0, 2.0], sizes
    # The preemption cost a restart, not a difference: every step's loss (a redone one too) and the final
    # weights are the undisturbed run's, bit for bit.
    import torch

    assert all(value == undisturbed["losses"][step] for step, value, _ in job.metric("train/loss")), (
        job.metric("train/loss"), undisturbed["losses"])  # fmt: skip
    weights = _final_weights(tmp_path, job)
    assert weights.keys() == undisturbed["weights"].keys()
    differ = [name for name, value in undisturbed["weights"].items() if not torch.equal(weights[name], value)]
    assert not differ, f"{len(differ)} tensors differ from the undisturbed run's, e.g. {differ[:3]}"
