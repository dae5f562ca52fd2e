"""The training job on a namespace cluster (pipeline/netns_cluster.py), submitted and followed from outside,
and the node faults driven against it.

``ClusterJob`` is ``ray job submit -- python pipeline/train.py`` run from the cluster's client namespace,
with its output in a log file and its MLflow store a sqlite file the job writes: what the node-fault
tests (tests/cluster/test_node_loss.py) and the cluster benchmark (benchmarks/cluster.py) drive faults
against and read their figures from, while the job runs. Reading the store directly (read-only sqlite,
not the MLflow client) lets them poll it every 0.2 s without a server or a lock.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pipeline import netns_cluster as nc

T = TypeVar("T")

# Every Ray node's environment for fault experiments (``netns_cluster.start(node_env=...)``).
FAULT_NODE_ENV = {
    # the drain a SIGTERM to ``ray start`` starts (reason PREEMPTION, this deadline ahead); Kubernetes' grace
    # period plays this part on a real cluster (k8s/: 120 s grace, 100 s drain)
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "20",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",  # read by the controller (on the head); Ray's default is 5 s
    # how long the controller waits for a worker group to start (Ray's default 60 s): after a node loss an
    # elastic job first asks for its old size (Ray's view of the cluster lags) and waits this long for it
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
    # Ray's OOM killer off: every node's memory monitor sees the whole machine's memory, not the node's, and
    # with other work on the machine it killed a train worker for memory the cluster was not using
    "RAY_memory_monitor_refresh_ms": "0",
}


class JobError(RuntimeError):
    """The job ended, or took too long, before what the caller waited for; the message ends with its output."""


class ClusterJob:
    """``pipeline/train.py --config CONFIG`` submitted to ``cluster`` under a fresh name, on shards at
    ``data_root`` (a local folder every node shares, or a URL), with its Ray Train storage and MLflow
    sqlite store in the local folder ``runs``. ``overrides`` are the job's command-line overrides."""

    def __init__(self, cluster: nc.NetnsCluster, data_root: str | Path, runs: Path, overrides: Sequence[str] = (),
                 config: str = "configs/experiment/netns.yaml", prefix: str = "job") -> None:
        self.cluster, self.runs = cluster, Path(runs)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.submission = f"{self.name}-job"
        self.db = self.runs / "mlflow.db"
        self.log = self.runs / "submit.log"
        local_data = "://" not in str(data_root)
        cmd = cluster.submit_command(
            ["python", "pipeline/train.py", "--config", config, f"name={self.name}", f"data.root={data_root}",
             *(["data.s3_endpoint_url=null"] if local_data else []), f"trainer.storage_path={self.runs}",
             f"tracking.tracking_uri=sqlite:///{self.db}", "trainer.ray_train_log_level=INFO", *overrides],
            extra_args=["--submission-id", self.submission])
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cluster.in_client(cmd),
                                         env=cluster.client_env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()

    # ---- the process ------------------------------------------------------------------------------------

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, chars: int = 6000) -> str:
        return self.output()[-chars:]

    def wait(self, timeout_s: float) -> int:
        """The submitting client's exit code (``ray job submit`` follows the job until it ends)."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise JobError(f"job {self.submission} still running after {timeout_s:.0f}s; output:\n{self.tail()}") \
                from None

    def stop(self) -> None:
        """Stops the job on the cluster and the following client; a no-op once both ended."""
        if not self.running():
            return
        self.cluster.exec([nc.ray_executable(), "job", "stop", self.submission], capture_output=True, timeout=120)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def wait_for(self, condition: Callable[[], T], what: str, timeout_s: float = 300) -> T:
        """Polls ``condition`` until it returns something true and returns that; ``JobError`` if the job ends
        first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = condition()
            if found:
                return found
            if not self.running():
                raise JobError(f"the job ended before {what}; output:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise JobError(f"timed out ({timeout_s:.0f}s) waiting for {what}; output:\n{self.tail()}")
            time.sleep(0.2)

    # ---- what it recorded -------------------------------------------------------------------------------

    def metric(self, key: str) -> list[tuple[int, float, int]]:
        """(step, value, timestamp ms) of every value of ``key`` the job's one MLflow run logged, in the order
        logged; [] before the store exists."""
        rows = self._query("SELECT step, value, timestamp FROM metrics WHERE key = ? ORDER BY timestamp, step", key)
        return [(int(s), float(v), int(t)) for s, v, t in rows]

    def _query(self, sql: str, *args: object) -> list[tuple]:
        """Rows of ``sql`` on the job's MLflow store, read-only (the job may be writing it); [] before the store
        or its tables exist."""
        if not self.db.exists():
            return []
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as db:
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.OperationalError:  # the tables are not there yet
                return []

    def steps(self) -> list[int]:
        """Every training step logged (``train/loss`` at every step), repeated where an attempt redid it."""
        return [step for step, _, _ in self.metric("train/loss")]

    def world_sizes(self) -> list[float]:
        return [value for _, value, _ in self.metric("world_size")]

    def redone_steps(self) -> list[int]:
        """Steps logged more than once: work a restart redid."""
        steps = self.steps()
        return sorted({s for s in steps if steps.count(s) > 1})

    def first_step_after(self, wall_s: float) -> tuple[int, float] | None:
        """The first step logged after ``wall_s`` (``time.time()``): its number and the seconds to it."""
        later = [(t, step) for step, _, t in self.metric("train/loss") if t / 1000 > wall_s]
        if not later:
            return None
        t, step = min(later)
        return step, t / 1000 - wall_s

    def registered_step(self) -> int:
        """Step of the latest checkpoint Ray Train registered (the one a restart resumes from), 0 if none: a
        checkpoint folder appears in storage before it is registered."""
        try:
            snapshot = json.loads((self.runs / self.name / "checkpoint_manager_snapshot.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return 0
        name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or "_step0"
        return int(name.rsplit("_step", 1)[1])

    def placement(self) -> dict[int, str]:
        """Rank -> node address of the latest attempt: the run's MLflow tag ``placement`` (``0:IP,1:IP``), which
        rank 0 sets as each attempt starts. Not the ``rank R of N on node IP`` lines of the log: Ray's log
        deduplication folds lines that differ only in numbers, so one rank's line can come seconds late."""
        rows = self._query("SELECT value FROM tags WHERE key = 'placement'")
        if not rows:
            return {}
        pairs = (item.split(":", 1) for item in rows[-1][0].split(",") if ":" in item)
        return {int(rank): ip for rank, ip in pairs}

    def gpu_node(self, rank: int) -> nc.Node:
        """The GPU-group node rank ``rank`` of the latest attempt runs on."""
        ip = self.placement()[rank]
        (node,) = [w for w in self.cluster.workers if w.ip == ip and w.group == nc.GPU_GROUP]
        return node

    def mlflow(self) -> tuple:
        """(MlflowClient, the job's one run)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{self.db}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if len(runs) != 1:
            raise JobError(f"expected one MLflow run in {self.db}, found {len(runs)}")
        return client, runs[0]


# ---- the two node-fault scenarios the tests assert on and the benchmark measures ---------------------------

# An elastic job of 2 ranks (1 at least) with a checkpoint every step. 3 epochs: the lost node is back and the
# group regrown (~20-70 s after the 1-worker group's first step) well before 1 worker could finish the job.
ELASTIC_JOB = ("trainer.epochs=3", "trainer.eval_every_epochs=3", "trainer.checkpoint_every_steps=1",
               "trainer.min_workers=1", "trainer.resize_check_s=10", "trainer.max_failures=3")
# A fixed-size job of 2 ranks, 2 clips a rank, no periodic mid-epoch checkpoint: the only one mid-epoch is the
# one taken on the preemption notice. max_failures=1 for Ray 2.60's race (docs/cluster.md, "Faults").
PREEMPTED_JOB = ("trainer.epochs=2", "trainer.eval_every_epochs=2", "data.batch_size=2",
                 "trainer.checkpoint_every_steps=0", "trainer.max_failures=1", "trainer.preemption_wait_s=30")


@dataclass
class NodeLoss:
    """What ``lose_node`` saw: the node, the step it was lost at, the seconds to the next step, the restart."""

    victim: nc.Node
    killed_at_step: int
    registered_step: int
    next_step: int
    to_next_step_s: float
    restarted_at: float  # time.time() when the node was started again
    restart_s: float
    rc: int


@dataclass
class Preemption:
    """What ``preempt_node`` saw: the node, the step at SIGTERM, the notice (step, seconds after SIGTERM), how
    long the node took to go."""

    victim: nc.Node
    sigterm_after_step: int
    notice_step: int
    notice_after_s: float
    notices: int
    gone_after_s: float
    rc: int


def restore_node(cluster: nc.NetnsCluster, name: str) -> None:
    """Leaves node ``name`` running, whatever a fault did to it (the next job or test needs it)."""
    if not cluster.node_pids(name):
        cluster.restart_node(name)


def lose_node(job: ClusterJob, rank: int = 0, timeout_s: float = 600) -> NodeLoss:
    """Under an elastic ``job`` (``ELASTIC_JOB``): SIGKILLs rank ``rank``'s node once a checkpoint is
    registered, waits for the group of 1 and its first step, restarts the node, and waits for the job to
    end. The job is stopped and the node left running whatever happens."""
    cluster, victim = job.cluster, None
    try:
        job.wait_for(lambda: job.registered_step() >= 1 and len(job.placement()) == 2, "a registered checkpoint")
        victim = job.gpu_node(rank)
        killed_at, killed_step, registered = time.time(), max(job.steps()), job.registered_step()
        cluster.kill_node(victim.name)
        job.wait_for(lambda: job.world_sizes()[-1:] == [1.0], "the group of 1")
        step, after = job.wait_for(lambda: job.first_step_after(killed_at), "a step after the node loss")
        restarted_at = time.time()
        cluster.restart_node(victim.name)
        restart_s = time.time() - restarted_at
        return NodeLoss(victim, killed_step, registered, step, after, restarted_at, restart_s, job.wait(timeout_s))
    finally:
        job.stop()
        if victim is not None:
            restore_node(cluster, victim.name)


def preempt_node(job: ClusterJob, rank: int = 1, timeout_s: float = 600) -> Preemption:
    """Under ``job`` (``PREEMPTED_JOB``): SIGTERMs rank ``rank``'s node's ``ray start`` after the first step
    (what Kubernetes does to an evicted pod), waits for the notice and for the checkpoint taken on it to be
    registered, then for the node to go at its drain deadline, restarts it, and waits for the job to end.
    The job is stopped and the node left running whatever happens."""
    cluster, victim = job.cluster, None
    try:
        job.wait_for(lambda: job.steps() and len(job.placement()) == 2, "a first step")
        victim = job.gpu_node(rank)
        drain_s = float(victim.env.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", 30))  # Ray's default: 30 s
        cluster.signal_node(victim.name, signal.SIGTERM)
        sigterm_at, step_at_sigterm = time.time(), max(job.steps())
        notice = job.wait_for(lambda: job.metric("preemption/notices"), "the preemption notice", timeout_s=drain_s)
        # the checkpoint taken on the notice is registered (later ones replace it: num_checkpoints_to_keep)
        job.wait_for(lambda: job.registered_step() == notice[0][0], f"a checkpoint at step {notice[0][0]}",
                     timeout_s=drain_s)
        cluster.wait_node_gone(victim.name, timeout_s=drain_s + 30)
        gone_after = time.time() - sigterm_at
        cluster.restart_node(victim.name)
        rc = job.wait(timeout_s)
        notices = job.metric("preemption/notices")
        return Preemption(victim, step_at_sigterm, notice[0][0], notice[0][2] / 1000 - sigterm_at, len(notices),
                          gone_after, rc)
    finally:
        job.stop()
        if victim is not None:
            restore_node(cluster, victim.name)
