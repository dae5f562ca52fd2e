"""Capacity plan, on paper, for Kinetics-400 MViT-B 16x4 on N GPUs, from per-unit figures.

Nothing here runs on a GPU or a cluster: the plan multiplies per-unit figures out to the cluster size.
Every input is printed with where it comes from, in one of three kinds:

- computed here from the repository: the model's parameters and FLOPs (``model_stats``, the counter
  behind ``python -m pipeline.models table``), the batch, prefetch, decoder-pool, logging and
  checkpoint settings of the experiment config, the number of metrics the trainer logs per step
  (``Meter.metrics``), the epoch layout (``pipeline.data.plan.Layout``);
- measured on this machine: the CPU time one K400-like training sample costs the decoder (Decord
  decode, then what the actor renders: the full augmentation recipe, or with ``augment.on_device``,
  resolved as the job resolves it, only cutting out each view's box, resize, flip, RandAugment and
  erasing running on the training GPUs), on the synthetic clips ``benchmarks/data.py`` uses. The defaults are the figures of
  ``--measure`` runs recorded in docs/benchmarks.md; ``--measure`` measures them again (1-2 minutes;
  it also saves a real checkpoint of the model to count its bytes);
- assumed, each a named option whose help cites its source: GPU peak FLOP/s and the fraction of it a
  training step reaches, the dataset size, the encoded size of a clip, S3 bandwidth per node, node
  shapes.

With ``kubectl`` on PATH it also renders ``k8s/overlays/prod`` and compares what the RayJob
``mvit-train`` declares (worker groups, CPUs, GPUs, object store) with the plan.

    python benchmarks/plan.py                       # < 30 s; the table in docs/benchmarks.md
    python benchmarks/plan.py --measure             # measure the per-sample figures again first (~2 min)
    python benchmarks/plan.py --gpus 32 --set tracking.log_every_steps=100
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Recorded by `python benchmarks/plan.py --measure` on this project's 2-core CPU machine (docs/benchmarks.md,
# "Plan"; 2026-12-02 00:13 UTC, nothing else running): CPU seconds per training sample (2 views cut from one
# decoded clip, augment.clips_per_sample 1, K400 recipe) on the synthetic 1280x720 -> 320p clips: Decord, and
# the actor's rendering, with the augmentation in the actor (False) or on the device (True: the actor only cuts
# out each view's box), measured taking turns on the same samples.
MEASURED_CPU_S = {False: (0.0625, 0.0712), True: (0.0625, 0.0062)}  # augment.on_device: (Decord, rendering)
# With augment.on_device a row holds its view's box cut out of the decoded frames, not the rendered view:
# bytes per view, the mean over the same --measure run (2.408 MB for a rendered 16 x 224^2 view).
MEASURED_CROP_BYTES = 2_634_000

# bf16 dense tensor-core peak, TFLOP/s (without sparsity): NVIDIA A100 datasheet (SXM, 312) and NVIDIA
# H100 datasheet (SXM5, 1979 "with sparsity" = 989 dense).
GPU_PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0}
# MLflow 3.x system metrics (mlflow/system_metrics/metrics/*.py): cpu_monitor 3, disk_monitor 3,
# network_monitor 2, gpu_monitor 5 per visible GPU; SystemMetricsMonitor samples every 10 s and logs
# every sample (sampling_interval=10, samples_before_logging=1).
MLFLOW_SYSTEM_METRICS, MLFLOW_SYSTEM_PER_GPU, MLFLOW_SYSTEM_INTERVAL_S = 8, 5, 10.0


@dataclass
class Input:
    label: str
    value: str
    basis: str


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---- measurement (--measure) -------------------------------------------------------------------


def _bench_data():
    """benchmarks/data.py as a module: its synthetic clips and shards are the measurement's input."""
    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).with_name("data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_decode(cfg, workdir: Path, count: int, rounds: int) -> tuple[dict[bool, tuple[float, ...]], float]:
    """{augment.on_device: (decode CPU s, augment CPU s, wall s per training sample, bytes per view sent)},
    both settings, and the shards' bytes per sample.

    The project's ``SampleDecoder`` (what a decoder actor runs) with the experiment's data config,
    single-threaded, in this process; CPU time (``time.process_time``) so a busy machine changes the
    figure less than wall time. "decode" is ``_read_clips`` (Decord: open, seek, decode and scale the
    frames both views need); "augment" is the rest of ``decode``: crops, resize, flip, RandAugment,
    erasing, or with ``augment.on_device`` cutting out the crops (and packing them behind the drawn
    parameters).
    ``rounds`` passes over the same ``count`` samples (new views each pass), the two settings taking
    turns on the same samples and draws; per setting the pass with the least CPU time counts (best of
    N: what the code costs, less what other processes on the machine cost it). Both settings decode the
    same frames, so both get the lesser of their two Decord figures: the difference between them is
    the rendering alone, not the noise of two measurements of the same decoding.
    """
    import dataclasses

    import torch

    bench = _bench_data()
    _, shards = bench.prepare(workdir, videos=8, copies=8, seconds=10, size="1280x720")
    manifest = json.loads((shards / "train.manifest.json").read_text())
    samples = bench.shard_samples(shards)
    torch.set_num_threads(1)
    keys = sorted(samples)
    decoders = {on: _TimedDecoder(dataclasses.replace(cfg.data, augment=dataclasses.replace(cfg.data.augment,
                                                                                           on_device=on)))
                for on in (False, True)}  # fmt: skip
    best: dict[bool, tuple[float, float, float, float]] = {}
    for r in range(rounds):
        for on, decoder in decoders.items():
            cpu, read, wall, sent = decoder.run([(samples[keys[i % len(keys)]], keys[i % len(keys)], r * count + i)
                                                 for i in range(count)])  # fmt: skip
            if on not in best or cpu < best[on][0]:
                best[on] = (cpu, read, wall, sent)
    per_sample = manifest["total_bytes"] / manifest["num_samples"]
    decode = min(read for _, read, _, _ in best.values()) / count
    return {on: (decode, (cpu - read) / count, wall / count, sent)
            for on, (cpu, read, wall, sent) in best.items()}, per_sample  # fmt: skip


class _TimedDecoder:
    """A ``SampleDecoder`` whose Decord part (``_read_clips``) is timed apart from the rest."""

    def __init__(self, data) -> None:
        from pipeline.data.sample_decode import SampleDecoder

        self.decoder = SampleDecoder(data, "video", train=True)
        self.views = data.augment.repeated_aug
        self.read_cpu = 0.0
        read_clips = self.decoder._read_clips

        def timed_read(*args, **kwargs):
            start = time.process_time()
            try:
                return read_clips(*args, **kwargs)
            finally:
                self.read_cpu += time.process_time() - start

        self.decoder._read_clips = timed_read
        aug = data.augment
        # with on_device a flat buffer, each view's record and crop at its box's size (sample_decode.pack_crops)
        self.shape = None if self.decoder.on_device else (aug.repeated_aug, 3, data.sampling.num_frames,
                                                          aug.crop_size, aug.crop_size)  # fmt: skip

    def run(self, work: list) -> tuple[float, float, float, float]:
        """(CPU s, of which Decord, wall s, output bytes per view) for ``work``: ((bytes, width, height), key,
        epoch) per sample, after one warm-up decode (imports, first open)."""
        ((data, width, height), key, _) = work[0]
        self.decoder.decode(data, {"width": width, "height": height}, key, 10**6)
        self.read_cpu = 0.0
        cpu, wall, nbytes = time.process_time(), time.perf_counter(), 0
        for (data, width, height), key, epoch in work:
            out = self.decoder.decode(data, {"width": width, "height": height}, key, epoch)
            assert out.shape == self.shape if self.shape else out.ndim == 1, out.shape
            nbytes += out.nbytes
        return time.process_time() - cpu, self.read_cpu, time.perf_counter() - wall, nbytes / len(work) / self.views


def measure_checkpoint(cfg) -> tuple[int, float]:
    """Bytes on disk and seconds of one real checkpoint (``save_checkpoint``: DCP, model + optimiser
    state after one step) of the experiment's model, written to a temporary directory in one process."""
    import warnings

    import torch

    from pipeline.config import build_model_config
    from pipeline.models.mvit import MViT
    from pipeline.trainer.checkpoint import TrainState, save_checkpoint
    from pipeline.trainer.optim import build_optimizer

    model = MViT(build_model_config(cfg.model))
    optimizer = build_optimizer(model, cfg.optim, cfg.global_batch_size)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW creates its two moments (and a step counter) per parameter, SGD its momentum
    with tempfile.TemporaryDirectory(prefix="mvit-plan-ckpt-") as directory:
        start = time.perf_counter()
        with warnings.catch_warnings():  # "torch.distributed is disabled ...: save in a single process" (it is)
            warnings.simplefilter("ignore", UserWarning)
            save_checkpoint(directory, model, optimizer, TrainState())
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
    return size, seconds


# ---- the prod overlay ---------------------------------------------------------------------------


def _quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def prod_overlay() -> tuple[dict, list[dict]] | str:
    """(entrypoint overrides, worker groups) of RayJob mvit-train in ``kubectl kustomize k8s/overlays/prod``,
    or why not."""
    import yaml

    if shutil.which("kubectl") is None:
        return "kubectl not found: the prod overlay is not compared"
    run = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / "prod")], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    if run.returncode != 0:
        return f"kubectl kustomize k8s/overlays/prod failed: {run.stderr.strip()[:200]}"
    for doc in yaml.safe_load_all(run.stdout):
        if doc and doc.get("kind") == "RayJob" and doc["metadata"]["name"] == "mvit-train":
            break
    else:
        return "no RayJob mvit-train in the prod overlay"
    overrides = dict(w.split("=", 1) for w in doc["spec"]["entrypoint"].split() if "=" in w and not w.startswith("-"))
    groups = []
    for group in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
        groups.append({
            "name": group["groupName"], "min": group.get("minReplicas", 0), "max": group.get("maxReplicas", 0),
            "cpus": _quantity(str(requests.get("cpu", "0"))), "gpus": int(requests.get("nvidia.com/gpu", 0)),
            "object_store": float(group["rayStartParams"].get("object-store-memory", 0)),
        })  # fmt: skip
    return overrides, groups


# ---- the plan -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/experiment/k400_mvit_b_16x4.yaml", help="experiment YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--gpus", type=int, default=64, help="training GPUs (one Ray Train worker each)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="8: an 8-GPU node (AWS p4d.24xlarge: 8 x A100; p5.48xlarge: 8 x H100)")
    parser.add_argument("--gpu-kinds", default="a100,h100", help=f"columns, from {sorted(GPU_PEAK_TFLOPS)}")
    parser.add_argument("--mfu", type=float, default=0.30,
                        help="assumed fraction of the bf16 peak a training step reaches (not measured: no GPU "
                             "here; the same 30%% as the earlier estimate in docs/benchmarks.md)")
    parser.add_argument("--train-videos", type=int, default=240_000,
                        help="K400 training clips: 246,245 listed by Kay et al. 2017 (arXiv:1705.06950); "
                             "~240k are still retrievable")
    parser.add_argument("--clip-bytes", type=float, default=1.52e6,
                        help="encoded bytes per 10 s clip in the shards; default: the Kinetics source average, "
                             "648 GB / 427,549 clips (Kinetics-600 train split as hosted by CVDF, FiftyOne "
                             "dataset zoo docs), for the same YouTube clips at source resolution")
    parser.add_argument("--source-fps", type=float, default=30.0, help="Kinetics clips are mostly 30 fps")
    parser.add_argument("--s3-node-gbps", type=float, default=10.0,
                        help="S3 throughput one node sustains, Gbit/s (assumed; AWS's S3 performance guide "
                             "cites up to 100 Gb/s per instance with many parallel requests)")
    parser.add_argument("--gpu-node-cpus", type=int, default=88,
                        help="CPUs of a GPU node's Ray pod: the prod overlay's 44 per 4 GPUs, for 8 GPUs")
    parser.add_argument("--cpu-node-cpus", type=int, default=15, help="CPUs of a cpu-workers pod (prod overlay: 15)")
    parser.add_argument("--decode-cpu-s", type=float, default=None,
                        help="CPU s per training sample in Decord (measured: see --measure)")
    parser.add_argument("--augment-cpu-s", type=float, default=None,
                        help="CPU s per training sample in the actor's rendering: the full augmentation, or "
                             "cutting out the crops with data.augment.on_device (measured: see --measure)")
    parser.add_argument("--decode-slowdown", type=float, default=1.0,
                        help="multiplier on the decode CPU time for real footage (1.0 = the synthetic clips "
                             "as measured; real footage was guessed 1.5-2x slower, never measured)")
    parser.add_argument("--service-efficiency", type=float, default=0.89,
                        help="decoder-actor throughput through the Ray Data service / the same work alone "
                             "(measured by benchmarks/data.py, ratio 1: 0.89)")
    parser.add_argument("--measure", action="store_true", help="measure decode/augment CPU s and checkpoint bytes now")
    parser.add_argument("--measure-samples", type=int, default=32, help="samples per measuring pass")
    parser.add_argument("--measure-rounds", type=int, default=3, help="passes; the least CPU time counts")
    parser.add_argument("--workdir", default="/tmp/mvit-data-bench", help="benchmarks/data.py's clip cache")
    args = parser.parse_args()

    from pipeline.config import build_model_config, load_config
    from pipeline.data.plan import Layout
    from pipeline.models.flops import model_stats
    from pipeline.trainer.progress import Meter
    from preprocessing.transcode import VideoEncoder, even_scaled_size

    cfg = load_config(ROOT / args.config, ["data.root=s3://mvit-data/k400-shards", *args.set])
    data, trainer, tracking = cfg.data, cfg.trainer, cfg.tracking
    on_device = data.augment.on_device = data.augment.on_device_for(trainer.use_gpu)  # as the job resolves it
    recorded = MEASURED_CPU_S[on_device]
    args.decode_cpu_s = recorded[0] if args.decode_cpu_s is None else args.decode_cpu_s
    args.augment_cpu_s = recorded[1] if args.augment_cpu_s is None else args.augment_cpu_s
    rendered = "cutting out the crops; resize, flip, RandAugment + erasing on the GPUs" if on_device else "full recipe"
    kinds = [k.strip().lower() for k in args.gpu_kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in GPU_PEAK_TFLOPS]
    if unknown:
        parser.error(f"unknown GPU kind(s) {unknown}; known: {sorted(GPU_PEAK_TFLOPS)}")
    if args.gpus % args.gpus_per_node:
        parser.error("--gpus must be a multiple of --gpus-per-node")

    if cfg.data.sampling.mode != "stride":
        parser.error(f"{args.config}: data.sampling.mode={cfg.data.sampling.mode}: the plan models stride sampling "
                     "(a clip's span of a Kinetics video) and its measured decode cost; segment sampling decodes "
                     "frames spread over the whole video and is not modelled")
    measured_note = "recorded --measure run (docs/benchmarks.md, Plan)"
    ckpt_measured, crop_bytes = None, MEASURED_CROP_BYTES
    if args.measure:
        figures, shard_bytes = measure_decode(cfg, Path(args.workdir), args.measure_samples, args.measure_rounds)
        args.decode_cpu_s, args.augment_cpu_s, wall_s, crop_bytes = figures[on_device]
        other = figures[not on_device]
        measured_note = (f"measured now: best of {args.measure_rounds} x {args.measure_samples} samples, "
                         f"{wall_s:.3f} s wall per sample; "
                         f"shards {shard_bytes / 1e6:.3f} MB/sample; augment.on_device={str(not on_device).lower()}: "
                         f"{other[0]:.4f} s + {other[1]:.4f} s; sent per view "
                         f"{figures[True][3] / 1e6:.3f} MB with on_device, {figures[False][3] / 1e6:.3f} MB without")
        ckpt_measured = measure_checkpoint(cfg)
    if not (args.decode_cpu_s > 0 and args.augment_cpu_s > 0):
        parser.error("no decode figures: run with --measure, or give --decode-cpu-s and --augment-cpu-s")

    # ---- per-unit figures from the repository
    model_cfg = build_model_config(cfg.model)
    stats = model_stats(model_cfg)
    params = stats.params
    import torch

    with torch.device("meta"):
        from pipeline.models.mvit import MViT

        tensors = len(list(MViT(model_cfg).parameters()))
    views = data.augment.repeated_aug
    per_unit = max(1, data.batch_size // views)  # samples per batch per worker (pipeline/data/service.py)
    rows = per_unit * views
    frames, crop = data.sampling.num_frames, data.augment.crop_size
    # uint8 (B, 3, T, H, W); with on_device the rows' crops, at their boxes' sizes (measured)
    decoded_batch = rows * crop_bytes if on_device else rows * 3 * frames * crop * crop
    encoded_batch = per_unit * args.clip_bytes
    accum = trainer.grad_accum_steps
    train_metrics = len(Meter().metrics("train/", args.gpus, lr=1.0))
    moments = 2 if cfg.optim.name == "adamw" else 1  # AdamW: exp_avg, exp_avg_sq; SGD: the momentum buffer
    ckpt_bytes = params * 4 * (1 + moments) + (tensors * 4 if moments == 2 else 0)  # fp32; AdamW: a step per tensor
    encoder = VideoEncoder()
    stored_w, stored_h = even_scaled_size(1920, 1080, encoder.short_side)  # 16:9 at the shards' short side
    span = (frames - 1) * data.sampling.stride * args.source_fps / data.sampling.target_fps + 1
    frames_per_sample = views * (span + encoder.gop / 2)  # each view: its span + half a GOP of lead-in
    sample_cpu = args.decode_cpu_s * args.decode_slowdown + args.augment_cpu_s
    nodes = args.gpus // args.gpus_per_node
    spare_gpu_node_cpus = max(0.0, args.gpu_node_cpus - args.gpus_per_node * trainer.cpus_per_worker)
    nvdec_actors_per_gpu = math.floor((1.0 - trainer.gpus_per_worker) / data.decoder.num_gpus + 1e-9)
    layout = Layout(total=args.train_videos, start=0, world_size=args.gpus, per_unit=per_unit)
    steps_per_epoch = math.ceil(layout.batches_per_worker / accum)
    global_batch = args.gpus * rows * accum

    print(f"Plan: {cfg.name} ({args.config}), {cfg.model.preset}, on {args.gpus} GPUs = {nodes} nodes x "
          f"{args.gpus_per_node} GPUs")  # fmt: skip
    print()
    inputs_here = [
        Input("model", f"{params:,} params ({tensors} tensors), {stats.gflops:.2f} GMAC/view forward",
              "model_stats (python -m pipeline.models table)"),
        Input("training FLOP/view", f"{6 * stats.gflops:.1f} GFLOP", "2 FLOP/MAC x (forward + backward = 3 x forward)"),
        Input("batch/worker", f"{rows} views = {per_unit} samples x {views} views (repeated_aug), accum {accum}",
              "data.batch_size, augment.repeated_aug"),
        Input("decoded batch", f"{mb(decoded_batch)} ({rows} x " + (f"{crop_bytes / 1e6:.2f} MB crops, measured"
              if on_device else f"3 x {frames} x {crop}^2 uint8") + ")", "decoder output"),
        Input("pipelining", f"prefetch {data.prefetch_batches} batches/worker, {data.decoder.tasks_in_flight} "
                            f"batches in flight/actor, actors {data.decoder.min_actors}..{data.decoder.max_actors}",
              "data.prefetch_batches, data.decoder.*"),
        Input("NVDEC actors/GPU", f"{nvdec_actors_per_gpu} = floor((1 - {trainer.gpus_per_worker:g}) / "
                                  f"{data.decoder.num_gpus:g})", "trainer.gpus_per_worker, decoder.num_gpus"),
        Input("MLflow per step", f"{train_metrics} metrics every {tracking.log_every_steps} steps, rank 0; "
                                 f"system metrics {'on' if tracking.log_system_metrics else 'off'}",
              "Meter.metrics, tracking.*"),
        Input("checkpoint", f"{mb(ckpt_bytes)} = params x {4 * (1 + moments)} B (fp32 weights + {moments} "
                            f"{'AdamW moments' if moments == 2 else 'SGD momentum buffer'}); every "
                            f"{trainer.checkpoint_every_steps} steps + epoch ends, "
                            f"keep {trainer.num_checkpoints_to_keep}",
              "FSDP2 keeps fp32 params (bf16 compute)"),
        Input("shard encoding", f"short side {encoder.short_side}, GOP {encoder.gop}: {stored_w}x{stored_h} at 16:9",
              "preprocessing VideoEncoder"),
        Input("decode CPU/sample", f"{args.decode_cpu_s:.4f} s Decord + {args.augment_cpu_s:.4f} s augmentation "
                                   f"({rendered}, {views} views) = {1 / sample_cpu:.2f} samples/s per core",
              measured_note),
    ]
    if ckpt_measured:
        inputs_here.append(Input("checkpoint, saved", f"{mb(ckpt_measured[0])} on disk in {ckpt_measured[1]:.1f} s "
                                                      "(local, 1 process)", "save_checkpoint, measured now"))
    print("Inputs computed or measured here")
    for item in inputs_here:
        print(f"  {item.label:<18} {item.value}")
        print(f"  {'':<18}   <- {item.basis}")
    print()
    print("Inputs assumed (options; sources in --help)")
    peaks = ", ".join(f"{k.upper()} {GPU_PEAK_TFLOPS[k]:g}" for k in kinds)
    for label, value in [
        ("GPU bf16 peak", f"{peaks} TFLOP/s dense (NVIDIA datasheets), at --mfu {args.mfu:.2f} (assumed)"),
        ("train videos", f"--train-videos {args.train_videos:,} (Kinetics-400, Kay et al. 2017)"),
        ("clip bytes", f"--clip-bytes {args.clip_bytes / 1e6:.2f} MB (Kinetics source average, CVDF)"),
        ("S3 per node", f"--s3-node-gbps {args.s3_node_gbps:g} Gbit/s"),
        ("node shapes", f"--gpu-node-cpus {args.gpu_node_cpus}, --cpu-node-cpus {args.cpu_node_cpus}"),
        ("decode", f"--decode-slowdown {args.decode_slowdown:g}, --service-efficiency {args.service_efficiency:g}"),
    ]:
        print(f"  {label:<18} {value}")
    print()

    # ---- the plan, one column per GPU kind
    def store(gpus: int, decode_actors: float) -> float:
        """Object-store working set of a node: its trainers' prefetched batches (+ the one in use) and
        its CPU decoder actors' batches in flight (input and output block each)."""
        return (gpus * (data.prefetch_batches + 1) * decoded_batch
                + decode_actors * data.decoder.tasks_in_flight * (decoded_batch + encoded_batch))

    node_bw = args.s3_node_gbps * 1e9 / 8
    every = trainer.checkpoint_every_steps
    checkpoints_per_epoch = 1 + (steps_per_epoch / every if every else 0)  # epoch ends + every N steps
    sys_values = (MLFLOW_SYSTEM_METRICS + MLFLOW_SYSTEM_PER_GPU * args.gpus_per_node) / MLFLOW_SYSTEM_INTERVAL_S
    fsdp = params * (2 + 2 + 4) * (args.gpus - 1) / args.gpus  # all-gather bf16 fwd + bwd, reduce-scatter fp32
    plans: dict[str, dict[str, float]] = {}
    for kind in kinds:
        per_gpu = GPU_PEAK_TFLOPS[kind] * 1e12 * args.mfu / (6 * stats.gflops * 1e9)  # views/s per GPU
        views_s = per_gpu * args.gpus
        samples_s = views_s / views
        steps_s = views_s / global_batch
        epoch_s = steps_per_epoch / steps_s
        cpu_cores = samples_s * sample_cpu / args.service_efficiency
        plans[kind] = {"per_gpu": per_gpu, "views_s": views_s, "samples_s": samples_s, "steps_s": steps_s,
                       "epoch_s": epoch_s, "cpu_cores": cpu_cores,
                       "cpu_nodes": math.ceil(max(0.0, cpu_cores - nodes * spare_gpu_node_cpus) / args.cpu_node_cpus),
                       "aug_cores": samples_s * args.augment_cpu_s / args.service_efficiency,
                       "actors_per_gpu": math.ceil(samples_s / args.gpus * args.augment_cpu_s
                                                   / args.service_efficiency),
                       "nvdec_1080p": samples_s / args.gpus * frames_per_sample * stored_w * stored_h / (1920 * 1080),
                       "s3": samples_s * args.clip_bytes * 8 / 1e9}  # fmt: skip
    nvdec_fed = nvdec_actors_per_gpu * args.service_efficiency / args.augment_cpu_s
    store_gpu_node = store(args.gpus_per_node, spare_gpu_node_cpus)
    store_cpu_node = store(0, args.cpu_node_cpus)
    table = [
        ("GPU throughput, per GPU", lambda p: f"{p['per_gpu']:,.0f} views/s"),
        ("global batch / steps per epoch", lambda p: f"{global_batch} views / {steps_per_epoch:,}"),
        ("views/s / samples/s needed", lambda p: f"{p['views_s']:,.0f} / {p['samples_s']:,.0f}"),
        ("optimizer steps/s", lambda p: f"{p['steps_s']:.1f}"),
        ("epoch / all epochs", lambda p: f"{duration(p['epoch_s'])} / {duration(p['epoch_s'] * trainer.epochs)}"),
        ("CPU decode: decoder cores", lambda p: f"{math.ceil(p['cpu_cores']):,}"),
        (f"CPU decode: cpu-workers pods of {args.cpu_node_cpus}", lambda p: f"{p['cpu_nodes']:,}"),
        ("NVDEC: decode per GPU, 1080p eq.", lambda p: f"{p['nvdec_1080p']:,.0f} frames/s"),
        ("NVDEC: augmentation cores" if not on_device else "NVDEC: cropping cores", lambda p: f"{p['aug_cores']:,.0f}"),
        ("NVDEC: actors per GPU needed", lambda p: f"{p['actors_per_gpu']} (set: {nvdec_actors_per_gpu}, "
                                                   f"{nvdec_fed:.0f} samples/s)"),
        ("object store, GPU node", lambda p: gib(store_gpu_node)),
        ("object store, cpu-workers pod", lambda p: gib(store_cpu_node)),
        ("S3 read, all / per GPU node", lambda p: f"{p['s3']:,.1f} / {p['s3'] / nodes:,.1f} Gbit/s"),
        ("checkpoint size", lambda p: f"{mb(ckpt_bytes)}"),
        ("checkpoint upload, 1 node", lambda p: f"{ckpt_bytes / nodes / node_bw:.2f} s ({ckpt_bytes / node_bw:.2f} s)"),
        ("checkpoint every", lambda p: duration(p["epoch_s"] / checkpoints_per_epoch)),
        ("MLflow, train metrics", lambda p: f"{p['steps_s'] / tracking.log_every_steps:.2f} calls/s, "
                                           f"{p['steps_s'] / tracking.log_every_steps * train_metrics:.1f} values/s"),
        ("MLflow, system metrics", lambda p: f"{1 / MLFLOW_SYSTEM_INTERVAL_S:.1f} calls/s, {sys_values:.1f} values/s"),
        ("FSDP2 traffic per GPU", lambda p: f"{fsdp / 1e6:,.0f} MB/step = {fsdp * p['steps_s'] / 1e9:.1f} GB/s"),
    ]
    header = ["quantity"] + [f"{args.gpus} x {k.upper()}" for k in kinds]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, cell in table:
        print("| " + " | ".join([label] + [cell(plans[k]) for k in kinds]) + " |")
    print()
    print("views/s = GPUs x peak x MFU / training FLOP per view; samples/s = views/s / repeated_aug. CPU decode:")
    print("cores = samples/s x (decode + augmentation CPU s) / service efficiency; cpu-workers pods for what the")
    print(f"{spare_gpu_node_cpus:g} spare CPUs of each GPU node leave. NVDEC: ~{frames_per_sample:.0f} frames decoded "
          f"per sample ({views} x ({span:.0f} + GOP/2)) at {stored_w}x{stored_h};")
    print(("the augmentation stays on the decoder actor's CPU" if not on_device else "cutting out the crops stays on the "
           "decoder actor's CPU, resize, flip, RandAugment and erasing run on the GPUs (data.augment.on_device)")
          + ". Object store: trainers x (prefetch + 1) decoded batches")  # fmt: skip
    print("+ CPU decoder actors x tasks in flight x (decoded + encoded batch). S3 read = samples/s x clip bytes.")
    print("Checkpoint upload = size / GPU nodes / S3 per node (through one node in brackets); checkpoints at epoch")
    print(f"ends and every {every} steps. MLflow calls = steps/s / log_every_steps (rank 0). "
          "FSDP2: params x (2 + 2 + 4) B.")

    # ---- what the prod overlay declares
    print()
    overlay = prod_overlay()
    if isinstance(overlay, str):
        print(overlay)
        return
    overrides, groups = overlay
    print("k8s/overlays/prod, RayJob mvit-train (kubectl kustomize k8s/overlays/prod):")
    for g in groups:
        gpus = f", {g['gpus']} GPUs" if g["gpus"] else ""
        print(f"  {g['name']:<17} {g['min']}..{g['max']} pods x {g['cpus']:g} CPUs{gpus}, object store "
              f"{gib(g['object_store'])}")  # fmt: skip
    gpu_group = next((g for g in groups if g["gpus"]), None)
    cpu_group = next((g for g in groups if not g["gpus"]), None)
    if gpu_group is None or cpu_group is None:
        print("  (no GPU or no CPU worker group: nothing to compare)")
        return
    pod_gpus, pod_cpus = gpu_group["gpus"], cpu_group["cpus"]
    pod_spare = max(0.0, gpu_group["cpus"] - pod_gpus * trainer.cpus_per_worker)
    max_gpu_pods = sum(g["max"] for g in groups if g["gpus"])
    max_cpu_pods = sum(g["max"] for g in groups if not g["gpus"])
    cores = max_cpu_pods * pod_cpus + max_gpu_pods * pod_spare
    usable = min(cores, data.decoder.max_actors * data.decoder.num_cpus)
    fed = usable * args.service_efficiency / sample_cpu
    pods = math.ceil(args.gpus / pod_gpus)
    print()
    header = ["declared vs needed", "declared"] + [f"{args.gpus} x {k.upper()}" for k in kinds]
    compare = [
        ("trainer.num_workers (entrypoint)", overrides.get("trainer.num_workers", str(trainer.num_workers)),
         lambda p: f"{args.gpus}"),
        (f"GPU pods of {pod_gpus} GPUs, max", f"{max_gpu_pods}", lambda p: f"{pods}"),
        (f"cpu-workers pods of {pod_cpus:g} CPUs, max", f"{max_cpu_pods}",
         lambda p: f"{math.ceil(max(0.0, p['cpu_cores'] - pods * pod_spare) / pod_cpus):,}"),
        ("decoder.max_actors (CPU decode)", f"{data.decoder.max_actors}", lambda p: f"{math.ceil(p['cpu_cores']):,}"),
        ("CPU decode, samples/s", f"{fed:,.0f} ({usable:g} cores)", lambda p: f"{p['samples_s']:,.0f}"),
        (f"object store, GPU pod of {pod_gpus}", gib(gpu_group["object_store"]),
         lambda p: gib(store(pod_gpus, pod_spare))),
        ("object store, cpu-workers pod", gib(cpu_group["object_store"]), lambda p: gib(store(0, pod_cpus))),
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, declared, cell in compare:
        print("| " + " | ".join([label, declared] + [cell(plans[k]) for k in kinds]) + " |")


if __name__ == "__main__":
    sys.exit(main())
