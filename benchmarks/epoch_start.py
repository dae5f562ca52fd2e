"""Where a small training job's time goes: the worker group's start, each data execution's start, and
the steps, read from Ray's own task timeline (``ray.timeline()``).

The job is the reliability suite's small demo job (2 FSDP workers x 2 clips, 3 steps an epoch, 2 epochs,
validated every epoch) on a synthetic Kinetics shard set made here, run in this process on a local Ray.
An execution (one per dataset and attempt: it reads all the passes the trainer planned, see
``ShardLoader.plan``) starts a decoder actor pool, whose actors start their decode zygotes
(``pipeline/data/isolation.py``), and read tasks that may land on fresh worker processes. An
execution's *start* is the time from its first ``start_epoch`` call on the split coordinator to the end
of the first ``get`` that follows (the first batch handed to a worker). Before executions spanned
epochs, every pass (a training epoch, a validation) paid it.

    python benchmarks/epoch_start.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.train.helpers import demo_overrides, synthetic_kinetics_shards  # noqa: E402


def _passes(events: list[dict], base_us: float) -> list[tuple[float, float]]:
    """(start, seconds to the first batch) of every execution, from the coordinators' profile events."""
    calls: dict[str, list[tuple[str, float, float]]] = {}
    for event in events:
        if event.get("ph") == "X" and event.get("name") in ("start_epoch", "get"):
            start = (event["ts"] - base_us) / 1e6
            calls.setdefault(str(event.get("tid")), []).append((event["name"], start, start + event.get("dur", 0) / 1e6))
    out = []
    for series in calls.values():
        series.sort(key=lambda call: call[1])
        i = 0
        while i < len(series):
            if series[i][0] != "start_epoch":
                i += 1
                continue
            begun = series[i][1]
            while i < len(series) and series[i][0] == "start_epoch":  # every worker's call for the same execution
                i += 1
            if i < len(series):
                out.append((begun, series[i][2] - begun))
    return sorted(out)


def main() -> int:
    import ray
    import ray.data

    from core.loopback import keep_ray_on_loopback
    from pipeline.config import load_config
    from pipeline.trainer.job import run

    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_kinetics_shards(Path(tmp), classes=3, per_class=4, val_per_class=2, shard_samples=4, fps=15)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        keep_ray_on_loopback()
        ray.init(address="local", num_cpus=4, include_dashboard=True, object_store_memory=300 * 2**20,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
        overrides = demo_overrides(shards, Path(tmp) / "runs", **{
            "trainer.checkpoint_every_steps": 1, "trainer.num_workers": 2, "data.batch_size": 2,
            "data.eval_batch_size": 4, "optim.reference_batch_size": 4})  # fmt: skip
        started = time.time()
        result, _ = run(load_config(REPO / "configs" / "experiment" / "demo.yaml", overrides))
        took = time.time() - started
        assert result.error is None, result.error
        events = ray.timeline()
        ray.shutdown()
    base = started * 1e6
    trains = [(e["ts"] - base) / 1e6 for e in events if e.get("ph") == "X" and e.get("name") == "run_train_fn"]
    passes = _passes(events, base)
    print(f"small demo job (2 workers x 2 clips, 2 epochs of 3 steps, validated every epoch): {took:.1f} s")
    print(f"  train function started on the workers at {min(trains):.1f} s" if trains else "  (no run_train_fn event)")
    for n, (begun, latency) in enumerate(passes, 1):
        print(f"  execution {n}: started at {begun:6.1f} s, first batch {latency:4.1f} s later")
    total = sum(latency for _, latency in passes)
    print(f"  pipeline starts: {len(passes)} executions for 4 passes (2 epochs, 2 validations), {total:.1f} s "
          f"in all = {total / took:.0%} of the job")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
