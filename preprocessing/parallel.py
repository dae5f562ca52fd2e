"""Run shard jobs: in this process, on a pool of local processes, or as Ray tasks on a cluster.

A job is "produce one whole shard" (shards.write_shard); workers write straight to the output
store, so shard bytes never travel through this driver and Ray nodes scale independently. Jobs only
report progress counts, shown as one tqdm bar over inputs (rate and ETA).

Local processes use the "spawn" start method: the driver may hold threads (s3fs's event loop,
tqdm's monitor) that a forked child must not inherit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tqdm import tqdm

from core.redact import install_redaction

Job = TypeVar("Job")
Result = TypeVar("Result")
JobFn = Callable[[Any, Callable[[int], None]], Any]

_RAY_POLL_S = 0.5


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ParallelConfig:
    """`ray_address`: None = local processes; "" = Ray's default resolution (RAY_ADDRESS, else the
    latest cluster started on this machine, else a new local instance); anything else is passed to
    `ray.init` ("local" = a new private instance, "auto", "ray://head:10001", ...)."""

    workers: int = field(default_factory=available_cpus)
    ray_address: str | None = None
    progress: bool = True


def run_jobs(
    fn: JobFn, jobs: Sequence[Job], total_units: int, unit: str, config: ParallelConfig
) -> Iterator[Result]:
    """Yield fn(job, report) for every job, in completion order; the first failure is raised."""
    if not jobs:
        return
    with tqdm(total=total_units, unit=unit, disable=not config.progress, dynamic_ncols=True, smoothing=0.1) as bar:
        if config.ray_address is not None:
            yield from _run_ray(fn, jobs, config.ray_address, bar)
        elif config.workers <= 1 or len(jobs) == 1:
            for job in jobs:
                yield fn(job, bar.update)
        else:
            yield from _run_processes(fn, jobs, min(config.workers, len(jobs)), bar)


# ---- local processes -------------------------------------------------------------------------

_progress_queue: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    install_redaction()  # a spawned worker: secrets out of its log records, as in the CLI process
    _progress_queue = progress_queue


def _call_in_worker(fn: JobFn, job: Any) -> Any:
    return fn(job, _progress_queue.put)


def _run_processes(fn: JobFn, jobs: Sequence[Any], workers: int, bar: tqdm) -> Iterator[Any]:
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                bar.update(progress.get(timeout=0.2))
            except queue.Empty:
                continue

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(progress,)) as pool:
            # At most `workers` jobs are submitted at a time. The executor would otherwise queue extra
            # jobs that can no longer be cancelled, and after a failure (e.g. a storage outage) the
            # run would wait for them to fail one after another instead of stopping after the
            # jobs already running.
            todo = iter(jobs)
            pending: set[Future] = set()
            try:
                while True:
                    for job in todo:
                        pending.add(pool.submit(_call_in_worker, fn, job))
                        if len(pending) >= workers:
                            break
                    if not pending:
                        break
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            finally:
                for future in pending:
                    future.cancel()
    finally:
        stop.set()
        drainer.join()
        while not progress.empty():
            bar.update(progress.get())


# ---- Ray ---------------------------------------------------------------------------------------


def _run_ray(fn: JobFn, jobs: Sequence[Any], address: str, bar: tqdm) -> Iterator[Any]:
    import ray

    import core
    import preprocessing

    started_here = not ray.is_initialized()
    if started_here:
        # Ship this package and the core it stands on to the workers, so every node runs the driver's
        # exact code.
        package_dirs = [os.path.dirname(os.path.abspath(p.__file__)) for p in (preprocessing, core)]
        if address == "local":  # a private instance: every port on 127.0.0.1 (see core.loopback)
            from core.loopback import keep_ray_on_loopback

            keep_ray_on_loopback()
        ray.init(address=address or None, runtime_env={"py_modules": package_dirs}, log_to_driver=False)
    try:
        counter = ray.remote(num_cpus=0)(_Counter).remote()
        task = ray.remote(num_cpus=1)(_call_in_ray_task)
        pending = [task.remote(fn, job, counter) for job in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=_RAY_POLL_S)
            bar.update(ray.get(counter.take.remote()))
            for ref in done:
                yield ray.get(ref)
        bar.update(ray.get(counter.take.remote()))
    finally:
        if started_here:
            ray.shutdown()


class _Counter:
    """Progress counts reported by Ray tasks, drained by the driver's polling loop."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _call_in_ray_task(fn: JobFn, job: Any, counter: Any) -> Any:
    install_redaction()  # secrets out of this task's log records
    return fn(job, lambda n: counter.add.remote(n))
