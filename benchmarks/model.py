"""Forward+backward throughput and peak memory: our MViT-B 16x4 against torchvision's ``mvit_v1_b``.

Both models hold the same weights (torchvision's, converted) and see the same input. Timed steps are
interleaved (ours, theirs, ours, ...) so that machine noise hits both alike; the ratio printed is
torchvision's median step time over ours (> 1 means ours is faster). Peak memory is measured for each
model in a fresh child process (peak RSS on CPU, ``max_memory_allocated`` on GPU) so the two do not
share an allocator high-water mark.

A ratio says which model is faster, not how far either is from what the machine can do: the run also
measures the machine's GEMM rate in the dtype it uses (fp32 on the CPU, bf16 on a GPU) between the
rounds of steps and prints each model's achieved FLOP/s as a fraction of it (model FLOPs from
``pipeline.models.flops``, a training step counted as 3x the forward), and which
``scaled_dot_product_attention`` backend our model ran.

    python benchmarks/model.py [--batch 1] [--steps 5] [--device cpu]

torchvision builds ``mvit_v1_b`` only at 16x224x224, so that is the input size. The bf16 GPU check of
both MViT versions at every batch size that fits is ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torchvision

# The measurements the GPU check makes too, one copy (this script's folder is first on sys.path).
from gpu_check import datasheet_peak, matmul_peak, sdpa_backends, train_flops_per_clip
from gpu_check import fwd_bwd_step as step
from pipeline.models.convert import load_weights
from pipeline.models.presets import build_preset, preset_config

FRAMES, CROP = 16, 224
PRESET = "mvit_b_16x4"
# GEMM size of the peak measurement: large enough for the matmul units to be busy, quick on 2 cores.
MATMUL_N = {"cpu": 2048, "cuda": 8192}
# Best of this many GEMMs a sample. A sample is taken before each round of steps and after the last: on
# the shared 2-core machine the GEMM rate swings 2x within minutes (another job takes a core), so each
# step is set against the rate measured next to it rather than against one figure from another minute.
MATMUL_REPEATS = 3


@dataclass
class Timings:
    steps: dict[str, list[float]]  # seconds per step, per model, in rounds
    gemm: list[float]  # GEMM FLOP/s before each round and after the last

    def fractions(self, name: str, flops: float) -> list[float]:
        """Each step's FLOP/s over the better of the GEMM rates measured just before and just after it."""
        return [flops / t / max(self.gemm[i], self.gemm[i + 1]) for i, t in enumerate(self.steps[name])]


def _machine_cpu_s() -> float | None:
    """CPU time every process on this machine has used (user + nice + system), None off Linux."""
    try:
        with open("/proc/stat") as stat:
            return sum(int(v) for v in stat.readline().split()[1:4]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_rounds(models: dict[str, torch.nn.Module], clip: torch.Tensor, labels: torch.Tensor, rounds: int,
                 device: torch.device, dtype: torch.dtype) -> Timings:  # fmt: skip
    """Rounds of one step per model (ours, theirs, ours, ...), so that machine noise hits both alike,
    with a GEMM sample between rounds."""
    timings = Timings({name: [] for name in models}, [])
    for _ in range(rounds):
        timings.gemm.append(matmul_peak(device, dtype, MATMUL_N[device.type], MATMUL_REPEATS))
        for name, model in models.items():
            timings.steps[name].append(step(model, clip, labels))
    timings.gemm.append(matmul_peak(device, dtype, MATMUL_N[device.type], MATMUL_REPEATS))
    return timings


def dtype_for(device: str) -> torch.dtype:
    """bf16 on a GPU, as training runs there; fp32 on the CPU, where the project trains in fp32."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def build(which: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    reference = torchvision.models.video.mvit_v1_b()
    if which == "torchvision":
        model = reference
    else:
        model = build_preset(PRESET)
        load_weights(model, reference.state_dict())
    return model.to(device, dtype_for(device)).train()


def inputs(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, FRAMES, CROP, CROP, generator=g).to(device, dtype_for(device)),
            torch.randint(0, 400, (batch,), generator=g).to(device))


def _peak_rss_mib() -> float:
    """This process's RSS high-water mark. Read from /proc (VmHWM), not getrusage: after fork+exec
    ru_maxrss starts from the parent's peak, which would hide the child's own."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def peak_memory_child(which: str, args: argparse.Namespace) -> None:
    """Runs in a child process and reports the peak memory of one training step in MiB.

    On CPU the figure is the growth of the process's peak RSS over one step from a fresh start (the
    high-water mark cannot be reset, so there is no warm-up step); on GPU, the allocator's peak.
    """
    model = build(which, args.device)
    clip, labels = inputs(args.batch, args.device)
    # Dropout/drop-path are random: fix the seed so both models drop the same units.
    torch.manual_seed(2)
    if args.device.startswith("cuda"):
        step(model, clip, labels)
        torch.cuda.reset_peak_memory_stats()
        step(model, clip, labels)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import gc

        gc.collect()
        before = _peak_rss_mib()
        step(model, clip, labels)
        peak = _peak_rss_mib() - before
    print(json.dumps({"peak_mib": peak}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", choices=["ours", "torchvision"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args)
        return 0

    device, dtype = torch.device(args.device), dtype_for(args.device)
    models = {name: build(name, args.device) for name in ("ours", "torchvision")}
    clip, labels = inputs(args.batch, args.device)
    # warm-up; ours under the profiler, which names the attention kernel it dispatched to
    backends = sdpa_backends(partial(step, models["ours"], clip, labels))
    step(models["torchvision"], clip, labels)
    # Other processes' CPU time during the timed rounds: on a 2-core machine one busy neighbour halves
    # every figure below, and the ratios survive it only roughly.
    machine, own, wall = _machine_cpu_s(), _own_cpu_s(), time.monotonic()
    timings = timed_rounds(models, clip, labels, args.steps, device, dtype)
    times = timings.steps
    machine_after = _machine_cpu_s()
    others = None if machine is None or machine_after is None else machine_after - machine - (_own_cpu_s() - own)
    wall = time.monotonic() - wall
    del models

    memory = {}
    for name in ("ours", "torchvision"):
        cmd = [sys.executable, __file__, "--memory-child", name, "--batch", str(args.batch), "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        memory[name] = json.loads(out)["peak_mib"]

    flops = train_flops_per_clip(preset_config(PRESET)) * args.batch
    sheet = datasheet_peak(device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"MViT-B {FRAMES}x{CROP}^2, batch {args.batch}, {dtype_name} on {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} interleaved steps")
    if others is not None:
        print(f"other processes used {max(others, 0.0):.1f} CPU-s of the {wall * (os.cpu_count() or 1):.0f} "
              f"the machine had during the {wall:.0f} s of timed steps")
    peak = max(timings.gemm)
    print(f"GEMM rate ({dtype_name} {MATMUL_N[device.type]}^3, best of {MATMUL_REPEATS}, before each round and "
          f"after the last): {min(timings.gemm) / 1e9:.1f} to {peak / 1e9:.1f} GFLOP/s"
          + (f"; datasheet peak {sheet / 1e12:.0f} TFLOP/s" if sheet else ""))
    print(f"model FLOPs per step: {flops / 1e9:.1f} GFLOP (3 x forward); our attention ran: "
          + (", ".join(f"{b} x{k}" for b, k in sorted(backends.items())) or "no SDPA call seen"))
    for name in ("ours", "torchvision"):
        med = statistics.median(times[name])
        achieved = flops / med
        datasheet = f", {achieved / sheet:.1%} of the datasheet's" if sheet else ""
        print(f"  {name:12s} median step {med:.3f}s  ({args.batch / med:.2f} clips/s)  peak step memory "
              f"{memory[name]:.0f} MiB\n  {'':12s} {achieved / 1e9:.1f} GFLOP/s: "
              f"{statistics.median(timings.fractions(name, flops)):.1%} of the GEMM rate next to each step "
              f"(median), {achieved / peak:.1%} of the run's best GEMM rate{datasheet}")
    ratio = statistics.median(times["torchvision"]) / statistics.median(times["ours"])
    print(f"throughput ratio ours/torchvision: {ratio:.2f}x (target >= 1.2x)")
    print(f"peak memory ratio ours/torchvision: {memory['ours'] / memory['torchvision']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
