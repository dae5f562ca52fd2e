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
first batch of each epoch (the actor pool starts per epoch) to the last. A final line measures the
full recipe (RandomResizedCrop, RandAugment m7 n4, random erasing, 2 views per decode) per actor.

    python benchmarks/data.py                 # ~6 min on 2 cores; source videos cached in --workdir
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import tarfile
import time
from pathlib import Path

import av  # noqa: F401  # PyAV before decord (decord's bundled libav breaks PyAV's libvpx otherwise)
import numpy as np
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


def bench_config(root: Path, actors: int, full_recipe: bool = False) -> DataConfig:
    augment = AugmentConfig(
        crop_size=224, mode="jitter", jitter_scales=[256, 320], flip=True, rand_augment=False, random_erasing=0.0,
        repeated_aug=1,
    )  # fmt: skip
    if full_recipe:
        augment = AugmentConfig(crop_size=224, mode="rrc", repeated_aug=2)  # RandAugment m7 n4, erasing 0.25
    return DataConfig(
        root=str(root), batch_size=4, seed=0, prefetch_batches=2, sampling=SAMPLING, augment=augment,
        decoder=DecoderPoolConfig(min_actors=actors, max_actors=actors, num_cpus=1.0, threads=1, tasks_in_flight=2),
    )  # fmt: skip


# ---- the service -----------------------------------------------------------------------------


def run_service(cfg: DataConfig, epochs: int) -> tuple[float, list[tuple[str, int]]]:
    """Steady-state clips/s over ``epochs`` epochs and the (key, epoch) of every clip delivered."""
    from pipeline.data.loader import ShardLoader
    from pipeline.data.service import build_dataset

    loader = ShardLoader(build_dataset(cfg, "train", train=True).iterator(), prefetch_batches=cfg.prefetch_batches)
    clips, seconds, delivered = 0, 0.0, []
    for epoch in range(epochs):
        first = None
        for batch in loader.epoch(epoch):
            delivered += [(key, epoch) for key, view in zip(batch["video_id"], batch["view"].tolist()) if view == 0]
            if first is None:
                first = time.perf_counter()
                continue
            clips += len(batch["video_id"])
        seconds += time.perf_counter() - first
        assert loader.stats.complete and loader.stats.failed == 0, loader.stats
    return clips / seconds, delivered


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
        one, delivered = run_service(bench_config(shards, 1), args.epochs)
        two, _ = run_service(bench_config(shards, 2), args.epochs)
        full, _ = run_service(bench_config(shards, 1, full_recipe=True), 1)
    finally:
        ray.shutdown()
    limit = decord_limit(bench_config(shards, 1), delivered, shard_samples(shards))
    baseline = pytorchvideo_baseline(raw, args.baseline_clips)

    print(f"source videos: {args.videos} x {args.copies} listings, {args.size}, {args.seconds} s, 30 fps; "
          f"shards: short side 320, GOP 16; clip 16x4 @ 30 fps, 224 crop; {os.cpu_count()} cores")  # fmt: skip
    print(f"service, 1 decoder actor          {one:7.2f} clips/s")
    print(f"service, 2 decoder actors         {two:7.2f} clips/s")
    print(f"Decord get_batch tight loop       {limit:7.2f} clips/s (same bytes, sizes, indices; 1 process)")
    print(f"PyTorchVideo on source videos     {baseline:7.2f} clips/s (1 process)")
    print(f"full recipe, 1 actor (2 views)    {full:7.2f} views/s = {full / 2:.2f} decoded clips/s")
    print(f"ratio 1  service per actor / Decord limit        {one / limit:5.2f}   (target >= 0.85)")
    print(f"ratio 2  service per actor / PyTorchVideo         {one / baseline:5.2f}x  (target >= 3)")
    print(f"ratio 3  scaling 1 -> 2 decoder actors            {two / one:5.2f}x  (2 cores shared with reader+consumer)")


if __name__ == "__main__":
    main()
