"""CPU latency per clip (batch 1, fp32) of a trained MViT served three ways: the eager model, its ONNX
export under onnxruntime (CPUExecutionProvider) and its torch.export program (``.module()``).

The network goes the way a user's does: written as a final model folder (``pipeline/trainer/export.py``),
read back (``pipeline.serving.model``), exported with ``pipeline.serving.exporters`` to files, each file
verified against eager logits (``pipeline.serving.verify``) and loaded back for timing. Weights are the
model's own initialisation: latency does not depend on their values. ONNX is timed at the default
opset 23 (native Attention op) and at opset 18 (attention decomposed into MatMul / Softmax), both with a
dynamic batch, and at opset 23 with the batch fixed to 1; the program with a dynamic batch.

Timed calls are interleaved (eager, onnx, ..., eager, onnx, ...) so that noise from other processes hits
every variant alike; medians are printed with each variant's speed-up over eager (eager median / its
median), and the CPU time other processes used meanwhile. onnxruntime's idle threads are told not to
spin between calls (``session.intra_op.allow_spinning`` 0): spinning, its default, would hold the cores
while the next variant runs and slow it several-fold on a 2-core machine.

    python benchmarks/export.py                          # MViT-B 16x4, 1x3x16x224x224, 10 rounds
    python benchmarks/export.py --frames 4 --crop 32 --rounds 3   # a quick dry run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import torch

from pipeline.models.presets import build_preset
from pipeline.serving.exporters import example_clips, export_onnx, export_program
from pipeline.serving.model import load_model
from pipeline.serving.spec import default_input_spec, metadata
from pipeline.serving.verify import onnx_runner, program_runner, verify
from pipeline.trainer.export import export_model

# name -> (format, opset, batch); None = dynamic
VARIANTS = {
    "onnx opset 23, dynamic batch": ("onnx", 23, None),
    "onnx opset 18, dynamic batch": ("onnx", 18, None),
    "onnx opset 23, batch 1": ("onnx", 23, 1),
    "torch.export, dynamic batch": ("torch-export", None, None),
}


def _cpu_s() -> tuple[float, float]:
    """(CPU-s used by every process on the machine, CPU-s used by this one)."""
    machine, own = psutil.cpu_times(), psutil.Process().cpu_times()
    return machine.user + machine.nice + machine.system, own.user + own.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mvit_b_16x4")
    parser.add_argument("--frames", type=int, help="default: the preset's (16)")
    parser.add_argument("--crop", type=int, help="default: the preset's (224)")
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    args = parser.parse_args()
    sizes = {k: v for k, v in (("num_frames", args.frames), ("crop_size", args.crop)) if v}
    torch.manual_seed(0)
    runners, exported = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        folder = Path(tmp) / "final_model"
        net = build_preset(args.preset, **sizes)
        export_model(net.state_dict(), net.cfg, folder, classes=[f"c{i}" for i in range(net.cfg.num_classes)])
        del net
        loaded = load_model(str(folder))
        cfg, model = loaded.config, loaded.model
        meta = metadata(default_input_spec(cfg), tuple(loaded.classes), cfg, {"benchmark": True})
        for name, (fmt, opset, batch) in VARIANTS.items():
            start = time.perf_counter()
            if fmt == "onnx":
                path = export_onnx(model, cfg, Path(tmp) / f"{len(exported)}.onnx", batch, meta, opset)
                runner, runtime = onnx_runner(path, spinning=False), "onnxruntime"
            else:
                path = export_program(model, cfg, Path(tmp) / f"{len(exported)}.pt2", batch, meta)
                runner, runtime = program_runner(path), "torch.export"
            seconds = time.perf_counter() - start
            check = verify(model, cfg, runner, runtime, (1,) if batch else (1, 2))
            exported[name] = (seconds, path.stat().st_size, check)
            runners[name] = runner

        clip = example_clips(cfg, 1, seed=7)
        array = clip.numpy()

        def eager(_: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(clip).numpy()

        calls = {"eager": eager, **runners}
        for _ in range(args.warmup):
            for call in calls.values():
                call(array)
        times: dict[str, list[float]] = {name: [] for name in calls}
        machine, own, wall = *_cpu_s(), time.monotonic()
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call(array)
                times[name].append(time.perf_counter() - start)
        machine_after, own_after = _cpu_s()
        wall = time.monotonic() - wall

    print(f"{args.preset} at {cfg.num_frames}x{cfg.crop_size}^2, batch 1, fp32 on the CPU: torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__} (default session options but no "
          "spinning of idle threads), "
          f"{psutil.cpu_count()} CPUs, {args.rounds} interleaved rounds after {args.warmup} warm-up calls each")
    print(f"other processes used {max(machine_after - machine - (own_after - own), 0.0):.1f} CPU-s of the "
          f"{wall * (psutil.cpu_count() or 1):.0f} the machine had during the {wall:.0f} s of timed calls")
    base = statistics.median(times["eager"])
    print("| variant | median s/clip | min | max | speed-up vs eager | export s | file MB | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        seconds, size, check = exported.get(name, (None, None, None))
        extra = ("- | - | -" if check is None else
                 f"{seconds:.0f} | {size / 1e6:.0f} | {check.max_abs_diff:.1e}{'' if check.passed else ' FAILED'}")
        print(f"| {name} | {med:.3f} | {min(values):.3f} | {max(values):.3f} | {base / med:.2f}x | {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
