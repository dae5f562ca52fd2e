"""Forward+backward throughput and peak memory: our MViT-B 16x4 against torchvision's ``mvit_v1_b``.

Both models hold the same weights (torchvision's, converted) and see the same input. Timed steps are
interleaved (ours, theirs, ours, ...) so that machine noise hits both alike; the ratio printed is
torchvision's median step time over ours (> 1 means ours is faster). Peak memory is measured for each
model in a fresh child process (peak RSS on CPU, ``max_memory_allocated`` on GPU) so the two do not
share an allocator high-water mark.

    python benchmarks/model.py [--batch 1] [--steps 5] [--device cpu]

torchvision builds ``mvit_v1_b`` only at 16x224x224, so that is the input size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torchvision

from pipeline.models.convert import load_weights
from pipeline.models.presets import build_preset


FRAMES, CROP = 16, 224


def build(which: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    reference = torchvision.models.video.mvit_v1_b()
    if which == "torchvision":
        model = reference
    else:
        model = build_preset("mvit_b_16x4")
        load_weights(model, reference.state_dict())
    return model.to(device).train()


def step(model: torch.nn.Module, clip: torch.Tensor, labels: torch.Tensor) -> float:
    if clip.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(clip), labels)
    loss.backward()
    if clip.is_cuda:
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def inputs(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, FRAMES, CROP, CROP, generator=g).to(device),
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

    models = {name: build(name, args.device) for name in ("ours", "torchvision")}
    clip, labels = inputs(args.batch, args.device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        step(model, clip, labels)
    for _ in range(args.steps):
        for name, model in models.items():
            times[name].append(step(model, clip, labels))
    del models

    memory = {}
    for name in ("ours", "torchvision"):
        cmd = [sys.executable, __file__, "--memory-child", name, "--batch", str(args.batch), "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        memory[name] = json.loads(out)["peak_mib"]

    print(f"MViT-B {FRAMES}x{CROP}^2, batch {args.batch}, fp32 on {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} interleaved steps")
    for name in ("ours", "torchvision"):
        med = statistics.median(times[name])
        print(f"  {name:12s} median step {med:.3f}s  ({args.batch / med:.2f} clips/s)  "
              f"peak step memory {memory[name]:.0f} MiB")
    ratio = statistics.median(times["torchvision"]) / statistics.median(times["ours"])
    print(f"throughput ratio ours/torchvision: {ratio:.2f}x (target >= 1.2x)")
    print(f"peak memory ratio ours/torchvision: {memory['ours'] / memory['torchvision']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
