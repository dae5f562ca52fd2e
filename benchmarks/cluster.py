"""The training job on the namespace cluster (pipeline/netns_cluster.py): what crossing nodes costs, how
long a lost node stalls the job, how much work a preemption redoes.

Three parts, each on its own fresh cluster (head with 0 CPUs, nodes in their own network namespaces on a
private bridge, as in docs/cluster.md), all on one synthetic Kinetics shard set made here:

- ``spread``: the same job (``--workers`` Ray Train ranks, 1 CPU each) with its ranks packed on 1, 2 and
  3 GPU-group nodes (each node advertises ``--workers / nodes`` CPUs, so the placement is forced), its
  decoder actors and read tasks on one CPU-group node. All nodes share this machine's cores, so the
  difference is what crossing nodes costs: the gloo all-reduce over the bridge instead of inside one
  node, and Ray Train's and Ray Data's traffic. Then the 3-node shape again with Ray Train's per-step
  preemption check off (``trainer.preemption_check_every_steps=0``): its ratio to the same shape with
  the check every step (``=1``; the default checks about every 2 s) is what a per-step check costs. Reported per shape: steady-state clips/s (the job's own
  ``train/clips_per_s``, first epoch dropped), its ratios, the data-wait fraction and the job's wall time.
- ``loss``: an elastic job (2 ranks, ``trainer.min_workers=1``) whose rank-0 node is SIGKILLed (every
  process at once, no notice) after a registered checkpoint: seconds from the kill to the next completed
  step (on the surviving worker), then the node restarted and the seconds until the group is back to 2.
- ``preempt``: a fixed-size job of 2 whose rank-1 node gets SIGTERM (as Kubernetes evicts a pod; Ray
  drains it with a deadline): seconds from the SIGTERM to the notice the ranks see, steps redone after
  the restart (the goal: at most 1), and what Ray charged the restart to (``preemption`` or ``worker
  group``, see docs/cluster.md "Faults").

``loss`` and ``preempt`` run ``--repeats`` times each on one cluster of 2 GPU-group and 2 CPU-group nodes
of 1 CPU. Prints a table per part and, with ``--json``, writes every figure. Needs root (namespaces).

    python benchmarks/cluster.py                           # all three parts, ~25 min on 2 cores
    python benchmarks/cluster.py --parts spread --workers 6
    python benchmarks/cluster.py --parts loss,preempt --repeats 3 --json /tmp/cluster.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import netns_cluster as nc  # noqa: E402
from pipeline.netns_job import (  # noqa: E402
    ELASTIC_JOB,
    FAULT_NODE_ENV,
    PREEMPTED_JOB,
    ClusterJob,
    lose_node,
    preempt_node,
)
from tests.train.helpers import synthetic_kinetics_shards  # noqa: E402

PARTS = ("spread", "loss", "preempt")


def make_shards(root: Path, per_class: int) -> tuple[Path, int]:
    """Synthetic Kinetics (3 classes, ``per_class`` train videos each, 1 val), 3 samples a shard, in a local
    folder every node reads through the shared filesystem (the tests' shard set, made the same way)."""
    out = synthetic_kinetics_shards(root, classes=3, per_class=per_class, val_per_class=1, shard_samples=3)
    return out, json.loads((out / "train.manifest.json").read_text())["num_samples"]


# (GPU-group nodes, Ray Train's preemption check every step): the three spreads with the check every step
# (the most it costs), then the widest spread again with it off, whose ratio to the same shape with it on is the
# check's cost where it is highest (its barrier crosses nodes).
SPREAD_SHAPES = ((1, True), (2, True), (3, True), (3, False))


def spread(shards: Path, runs: Path, workers: int, epochs: int) -> list[dict]:
    rows = []
    runs.mkdir(parents=True, exist_ok=True)
    if workers % 6:
        raise SystemExit(f"--workers must divide by 1, 2 and 3 (got {workers})")
    for nodes, check in SPREAD_SHAPES:
        name = f"spread{nodes}" + ("" if check else "-nocheck")
        cluster = nc.start(workers=nodes + 1, gpu_workers=nodes, cpus_per_worker=4, gpu_cpus=workers // nodes,
                           object_store_mb=256, state_file=runs / f"{name}.json")
        try:
            job = ClusterJob(cluster, shards, runs / name, [
                f"trainer.num_workers={workers}", "trainer.cpus_per_worker=1", "data.batch_size=2",
                f"trainer.epochs={epochs}", f"trainer.eval_every_epochs={epochs}", "trainer.checkpoint_every_steps=0",
                f"trainer.preemption_check_every_steps={int(check)}",
                "data.decoder.min_actors=2", "data.decoder.max_actors=2"], prefix=name)
            rc = job.wait(3600)
            if rc != 0:
                raise SystemExit(f"the {name} job failed:\n{job.tail()}")
            wall = time.monotonic() - job.started
            placed = sorted(set(job.placement().values()))
            if len(placed) != nodes:
                raise SystemExit(f"{name}: ranks ran on {placed}")
            per_epoch = job.metric("train/clips_per_s")
            first_epoch = len(per_epoch) // epochs
            rows.append({"nodes": nodes, "ranks_per_node": workers // nodes, "preemption_check": check,
                         "clips_per_s": statistics.median(v for _, v, _ in per_epoch[first_epoch:]),
                         "data_wait": statistics.median(v for _, v, _ in job.metric("train/data_wait_fraction")
                                                        [first_epoch:]),
                         "wall_s": wall})
            print(f"{name}: {rows[-1]}", flush=True)
        finally:
            cluster.stop(grace_s=5.0)
    base = {row["nodes"]: row["clips_per_s"] for row in rows if row["preemption_check"]}
    for row in rows:
        row["ratio_to_one_node"] = row["clips_per_s"] / base[1]
        row["ratio_to_check_on"] = row["clips_per_s"] / base[row["nodes"]]
    return rows


def measure_loss(cluster: nc.NetnsCluster, shards: Path, runs: Path) -> dict:
    """One elastic job, rank 0's node SIGKILLed after a registered checkpoint, then restarted."""
    job = ClusterJob(cluster, shards, runs, ELASTIC_JOB, prefix="loss")
    loss = lose_node(job, rank=0, timeout_s=900)
    return {"ok": loss.rc == 0, "killed_at_step": loss.killed_at_step, "next_step": loss.next_step,
            "kill_to_next_step_s": loss.to_next_step_s, "restart_node_s": loss.restart_s,
            "restart_to_two_workers_step_s": _regrown(job, loss.restarted_at),
            "world_sizes": job.world_sizes(), "redone_steps": job.redone_steps()}


def _regrown(job: ClusterJob, restarted_at: float) -> float | None:
    """Seconds from the node's restart to the first step of the next 2-rank attempt (None: never regrown)."""
    grown = next((t / 1000 for _, v, t in job.metric("world_size") if v == 2.0 and t / 1000 > restarted_at), None)
    found = job.first_step_after(grown) if grown is not None else None
    return None if found is None else grown + found[1] - restarted_at


def measure_preemption(cluster: nc.NetnsCluster, shards: Path, runs: Path, steps_per_epoch: int) -> dict:
    """One fixed-size job of 2, rank 1's node SIGTERMed (drained) mid-epoch, restarted once it is gone."""
    job = ClusterJob(cluster, shards, runs, PREEMPTED_JOB, prefix="preempt")
    seen = preempt_node(job, rank=1, timeout_s=900)
    return {"ok": seen.rc == 0, "sigterm_after_step": seen.sigterm_after_step, "notice_step": seen.notice_step,
            "sigterm_to_notice_s": seen.notice_after_s, "node_gone_s": seen.gone_after_s,
            "steps_redone": len(job.redone_steps()), "redone": job.redone_steps(),
            "charged_to": re.findall(r"Source: (preemption|worker group|controller)", job.output()),
            "steps_per_epoch": steps_per_epoch}


def faults(shards: Path, runs: Path, parts: list[str], repeats: int, samples: int) -> dict[str, list[dict]]:
    runs.mkdir(parents=True, exist_ok=True)
    cluster = nc.start(workers=4, gpu_workers=2, cpus_per_worker=1, object_store_mb=256,
                       state_file=runs / "faults.json", node_env=FAULT_NODE_ENV)
    out: dict[str, list[dict]] = {part: [] for part in parts}
    try:
        for i in range(repeats):
            if "loss" in parts:
                out["loss"].append(measure_loss(cluster, shards, runs / f"loss{i}"))
                print(f"loss {i + 1}/{repeats}: {out['loss'][-1]}", flush=True)
            if "preempt" in parts:
                out["preempt"].append(measure_preemption(cluster, shards, runs / f"preempt{i}", samples // 4))
                print(f"preempt {i + 1}/{repeats}: {out['preempt'][-1]}", flush=True)
    finally:
        cluster.stop(grace_s=5.0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--workers", type=int, default=6, help="Ray Train ranks of the spread jobs (default 6)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each spread job (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="node losses and preemptions, each (default 2)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes {', '.join(PARTS)}")
    nc.require_netns()
    results: dict[str, object] = {"workers": args.workers, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="mvit-bench-cluster-") as tmp:
        base = Path(tmp)
        shards, samples = make_shards(base, per_class=16 if "spread" not in parts else 24)
        if "spread" in parts:
            results["spread"] = spread(shards, base / "spread", args.workers, args.epochs)
            print(f"\n{args.workers} ranks on 1, 2 and 3 GPU-group nodes ({samples} train clips, {args.epochs} "
                  "epochs; clips/s and data-wait are medians of the job's logged windows after epoch 1):")
            print("nodes  ranks/node  preemption check  clips/s  ratio to 1 node  ratio to check on  data-wait  job wall s")
            for r in results["spread"]:
                print(f"{r['nodes']:>5}  {r['ranks_per_node']:>10}  {'every step' if r['preemption_check'] else 'off':>16}  "
                      f"{r['clips_per_s']:>7.1f}  {r['ratio_to_one_node']:>15.2f}  {r['ratio_to_check_on']:>17.2f}  "
                      f"{r['data_wait']:>9.2f}  {r['wall_s']:>10.0f}")
        fault_parts = [p for p in parts if p != "spread"]
        if fault_parts:
            results.update(faults(shards, base / "faults", fault_parts, args.repeats, samples))
        for r in results.get("loss", []):
            print(f"node lost at step {r['killed_at_step']}: next step ({r['next_step']}) "
                  f"{r['kill_to_next_step_s']:.1f}s later; node restarted in {r['restart_node_s']:.1f}s, first step "
                  f"on 2 workers {r['restart_to_two_workers_step_s']}s after the restart; world sizes "
                  f"{r['world_sizes']}; job ok: {r['ok']}")
        for r in results.get("preempt", []):
            print(f"SIGTERM after step {r['sigterm_after_step']}: notice at step {r['notice_step']} "
                  f"{r['sigterm_to_notice_s']:.1f}s later, node gone after {r['node_gone_s']:.1f}s; steps redone "
                  f"{r['steps_redone']} {r['redone']}; restart charged to {r['charged_to']}; job ok: {r['ok']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
