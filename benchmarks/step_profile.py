"""Where a training worker's time goes, read from the running job itself.

``benchmarks/train.py`` compares the real job with an in-memory loop run a minute later; on a shared
machine those two runs can differ by more than the effect being looked for (three runs on one day
gave in-memory references of 32, 39 and 45 clips/s). This script needs no second run: it starts the
real job (``pipeline.trainer.job`` through ``pipeline/train.py``, the demo model on a synthetic
Kinetics-layout shard set, one worker), waits for training to be under way, samples the training
worker with py-spy (Ray's own profiler dependency) for ``--seconds``, idle time included, and splits
the training thread's wall time into what the bare step does (the model's forward, backward,
clipping, the optimiser: what an in-memory loop also does) and everything the job adds (normalising,
mixing, the loss, reseeding, taking a batch, waiting for one, logging, the preemption check,
checkpoints, validation). Proportions of one process in one window, so the machine's speed cancels.

    python benchmarks/step_profile.py [--seconds 40] [--config configs/experiment/demo.yaml]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from train import make_shards  # noqa: E402  (the same shard set as benchmarks/train.py)

# (category, the frames that put a sample in it), first match wins; matched against the training
# thread's stack below Trainer.run. "bare step" categories are what an in-memory loop does too.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("job: validation (its batches and waits included)", ("Trainer.evaluate",)),
    ("bare step: model forward", ("Trainer._forward_loss>Module._wrapped_call_impl",)),
    ("bare step: backward", ("Tensor.backward",)),
    ("bare step: gradient clipping", ("clip_grad_norm_",)),
    ("bare step: optimiser", ("Optimizer.profile_hook_step", "Optimizer.zero_grad", "_use_grad")),
    ("job: normalise", ("normalize",)),
    ("job: augmentation on the device", ("augment_on_device",)),
    ("job: mixup / cutmix, soft targets", ("mix_batch",)),
    ("job: loss", ("soft_cross_entropy",)),
    ("job: reseeding, LR schedule, fault hook", ("Trainer._reseed", "Schedule.set", "check_step")),
    ("job: waiting for a training batch", ("ShardLoader._next_rows",)),
    ("job: taking a batch (checks, tensors)", ("ShardLoader.",)),
    ("job: logging (all-reduce + MLflow)", ("Trainer._log_window", "Tracker.log_metrics")),
    ("job: preemption check", ("Trainer.answer_preemption",)),
    ("job: checkpoints", ("CheckpointManager.", "Trainer.checkpoint_mid_epoch")),
    ("job: epoch checks and report", ("Trainer.train_epoch",)),
)


def categorize(stack: list[str]) -> str | None:
    """The category of one training-thread sample (frames outermost first), None for other threads."""
    if "Trainer.run" not in stack:
        return None
    inner = stack[stack.index("Trainer.run") + 1:]
    path = ">".join(inner)
    for name, needles in CATEGORIES:
        if any(needle in path for needle in needles):
            return name
    return "job: other (" + (inner[0] if inner else "Trainer.run") + ")"


def read_samples(raw: Path) -> collections.Counter:
    """py-spy's ``--format raw`` output (collapsed stacks, ``frame;frame;... count``) -> samples per category."""
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, n = line.rpartition(" ")
        category = categorize([frame.split(" (")[0] for frame in stack.split(";")])
        if category is not None:
            counts[category] += int(n)
    return counts


def training_worker(job: subprocess.Popen) -> int | None:
    import psutil

    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def _stop(job: subprocess.Popen) -> None:
    """Ctrl-C to the job (it shuts its Ray down), then its whole process group if it lingers."""
    if job.poll() is None:
        job.send_signal(signal.SIGINT)
        try:
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "experiment" / "demo.yaml"))
    parser.add_argument("--seconds", type=float, default=40.0, help="how long py-spy samples the worker")
    parser.add_argument("--after-epochs", type=int, default=2, help="training epochs to wait for before sampling")
    parser.add_argument("--global-batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mvit-bench-profile-") as tmp:
        root = Path(tmp)
        shards = make_shards(root)
        log = root / "job.log"
        # The job of benchmarks/train.py at 1 worker, with enough epochs to outlast the sampling.
        overrides = [f"data.root={shards}", f"trainer.storage_path={root / 'runs'}", "trainer.num_workers=1",
                     f"data.batch_size={args.global_batch}", "trainer.epochs=40", "trainer.eval_every_epochs=5",
                     "tracking.log_every_steps=2", "tracking.log_system_metrics=false", "trainer.cpus_per_worker=0.5",
                     "data.decoder.num_cpus=0.5", f"optim.reference_batch_size={args.global_batch}"]  # fmt: skip
        with log.open("w") as out:
            # its own process group: the job's local Ray is stopped with it, and nothing else on the machine
            job = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "train.py"), "--config", args.config,
                                    *overrides], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   start_new_session=True)  # fmt: skip
        try:
            deadline, pid = time.monotonic() + 600, None
            while time.monotonic() < deadline and job.poll() is None:
                pid = pid or training_worker(job)
                if pid and len(re.findall(r"epoch \d+/\d+ \|", log.read_text())) >= args.after_epochs:
                    break
                time.sleep(1)
            if pid is None or job.poll() is not None:
                print(log.read_text()[-3000:])
                raise SystemExit("the job ended or never started a training worker before sampling")
            raw = root / "worker.txt"
            subprocess.run([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--duration",
                            str(int(args.seconds)), "--rate", "100", "--idle", "--format", "raw", "--nonblocking",
                            "--output", str(raw)], check=True, capture_output=True)  # fmt: skip
        finally:
            _stop(job)
        counts = read_samples(raw)
    total = sum(counts.values())
    if not total:
        raise SystemExit("py-spy saw no sample of the training thread")
    bare = sum(n for name, n in counts.items() if name.startswith("bare step"))
    print(f"\ntraining thread of the 1-worker demo job ({args.config}), {args.seconds:g} s sampled at 100 Hz after "
          f"{args.after_epochs} epochs, idle included: {total} samples")  # fmt: skip
    for name, n in sorted(counts.items(), key=lambda kv: (not kv[0].startswith("bare"), -kv[1])):
        print(f"  {n / total:6.1%}  {name}")
    print(f"the bare step: {bare / total:.1%} of the thread's time; what the job adds: {1 - bare / total:.1%} "
          f"(stall this implies against an in-memory loop of the same step: {1 - bare / total:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
