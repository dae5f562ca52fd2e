"""Training throughput with the real data service against in-memory batches, for 1 and 2 workers.

For each worker count, in one run:
- **real**: the actual job (``pipeline.trainer.job.run``: shards -> Ray Data -> decoder actors ->
  Ray Train + FSDP2) on a synthetic Kinetics-layout shard set made by the preprocessing CLI; clips/s
  and the data-wait fraction are what the job itself logs to MLflow (first logging window dropped);
- **in-memory**: the same components (``prepare_model``, ``build_optimizer``, FSDP2, the same global
  batch and input size) in a ``TorchTrainer`` that steps on a batch held in memory, so data costs 0;
- **in-memory paced by the service**: the same, but each step first takes a batch from the job's data
  service (and drops it), so the service's whole cost to a worker shows (the CPU its decoder actors
  and read tasks take beside the step, the waits, the loader's own work on a batch), apart from what
  the job's step adds (normalising, mixing, the real batch).

The stall 1 - real/in-memory splits into the service's part (1 - paced/in-memory) and the job's step
(the rest). It prints clips/s of all three, that split, the job's own measured
data-wait fraction and the part of it the data service had no batch ready (the rest is the worker's own
work on an arrived batch), and the 1 -> 2 worker scaling of each. For the two in-memory runs it also
prints where the machine's CPU went during the timed steps: rank 0's own process against all others
(with the service paced beside one worker: its decoder actors and read tasks), the cores a shared
machine's step loses to the service.

    python benchmarks/train.py [--epochs 3] [--config configs/experiment/demo.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_shards(root: Path) -> Path:
    raw, shards = root / "raw", root / "shards"
    run = lambda *a: subprocess.run([sys.executable, "-m", "preprocessing", *a], check=True, capture_output=True)  # noqa: E731
    run("synth", "kinetics", "--out", str(raw), "--classes", "4", "--per-class", "32", "--val-per-class", "2",
        "--seconds", "2", "--size", "96x72")
    for csv in ("train", "validate"):
        run("kinetics", "--csv", str(raw / "annotations" / f"{csv}.csv"), "--videos", str(raw), "--out", str(shards),
            "--short-side", "72", "--shard-samples", "16", "--no-progress")
    return shards


def in_memory_loop(config: dict) -> None:
    """A Ray Train worker stepping the job's model and optimiser on one batch kept in memory. With
    ``paced``, each step first takes a batch from the real data service (and drops it): the service's
    whole cost to the worker (its CPU use beside the step, the waits, the loader's work on each batch)
    without the job's own step (normalise, mixing, the real batch)."""
    import ray.train
    import torch

    from pipeline.config import build_model_config, from_container
    from pipeline.data.loader import ShardLoader
    from pipeline.models.mvit import MViT
    from pipeline.trainer.optim import build_optimizer
    from pipeline.trainer.setup import WorkerContext, prepare_model

    cfg = from_container(config["experiment"])
    ctx = WorkerContext.current()
    torch.manual_seed(cfg.seed)
    model_cfg = build_model_config(cfg.model)
    model = prepare_model(MViT(model_cfg), ctx, cfg.trainer.precision, cfg.trainer.activation_checkpointing, False)
    optimizer = build_optimizer(model, cfg.optim, cfg.global_batch_size)
    x = torch.randn((cfg.data.batch_size,) + model_cfg.input_shape, device=ctx.device)
    y = torch.randint(0, model_cfg.num_classes, (cfg.data.batch_size,), device=ctx.device)
    batches = _service_batches(ShardLoader.for_train_worker("train", ctx.device, cfg.data.prefetch_batches),
                               cfg.trainer.epochs) if config["paced"] else None  # fmt: skip
    times, takes = [], []
    for step in range(config["steps"]):
        if step == config["warmup"]:
            cpu = _CpuSplit()
        start = time.perf_counter()
        if batches is not None:
            next(batches)
            if step >= config["warmup"]:
                takes.append(time.perf_counter() - start)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= config["warmup"]:  # warm-up steps excluded: the service's start and ramp among them
            times.append(time.perf_counter() - start)
    metrics = {"clips_per_s": cfg.data.batch_size * ctx.world_size / statistics.median(times),
               "torch_threads": torch.get_num_threads(), **cpu.stop(),
               "take_fraction": sum(takes) / sum(times)}  # the step's time spent in next(): taking the batch
    # Ray Train attaches metrics to a run's Result only through a checkpoint: rank 0 reports an empty one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if ctx.is_main else None
        ray.train.report(metrics, checkpoint=checkpoint)


class _CpuSplit:
    """Where the machine's CPU went during the timed steps, in cores (CPU-seconds per second): this
    worker's process (the step, and the loader's work on a batch) and every other process (with one
    worker and the service paced beside it: the decoder actors, their decode processes and Ray Data's
    read tasks). On a machine whose cores the step alone would fill, the other processes' cores are
    what the step loses."""

    def __init__(self) -> None:
        import psutil

        self._process, self._wall = psutil.Process(), time.monotonic()
        self._busy, self._own = self._busy_s(), self._own_s()

    @staticmethod
    def _busy_s() -> float:
        import psutil

        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _own_s(self) -> float:
        t = self._process.cpu_times()
        return t.user + t.system

    def stop(self) -> dict[str, float]:
        import psutil

        wall = time.monotonic() - self._wall
        busy, own = (self._busy_s() - self._busy) / wall, (self._own_s() - self._own) / wall
        return {"cores": psutil.cpu_count(), "step_cores": own, "other_cores": max(busy - own, 0.0)}


def _service_batches(loader, epochs: int):
    """The service's batches, epoch after epoch, as the job reads them (one planned execution)."""
    loader.plan(range(epochs))
    for epoch in range(epochs):
        yield from loader.epoch(epoch)


def _in_memory(cfg, workers: int, storage: Path, paced: bool) -> dict[str, float]:
    """Rank 0's figures of ``in_memory_loop`` on ``workers`` workers (paced: beside the job's own data
    service): clips/s of the whole run, torch's threads and where the CPU went (``_CpuSplit``)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.config import to_container
    from pipeline.data.service import build_datasets, ray_train_data_config

    trainer = TorchTrainer(
        in_memory_loop,
        train_loop_config={"experiment": to_container(cfg), "steps": 36, "warmup": 12, "paced": paced},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name=f"in-memory-{workers}-{paced}", storage_path=str(storage)),
        **({"datasets": build_datasets(cfg.data, val=False), "dataset_config": ray_train_data_config(cfg.data)}
           if paced else {}),
    )  # fmt: skip
    return trainer.fit().metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "experiment" / "demo.yaml"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    args = parser.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from core.loopback import keep_ray_on_loopback
    from pipeline.trainer.job import run

    keep_ray_on_loopback()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mvit-bench-train-") as tmp:
        shards = make_shards(Path(tmp))
        for workers in (1, 2):
            runs = Path(tmp) / f"runs{workers}"
            overrides = [f"data.root={shards}", f"trainer.storage_path={runs}", f"trainer.num_workers={workers}",
                         f"data.batch_size={args.global_batch // workers}", f"trainer.epochs={args.epochs}",
                         f"trainer.eval_every_epochs={args.epochs}", "tracking.log_every_steps=2",
                         "tracking.log_system_metrics=false", "trainer.cpus_per_worker=0.5",
                         "data.decoder.num_cpus=0.5", f"optim.reference_batch_size={args.global_batch}"]
            cfg = load_config(args.config, overrides)
            _, job = run(cfg)
            client = MlflowClient(job.tracking_uri)
            (mlrun,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
            history = lambda name: [m.value for m in sorted(client.get_metric_history(mlrun.info.run_id, name), key=lambda m: m.step)][1:]  # noqa: E731
            real, wait = statistics.median(history("train/clips_per_s")), statistics.mean(history("train/data_wait_fraction"))
            blocked = statistics.mean(history("train/data_blocked_fraction"))

            synth_cfg = load_config(args.config, overrides)
            synth_cfg.model.num_classes = len(job.classes)
            memory, paced = (_in_memory(synth_cfg, workers, Path(tmp) / f"synthetic-{workers}", p) for p in (False, True))
            results[workers] = {"real": real, "memory": memory["clips_per_s"], "paced": paced["clips_per_s"],
                                "wait": wait, "blocked": blocked, "cpu": {"in-memory": memory, "paced": paced}}

    print(f"\nMViT demo model ({args.config}), global batch {args.global_batch}, CPU, {args.epochs} epochs")
    print("workers  real clips/s  in-memory  in-memory paced by the service  stall  of it: service  job's step"
          "  job's data wait  of which blocked")
    for workers, r in results.items():
        print(f"{workers:7d}  {r['real']:12.1f}  {r['memory']:9.1f}  {r['paced']:30.1f}  "
              f"{1 - r['real'] / r['memory']:5.2f}  {1 - r['paced'] / r['memory']:13.2f}  "
              f"{(r['paced'] - r['real']) / r['memory']:10.2f}  {r['wait']:15.2f}  {r['blocked']:16.2f}")
    print("\nwhere the machine's CPU went during the timed steps (cores, of rank 0's view of the machine)")
    print("workers  run        torch threads  this worker  other processes  machine's cores  time taking batches")
    for workers, r in results.items():
        for name, c in r["cpu"].items():
            print(f"{workers:7d}  {name:9s}  {c['torch_threads']:13d}  {c['step_cores']:11.2f}  "
                  f"{c['other_cores']:15.2f}  {c['cores']:15d}  {c['take_fraction']:19.2f}")
    print(f"scaling 1 -> 2 workers: real {results[2]['real'] / results[1]['real']:.2f}x, "
          f"in-memory {results[2]['memory'] / results[1]['memory']:.2f}x")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
