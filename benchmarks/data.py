"""Throughput of the data-loading service, measured against two references in one run.

1. The limit: Decord ``get_batch`` in a tight loop in one process, on the same encoded bytes, at the
   same decode size and frame indices the service used for each delivered clip. Ratio = service
   clips/s per decoder actor / limit clips/s (target >= 0.85).
2. The baseline users would otherwise run: a PyTorchVideo loader (``pytorchvideo.data.Kinetics`` +
   random clip sampler, PyAV decoding) on the original, unpreprocessed source videos (720p, 30 fps,
   long GOP, like YouTube downloads), with the same sampling and spatial transforms, in one process.
   Ratio = service clips/s per decoder actor / baseline clips/s per process (target >= 3).
3. Scaling: service clips/s with 2 decoder actors / with 1.

Both service runs use the MViT-B 16x4 sampling (16 frames, stride 4 at 30 fps) with short-side
jitter [256, 320] (applied at decode time), random 224 crop and flip, one view per decoded clip,
so one clip = one decode on every side. Service throughput is steady state: counted from the
first batch of each epoch (the actor pool starts per epoch) to the last.

4. The full recipe (RandomResizedCrop, flip, RandAugment m7 n4, random erasing 0.25, 2 views per
   decode cut from one clip, ``augment.clips_per_sample`` 1 as in PySlowFast) per actor, twice:
   augmentation in the actor, and ``augment.on_device`` (the actor cuts each view's box out of the
   decoded frames and sends the crops with their flips and drawn ops and boxes; ``device_augment``
   resizes, flips and augments them on the training device). Ratio =
   decoded clips/s (views/s / 2) / the decode-only clips/s (target >= 0.9 on the device). A second
   decode-only reference with 2 views per decode (jitter crop and flip, no RandAugment or erasing) does
   the same decoding and shows what the augmentation itself costs; a fifth run gives each of the 2
   views a clip of its own (``clips_per_sample`` 2, this project's recipe before the setting existed),
   which reads two clips' frames per decode. The five run interleaved, one epoch each, for
   ``--rounds`` rounds; medians are reported, so a load that changes during the run moves all alike.

   This machine has no GPU: its "device" is the consumer's CPU, which shares the 2 cores with the actor,
   so the device's share (``render_on_device``, ``augment_on_device``) is not run inside the timed loop (a GPU would run it beside the actors, not
   on their cores); it is timed on the consumer afterwards, on the first batches the service delivered,
   and reported apart, per view and as the CPU share it would take at the measured rate.

    python benchmarks/data.py                 # ~12 min on 2 cores; source videos cached in --workdir
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import tarfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import av  # noqa: F401  # PyAV before decord (decord's bundled libav breaks PyAV's libvpx otherwise)
import numpy as np
import psutil
import torch


from pipeline.data.config import AugmentConfig, DataConfig, DecoderPoolConfig, SamplingConfig
from pipeline.data.decode import load_decord, view_rng
from pipeline.data.sampling import train_clip, train_view
from preprocessing.cli import main as preprocess

SAMPLING = SamplingConfig(num_frames=16, stride=4, target_fps=30)


# ---- data ------------------------------------------------------------------------------------


def prepare(workdir: Path, videos: int, copies: int, seconds: int, size: str) -> tuple[Path, Path]:
    """Source videos (``videos`` unique clips, each hard-linked ``copies`` times under new ids, so
    there are videos x copies distinct samples) and their shards (short side 320, GOP 16). Cached:
    an existing workdir is reused."""
    raw, shards = workdir / "raw", workdir / "shards"
    listing = raw / "annotations" / "train.csv"
    if not listing.exists():
        preprocess(["synth", "kinetics", "--out", str(raw), "--classes", str(videos), "--per-class", "1",
                    "--val-per-class", "0", "--seconds", str(seconds), "--fps", "30", "--size", size])  # fmt: skip
    header, *body = list(csv.reader(open(listing)))
    if len(body) == videos:
        extra = []
        for copy in range(1, copies):
            for row in body:
                new_id = f"{row[1][:8]}c{copy:02d}"
                os.link(raw / "train" / f"{row[1]}_{int(row[2]):06d}_{int(row[3]):06d}.mp4",
                        raw / "train" / f"{new_id}_{int(row[2]):06d}_{int(row[3]):06d}.mp4")  # fmt: skip
                extra.append([row[0], new_id, *row[2:]])
        with open(listing, "w", newline="") as f:
            csv.writer(f).writerows([header, *body, *extra])
    if not (shards / "train.manifest.json").exists():
        preprocess(["kinetics", "--csv", str(raw / "annotations" / "train.csv"), "--videos", str(raw / "train"),
                    "--out", str(shards), "--shard-samples", "8", "--workers", "2", "--no-progress"])  # fmt: skip
    return raw, shards


def bench_config(root: Path, actors: int, full_recipe: bool = False, on_device: bool = False,
                 views: int = 1, clips: int = 1) -> DataConfig:  # fmt: skip
    augment = AugmentConfig(
        crop_size=224, mode="jitter", jitter_scales=[256, 320], flip=True, rand_augment=False, random_erasing=0.0,
        repeated_aug=views, on_device=False,
    )  # fmt: skip
    if full_recipe:  # RandAugment m7 n4, erasing 0.25
        augment = AugmentConfig(crop_size=224, mode="rrc", repeated_aug=2, clips_per_sample=clips, on_device=on_device)
    return DataConfig(
        root=str(root), batch_size=4, seed=0, prefetch_batches=2, sampling=SAMPLING, augment=augment,
        decoder=DecoderPoolConfig(min_actors=actors, max_actors=actors, num_cpus=1.0, threads=1, tasks_in_flight=2),
    )  # fmt: skip


# ---- the service -----------------------------------------------------------------------------


class Rate(NamedTuple):
    """Rows (views) delivered per second of wall time, and per CPU second the decoder actors and their
    decode processes spent meanwhile: what one actor delivers with a core to itself, however busy the
    machine is (this one is shared)."""

    wall: float
    cpu: float


def decoder_cpu() -> dict[tuple[int, float], float]:
    """CPU seconds so far of every decoder actor process of this driver's Ray instance and of its decode
    zygote and children (reaped children included, in their parent's figure), by (pid, start time)."""
    seconds = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if "(Decoder)" not in " ".join(proc.cmdline()):
                continue
            for member in [proc, *proc.children(recursive=True)]:
                t = member.cpu_times()
                seconds[(member.pid, member.create_time())] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:  # ended while being read: its time is not counted
            continue
    return seconds


class DecoderCpu:
    """CPU seconds, from ``start`` on, of the decoder processes that were running at ``start`` (the actor
    delivering the batches and its decode processes), read by a thread every ``interval`` seconds: an
    actor that Ray Data tears down once the last batch is out (before the consumer has it) still counts
    up to its last reading. Processes that start later are left out: a Decoder actor Ray starts meanwhile
    (one does, mid-epoch) spends its seconds importing, not on these batches."""

    def __init__(self, interval: float = 0.25) -> None:
        self._base: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._thread.start()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._last.update(decoder_cpu())

    def start(self) -> None:
        self._base = decoder_cpu()
        self._last.update(self._base)

    def seconds(self) -> float:
        self._stop.set()
        self._thread.join()
        self._last.update(decoder_cpu())
        return sum(self._last[key] - before for key, before in self._base.items())


def run_service(cfg: DataConfig, epochs: int, keep: int = 0) -> tuple[Rate, list[tuple[str, int]], list[dict]]:
    """Steady-state throughput over ``epochs`` epochs, counted from each epoch's first batch to its last;
    the (key, epoch) of every clip delivered and the first ``keep`` batches."""
    from pipeline.data.loader import ShardLoader
    from pipeline.data.service import build_dataset

    loader = ShardLoader(build_dataset(cfg, "train", train=True).iterator(), prefetch_batches=cfg.prefetch_batches)
    clips, seconds, cpu, delivered, kept = 0, 0.0, 0.0, [], []
    for epoch in range(epochs):
        first, meter = None, DecoderCpu()
        for batch in loader.epoch(epoch):
            delivered += [(key, epoch) for key, view in zip(batch["video_id"], batch["view"].tolist()) if view == 0]
            if len(kept) < keep:
                kept.append(batch)
            if first is None:
                first = time.perf_counter()
                meter.start()
                continue
            clips += len(batch["video_id"])
        seconds += time.perf_counter() - first
        cpu += meter.seconds()
        assert loader.stats.complete and loader.stats.failed == 0, loader.stats
    return Rate(clips / seconds, clips / cpu), delivered, kept


def full_recipe_rounds(shards: Path, rounds: int) -> tuple[dict[str, Rate], list[float], list[dict]]:
    """Views per wall and per decoder CPU second for each recipe (medians over ``rounds``), the per-round
    ratios on-device decoded clips / decode-only clips per CPU second, and the first batches delivered
    with ``augment.on_device``."""
    recipes = {
        "decode only": bench_config(shards, 1),
        "decode only, 2 views": bench_config(shards, 1, views=2),
        "in the actor": bench_config(shards, 1, full_recipe=True),
        "on the device": bench_config(shards, 1, full_recipe=True, on_device=True),
        "on the device, a clip per view": bench_config(shards, 1, full_recipe=True, on_device=True, clips=2),
    }
    rates: dict[str, list[Rate]] = {name: [] for name in recipes}
    kept: list[dict] = []
    for _ in range(rounds):
        for name, cfg in recipes.items():
            rate, _, batches = run_service(cfg, 1, keep=0 if kept or name != "on the device" else 8)
            rates[name].append(rate)
            kept += batches
    ratios = [device.cpu / 2 / alone.cpu for device, alone in zip(rates["on the device"], rates["decode only"])]
    medians = {name: Rate(statistics.median(r.wall for r in rs), statistics.median(r.cpu for r in rs))
               for name, rs in rates.items()}  # fmt: skip
    return medians, ratios, kept


def time_device_augment(batches: list[dict], cfg: DataConfig) -> tuple[float, float]:
    """Seconds per view of what the training step does with ``augment.on_device`` on this process's CPU (1
    thread), over ``batches`` as the service delivered them: ``render_on_device`` (resize and flip the
    crops) and ``augment_on_device`` (RandAugment, erasing); best of 3 passes each."""
    from pipeline.data.device_augment import DeviceAugmentParams, augment_on_device, render_on_device

    views = sum(len(b["video_id"]) for b in batches)
    assert views and all("erase" in b for b in batches)
    size, frames = cfg.augment.crop_size, cfg.sampling.num_frames
    rendered = [render_on_device(b["video"], b["flip"], size, frames) for b in batches]
    best_render = best_augment = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for b in batches:
            render_on_device(b["video"], b["flip"], size, frames)
        middle = time.perf_counter()
        for b, video in zip(batches, rendered):
            params = DeviceAugmentParams(b["rand_augment"], b["erase"], cfg.augment.mean, cfg.augment.std)
            augment_on_device(video, params)
        best_render = min(best_render, middle - start)
        best_augment = min(best_augment, time.perf_counter() - middle)
    return best_render / views, best_augment / views


# ---- the limit: Decord alone on the same bytes and indices -----------------------------------


def shard_samples(root: Path) -> dict[str, tuple[bytes, int, int]]:
    samples = {}
    for path in sorted(root.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            import json

            for member in tar.getmembers():
                if member.name.endswith(".mp4"):
                    key = member.name[:-4]
                    meta = json.loads(tar.extractfile(f"{key}.json").read())
                    samples[key] = (tar.extractfile(member).read(), meta["width"], meta["height"])
    return samples


def decord_limit(cfg: DataConfig, delivered: list[tuple[str, int]], samples: dict) -> float:
    """The decode calls the service made for these clips (same size, same indices), back to back."""
    decord = load_decord()
    calls = []
    for key, epoch in delivered:
        data, width, height = samples[key]
        spec = train_view(view_rng(cfg.seed, epoch, key, 0), width, height, cfg.augment)
        size = (max(2, round(width * spec.scale)), max(2, round(height * spec.scale)))
        calls.append((data, size, view_rng(cfg.seed, epoch, key, 0, stream=1)))
    start = time.perf_counter()
    for data, (width, height), rng in calls:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
        indices = train_clip(rng, len(reader), float(reader.get_avg_fps()), cfg.sampling)
        reader.get_batch(np.unique(indices).tolist()).asnumpy()
    return len(calls) / (time.perf_counter() - start)


# ---- the baseline: PyTorchVideo on the source videos ------------------------------------------


class BaselineTransform:
    """What a PyTorchVideo user writes for the same recipe: UniformTemporalSubsample(16),
    RandomShortSideScale(256, 320), RandomCrop(224), RandomHorizontalFlip, uint8 out.
    (pytorchvideo.transforms itself no longer imports with current torchvision, so the same ops are
    written here with torch.)"""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, sample: dict) -> dict:
        video = sample["video"]  # (C, T, H, W) float, every decoded frame of the clip window
        t = video.shape[1]
        video = video[:, torch.linspace(0, t - 1, SAMPLING.num_frames).round().long()]
        short = int(self.rng.integers(256, 321))
        h, w = video.shape[-2:]
        size = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
        video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", align_corners=False, antialias=True)
        y, x = int(self.rng.integers(0, size[0] - 224 + 1)), int(self.rng.integers(0, size[1] - 224 + 1))
        video = video[..., y : y + 224, x : x + 224]
        if self.rng.random() < 0.5:
            video = video.flip(-1)
        return {"video": video.round().clamp(0, 255).to(torch.uint8), "label": sample["label"]}


def pytorchvideo_baseline(raw: Path, clips: int) -> float:
    from pytorchvideo.data import Kinetics, make_clip_sampler

    listing = raw / "pytorchvideo_train.txt"
    rows = list(csv.reader(open(raw / "annotations" / "train.csv")))[1:]
    labels = {label: i for i, label in enumerate(sorted({r[0] for r in rows}))}
    with open(listing, "w") as f:
        for r in rows:
            f.write(f"{raw / 'train' / f'{r[1]}_{int(r[2]):06d}_{int(r[3]):06d}.mp4'} {labels[r[0]]}\n")
    duration = SAMPLING.num_frames * SAMPLING.stride / SAMPLING.target_fps
    dataset = Kinetics(
        data_path=str(listing), clip_sampler=make_clip_sampler("random", duration),
        video_sampler=torch.utils.data.RandomSampler, transform=BaselineTransform(0), decode_audio=False,
        decoder="pyav",
    )  # fmt: skip
    torch.manual_seed(0)

    def samples():  # one random clip per video per pass, passes repeated as a DataLoader's epochs are
        while True:
            yield from dataset

    iterator = samples()
    next(iterator)  # warm-up (imports, first open)
    start = time.perf_counter()
    for _ in range(clips):
        sample = next(iterator)
        assert sample["video"].shape == (3, 16, 224, 224)
    return clips / (time.perf_counter() - start)


# ---- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/mvit-data-bench", help="cache of source videos and shards")
    parser.add_argument("--videos", type=int, default=8, help="unique source videos")
    parser.add_argument("--copies", type=int, default=8, help="times each is listed (distinct samples)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--size", default="1280x720", help="source WIDTHxHEIGHT")
    parser.add_argument("--epochs", type=int, default=3, help="service epochs per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the full-recipe comparison")
    parser.add_argument("--baseline-clips", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)

    raw, shards = prepare(Path(args.workdir), args.videos, args.copies, args.seconds, args.size)
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    from core.loopback import keep_ray_on_loopback

    keep_ray_on_loopback()
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             object_store_memory=1 << 30, log_to_driver=False)  # fmt: skip
    try:
        one, delivered, _ = run_service(bench_config(shards, 1), args.epochs)
        two, _, _ = run_service(bench_config(shards, 2), args.epochs)
        one, two = one.wall, two.wall
        rates, ratios, kept = full_recipe_rounds(shards, args.rounds)
    finally:
        ray.shutdown()
    render_s, augment_s = time_device_augment(kept, bench_config(shards, 1, full_recipe=True, on_device=True))
    limit = decord_limit(bench_config(shards, 1), delivered, shard_samples(shards))
    baseline = pytorchvideo_baseline(raw, args.baseline_clips)

    print(f"source videos: {args.videos} x {args.copies} listings, {args.size}, {args.seconds} s, 30 fps; "
          f"shards: short side 320, GOP 16; clip 16x4 @ 30 fps, 224 crop; {os.cpu_count()} cores")  # fmt: skip
    print(f"service, 1 decoder actor          {one:7.2f} clips/s")
    print(f"service, 2 decoder actors         {two:7.2f} clips/s")
    print(f"Decord get_batch tight loop       {limit:7.2f} clips/s (same bytes, sizes, indices; 1 process)")
    print(f"PyTorchVideo on source videos     {baseline:7.2f} clips/s (1 process)")
    full, device, alone, two_views, own_clips = (rates[k] for k in (
        "in the actor", "on the device", "decode only", "decode only, 2 views", "on the device, a clip per view"))
    print(f"1 actor, {args.rounds} interleaved rounds of 1 epoch each, medians; views/s, and views per CPU second "
          "of the decoder processes:")  # fmt: skip
    for name, label in [("decode only", "decode only (1 view per decode)"),
                        ("decode only, 2 views", "decode only, 2 views per decode"),
                        ("in the actor", "full recipe, augmentation in the actor"),
                        ("on the device", "full recipe, augmentation on the device"),
                        ("on the device, a clip per view", "the same, each view its own clip")]:  # fmt: skip
        views = 1 if name == "decode only" else 2
        print(f"  {label:<40} {rates[name].wall:6.2f} views/s, {rates[name].cpu:6.2f} per CPU-s "
              f"= {rates[name].cpu / views:5.2f} decoded clips per CPU-s")  # fmt: skip
    print(f"  on the consumer's CPU (1 thread): render_on_device {render_s * 1e3:.1f} ms/view, "
          f"augment_on_device {augment_s * 1e3:.1f} ms/view")
    print(f"ratio 1  service per actor / Decord limit        {one / limit:5.2f}   (target >= 0.85)")
    print(f"ratio 2  service per actor / PyTorchVideo         {one / baseline:5.2f}x  (target >= 3)")
    print(f"ratio 3  scaling 1 -> 2 decoder actors            {two / one:5.2f}x  (2 cores shared with reader+consumer)")
    print(f"ratio 4  full recipe decoded clips / decode only, per CPU-s: in the actor {full.cpu / 2 / alone.cpu:5.2f}, "
          f"on the device {device.cpu / 2 / alone.cpu:5.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"wall: {full.wall / 2 / alone.wall:.2f}, {device.wall / 2 / alone.wall:.2f})   (target >= 0.9 on the device)")
    print(f"ratio 5  full recipe / decode only, both 2 views per decode, per CPU-s: in the actor "
          f"{full.cpu / two_views.cpu:5.2f}, on the device {device.cpu / two_views.cpu:5.2f} (wall: "
          f"{full.wall / two_views.wall:.2f}, {device.wall / two_views.wall:.2f})")
    print(f"ratio 6  full recipe on the device, a clip per view (clips_per_sample 2) / decode only, per CPU-s: "
          f"{own_clips.cpu / 2 / alone.cpu:5.2f} (wall: {own_clips.wall / 2 / alone.wall:.2f})")


if __name__ == "__main__":
    main()
