"""Transcoding throughput of the preprocessing tool vs a plain PyAV transcode of the same files.

Both sides transcode the same synthetic Kinetics clips with the same settings (short side, GOP,
CRF, preset, one encoder/decoder thread per process) in the same run. The baseline is the bare
decode -> scale -> encode -> write-file loop; the tool additionally discovers inputs, plans shards,
writes tars, hashes, journals and publishes atomically. The printed ratio (tool / baseline, one
process each) measures that overhead; the target is >= 0.8. The baseline's MP4 bytes are
checked to be identical to the tool's samples, which proves the settings really are the same.

    python benchmarks/preprocess.py            # defaults: 24 clips of 3 s, 480x360 at 25 fps, best of 3
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing.kinetics import KineticsSource, discover  # noqa: E402
from preprocessing.parallel import ParallelConfig  # noqa: E402
from preprocessing.run import SplitJob, run_split  # noqa: E402
from preprocessing.shards import ShardingConfig  # noqa: E402
from preprocessing.synth import SynthKinetics, synth_kinetics  # noqa: E402
from preprocessing.transcode import VideoEncoder  # noqa: E402


def plain_pyav_transcode(src: Path, dst: Path, settings: VideoEncoder) -> int:
    """The reference: decode every frame, scale, encode with libx264, write the MP4. Returns frames."""
    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        stream.codec_context.thread_count = 1
        rate = Fraction(stream.average_rate).limit_denominator(1001)
        out = io.BytesIO()
        with av.open(out, mode="w", format="mp4") as container:
            video = container.add_stream("libx264", rate=rate)
            frames = 0
            for frame in inp.decode(stream):
                if frames == 0:
                    scale = settings.short_side / min(frame.width, frame.height)
                    video.width = 2 * round(frame.width * scale / 2)
                    video.height = 2 * round(frame.height * scale / 2)
                    video.pix_fmt = "yuv420p"
                    video.codec_context.time_base = 1 / rate
                    video.codec_context.gop_size = settings.gop
                    video.codec_context.thread_count = 1
                    video.options = {
                        "crf": str(settings.crf),
                        "preset": settings.preset,
                        "x264-params": settings.settings()["x264_params"],
                    }
                small = frame.reformat(video.width, video.height, "yuv420p", interpolation="BICUBIC", threads=1)
                small.pts, small.time_base = frames, video.codec_context.time_base
                container.mux(video.encode(small))
                frames += 1
            container.mux(video.encode(None))
    dst.write_bytes(out.getvalue())
    return frames


def run_baseline(clips: list[Path], out_dir: Path, settings: VideoEncoder) -> tuple[float, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    frames = sum(plain_pyav_transcode(clip, out_dir / f"{clip.stem}.mp4", settings) for clip in clips)
    return time.perf_counter() - started, frames


def run_tool(raw: Path, out_dir: Path, settings: VideoEncoder, workers: int, clips_per_shard: int) -> float:
    """The tool's own code path, as `python -m preprocessing kinetics` runs it (discovery included)."""
    started = time.perf_counter()
    found = discover(KineticsSource(str(raw / "annotations" / "train.csv"), str(raw / "train")))
    job = SplitJob("kinetics", "train", str(out_dir), settings, ShardingConfig(shard_samples=clips_per_shard))
    report = run_split(job, found, ParallelConfig(workers=workers, progress=False))
    assert report.manifest.num_rejected == 0
    return time.perf_counter() - started


def tool_payloads(out_dir: Path) -> dict[str, bytes]:
    payloads = {}
    for shard in sorted(out_dir.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mp4"):
                    payloads[member.name[: -len(".mp4")]] = tar.extractfile(member).read()
    return payloads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--size", default="480x360", help="source WIDTHxHEIGHT")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings per side")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    settings = VideoEncoder()  # the tool's defaults: short side 320, GOP 16, CRF 23, veryfast

    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp:
        root = Path(tmp)
        synth = SynthKinetics(str(root / "raw"), classes=3, per_class=-(-args.clips // 3), val_per_class=0,
                              seconds=args.seconds, fps=25, width=width, height=height)  # fmt: skip
        synth_kinetics(synth)
        clips = sorted((root / "raw" / "train").iterdir())
        per_shard = -(-len(clips) // 2)  # two shards, as a multi-shard run writes them
        baseline_s, tool_s, frames = float("inf"), float("inf"), 0
        for attempt in range(args.repeats):  # interleaved, so background load hits both sides alike
            seconds, frames = run_baseline(clips, root / f"baseline{attempt}", settings)
            baseline_s = min(baseline_s, seconds)
            tool_s = min(tool_s, run_tool(root / "raw", root / f"tool{attempt}", settings, 1, per_shard))

        reference = {p.stem: p.read_bytes() for p in (root / "baseline0").iterdir()}
        outputs = {f"baseline{a}": {p.stem: p.read_bytes() for p in (root / f"baseline{a}").iterdir()} for a in range(args.repeats)}
        outputs.update({f"tool{a}": tool_payloads(root / f"tool{a}") for a in range(args.repeats)})
        differing = {name: sorted(k for k in reference if got.get(k) != reference[k]) for name, got in outputs.items()}
        differing = {name: keys for name, keys in differing.items() if keys}
        identical = not differing

    n = len(clips)
    print(
        f"preprocessing benchmark: {n} clips x {args.seconds} s, {width}x{height} @ 25 fps ({frames} source frames) "
        f"-> H.264 short side {settings.short_side}, GOP {settings.gop}, CRF {settings.crf}, {settings.preset}, "
        f"1 codec thread per process, best of {args.repeats}"
    )
    rows = [("plain PyAV transcode, 1 process", baseline_s), ("tool (the CLI's code path), --workers 1", tool_s)]
    for label, seconds in rows:
        print(f"  {label:<44} {n / seconds:6.2f} videos/s  {frames / seconds:8.1f} source frames/s")
    print(f"  outputs byte-identical to the plain transcode: {'yes' if identical else 'NO'}")
    print(f"ratio tool/plain PyAV (1 process each): {baseline_s / tool_s:.2f} (target >= 0.8)")
    if not identical:
        print(f"differing clips: {differing}")
        sys.exit("the tool's samples differ from the plain transcode: the comparison is not like for like")


if __name__ == "__main__":
    main()
