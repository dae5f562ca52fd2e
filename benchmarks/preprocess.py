"""Transcoding throughput of the preprocessing tool vs plain PyAV and the plain ffmpeg CLI.

All sides transcode the same synthetic Kinetics clips with the same settings (short side, GOP, CRF,
preset, x264 params, one decoder/scaler/encoder thread, audio dropped) in one run, interleaved (the
order rotates every repeat) so that load from other jobs on the machine hits every side alike:

- plain PyAV: the bare decode -> scale -> encode -> write-file loop, in this process;
- plain ffmpeg CLI: one `ffmpeg` process per clip writing an MP4 file (the binary from --ffmpeg, else
  the `imageio-ffmpeg` package's static build (`pip install .[bench]`), else `ffmpeg` on PATH);
- the tool with `--shard-samples` (two shards, nothing estimated): discovery, planning, tar writing,
  hashing, journal and atomic publication on top of the transcode;
- the tool as the CLI runs by default (`--shard-bytes 1GB`): the same, plus the size estimate that
  encodes the first 8 videos before planning; their outputs go into the shards as they are, so no
  video is encoded twice and the estimate costs next to nothing.

It prints videos/s, source frames/s and CPU seconds per video for each side, then the throughput
ratios (best of N each, with the range of the same ratio within single repeats); the target for the
tool is >= 0.8. Ratios are given by wall-clock and by CPU time (this process + its children): on a
shared machine the wall-clock swings with other jobs' load much more than CPU time does, and the
ffmpeg CLI (>= 7) runs demuxing, decoding, filtering and encoding in separate threads, so it can use
an idle second core that a production run, one worker per core, does not have. It also checks that the comparison is like for like: the tool's samples must be
byte-identical to the plain PyAV files, and the ffmpeg files must carry the same x264 option string
(x264 writes all its settings into the stream), size and frame count as the tool's.

    python benchmarks/preprocess.py            # 24 clips of 3 s, 480x360 at 25 fps, best of 5 (~1.5 min)
    python benchmarks/preprocess.py --clips 12 --seconds 10 --size 640x360 --repeats 3   # Kinetics-length clips
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
from av.video.frame import PictureType


from preprocessing import cli
from preprocessing.kinetics import KineticsSource, discover
from preprocessing.parallel import ParallelConfig
from preprocessing.run import CALIBRATION_INPUTS, SplitJob, run_split
from preprocessing.shards import ShardingConfig
from preprocessing.synth import SynthKinetics, synth_kinetics
from preprocessing.transcode import VideoEncoder

_X264_OPTIONS = re.compile(rb"x264 - core (\d+)[^\x00]*?options: ([^\x00]*)")


# ---- the sides -------------------------------------------------------------------------------


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
                # As the ffmpeg CLI does: x264 picks the frame types, not the source's encoder.
                small.pict_type = PictureType.NONE
                container.mux(video.encode(small))
                frames += 1
            container.mux(video.encode(None))
    dst.write_bytes(out.getvalue())
    return frames


def ffmpeg_command(ffmpeg: str, src: Path, dst: Path, settings: VideoEncoder) -> list[str]:
    """The plain ffmpeg CLI transcode with the tool's settings.

    Matches `VideoEncoder`: libx264 with the same preset, CRF, x264 params and GOP (`-g`; the tool
    sets nothing else about keyframes, so keyint_min and scenecut stay at the same libx264 defaults
    in both, which the x264 option-string check confirms), short side scaled bicubic with the other
    side following the aspect ratio rounded to even (`-2`), yuv420p, every frame kept once at its
    timestamp (`-fps_mode passthrough`, ffmpeg >= 5.1), audio/subtitles/data dropped, one thread for
    the decoder, the filter graph and the encoder. Rotation is applied by ffmpeg's default autorotate,
    as the tool does.
    """
    s = settings.short_side
    scale = f"scale=w='if(lte(iw,ih),{s},-2)':h='if(lte(iw,ih),-2,{s})':flags=bicubic"
    return [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error",
        "-threads", "1", "-i", str(src),
        "-map", "0:v:0", "-an", "-sn", "-dn",
        "-filter_threads", "1", "-vf", scale, "-fps_mode", "passthrough",
        "-c:v", "libx264", "-preset", settings.preset, "-crf", str(settings.crf), "-g", str(settings.gop),
        "-x264-params", settings.settings()["x264_params"], "-pix_fmt", "yuv420p", "-threads", "1",
        "-f", "mp4", "-y", str(dst),
    ]  # fmt: skip


def run_pyav(clips: list[Path], out_dir: Path, settings: VideoEncoder) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    return sum(plain_pyav_transcode(clip, out_dir / f"{clip.stem}.mp4", settings) for clip in clips)


def run_ffmpeg(ffmpeg: str, clips: list[Path], out_dir: Path, settings: VideoEncoder) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for clip in clips:
        subprocess.run(ffmpeg_command(ffmpeg, clip, out_dir / f"{clip.stem}.mp4", settings), check=True)


def run_tool(raw: Path, out_dir: Path, settings: VideoEncoder, workers: int, clips_per_shard: int) -> None:
    """The tool's own code path, as `python -m preprocessing kinetics --shard-samples N` runs it."""
    found = discover(KineticsSource(str(raw / "annotations" / "train.csv"), str(raw / "train")))
    job = SplitJob("kinetics", "train", str(out_dir), settings, ShardingConfig(shard_samples=clips_per_shard))
    report = run_split(job, found, ParallelConfig(workers=workers, progress=False))
    assert report.manifest.num_rejected == 0


def run_tool_cli_defaults(raw: Path, out_dir: Path) -> None:
    """`python -m preprocessing kinetics` with its default sharding (--shard-bytes 1GB, so output
    sizes are first estimated by encoding a few videos) and encoder settings, one worker."""
    argv = ["kinetics", "--csv", str(raw / "annotations" / "train.csv"), "--videos", str(raw / "train"),
            "--out", str(out_dir), "--workers", "1", "--no-progress"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # its one-line summary
        status = cli.main(argv)
    assert status == 0, f"the CLI failed with status {status}"


# ---- timing ----------------------------------------------------------------------------------


@dataclass
class Side:
    label: str
    run: Callable[[Path], object]
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ffmpeg runs as children)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(side: Side, out_dir: Path) -> None:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    side.run(out_dir)
    side.seconds.append(time.perf_counter() - wall)
    side.cpu_seconds.append(_cpu_seconds() - cpu)


# ---- checks ----------------------------------------------------------------------------------


def tool_payloads(out_dir: Path) -> dict[str, bytes]:
    payloads = {}
    for shard in sorted(out_dir.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mp4"):
                    payloads[member.name[: -len(".mp4")]] = tar.extractfile(member).read()
    return payloads


def files(out_dir: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in out_dir.iterdir()}


def x264_options(data: bytes) -> tuple[str, str] | None:
    """(x264 core version, option string) that x264 writes into every stream it encodes."""
    match = _X264_OPTIONS.search(data)
    return (match.group(1).decode(), match.group(2).decode()) if match else None


def stream_shape(data: bytes) -> tuple[int, int, int]:
    """(width, height, decoded frames) of an MP4."""
    with av.open(io.BytesIO(data)) as container:
        frames = [(f.width, f.height) for f in container.decode(video=0)]
    return (*frames[0], len(frames))


def find_ffmpeg(explicit: str | None) -> tuple[str | None, str]:
    """(path, where it came from) of an ffmpeg binary with libx264, or (None, why not)."""
    candidates: list[tuple[str, str]] = []
    if explicit:
        candidates.append((explicit, "--ffmpeg"))
    else:
        try:
            import imageio_ffmpeg

            candidates.append((imageio_ffmpeg.get_ffmpeg_exe(), f"imageio-ffmpeg {imageio_ffmpeg.__version__}"))
        except (ImportError, RuntimeError):
            pass
        on_path = shutil.which("ffmpeg")
        if on_path:
            candidates.append((on_path, "PATH"))
    if not candidates:
        return None, "no ffmpeg found (pass --ffmpeg PATH, or `pip install .[bench]` for imageio-ffmpeg's static build)"
    problems = []
    for path, origin in candidates:
        try:
            encoders = subprocess.run([path, "-hide_banner", "-encoders"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            problems.append(f"{path} ({origin}) does not run: {exc}")
            continue
        if not re.search(r"^\s*V\S*\s+libx264\s", encoders, re.MULTILINE):
            problems.append(f"{path} ({origin}) has no libx264 encoder")
            continue
        version = subprocess.run([path, "-hide_banner", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
        return path, f"{origin}: {path} ({version.split(' Copyright')[0]})"
    return None, "; ".join(problems)


# ---- report ----------------------------------------------------------------------------------


def _ratio(side: Side, other: Side) -> str:
    """Throughput of `side` / throughput of `other`, by wall-clock and by CPU time: best of N each, and
    the range of the ratio within single repeats (the two ran back to back, under the same load)."""
    cells = []
    for mine, theirs in ((side.seconds, other.seconds), (side.cpu_seconds, other.cpu_seconds)):
        per_repeat = [b / a for a, b in zip(mine, theirs)]
        cells.append(f"{min(theirs) / min(mine):5.2f} [{min(per_repeat):.2f}-{max(per_repeat):.2f}]")
    return "   ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--size", default="480x360", help="source WIDTHxHEIGHT")
    parser.add_argument("--repeats", type=int, default=5, help="best of N timings per side, interleaved")
    parser.add_argument("--ffmpeg", help="ffmpeg binary (default: imageio-ffmpeg's, else ffmpeg on PATH)")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    settings = VideoEncoder()  # the tool's defaults: short side 320, GOP 16, CRF 23, veryfast
    ffmpeg, ffmpeg_note = find_ffmpeg(args.ffmpeg)
    logging.basicConfig(level=logging.WARNING)  # keeps the CLI's INFO lines out of the table

    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp:
        root = Path(tmp)
        synth = SynthKinetics(str(root / "raw"), classes=3, per_class=-(-args.clips // 3), val_per_class=0,
                              seconds=args.seconds, fps=25, width=width, height=height)  # fmt: skip
        synth_kinetics(synth)
        clips = sorted((root / "raw" / "train").iterdir())
        n = len(clips)
        per_shard = -(-n // 2)  # two shards, as a multi-shard run writes them
        calibration = min(CALIBRATION_INPUTS["video"], n)
        source_frames: list[int] = []
        pyav = Side("plain PyAV transcode, 1 process", lambda out: source_frames.append(run_pyav(clips, out, settings)))
        tool = Side(f"tool, --shard-samples {per_shard} --workers 1",
                    lambda out: run_tool(root / "raw", out, settings, 1, per_shard))  # fmt: skip
        tool_default = Side("tool, CLI defaults (--shard-bytes 1GB) --workers 1",
                            lambda out: run_tool_cli_defaults(root / "raw", out))  # fmt: skip
        sides = [pyav, tool, tool_default]
        ffmpeg_side = None
        if ffmpeg:
            ffmpeg_side = Side("plain ffmpeg CLI, 1 process per clip", lambda out: run_ffmpeg(ffmpeg, clips, out, settings))
            sides.insert(1, ffmpeg_side)
        for attempt in range(args.repeats):
            shift = attempt % len(sides)  # rotate the order: no side always runs first or after another
            for side in sides[shift:] + sides[:shift]:
                _timed(side, root / f"{sides.index(side)}-{attempt}")

        reference = files(root / "0-0")
        outputs = {f"pyav{a}": files(root / f"0-{a}") for a in range(args.repeats)}
        for name, side in (("tool", tool), ("tool-default", tool_default)):
            outputs.update({f"{name}{a}": tool_payloads(root / f"{sides.index(side)}-{a}") for a in range(args.repeats)})
        differing = {name: sorted(k for k in reference if got.get(k) != reference[k]) for name, got in outputs.items()}
        differing = {name: keys for name, keys in differing.items() if keys}
        ffmpeg_check = _compare_ffmpeg(reference, files(root / f"{sides.index(ffmpeg_side)}-0")) if ffmpeg_side else None

    frames = source_frames[0]
    print(
        f"preprocessing benchmark: {n} clips x {args.seconds} s, {width}x{height} @ 25 fps ({frames} source frames) "
        f"-> H.264 short side {settings.short_side}, GOP {settings.gop}, CRF {settings.crf}, {settings.preset}, "
        f"x264 {settings.settings()['x264_params']}, 1 codec thread, audio dropped; "
        f"{len(sides)} sides interleaved, best of {args.repeats}"
    )
    print(f"ffmpeg: {ffmpeg_note}" if ffmpeg else f"ffmpeg: NOT AVAILABLE, PyAV comparison only ({ffmpeg_note})")
    print(f"  {'best of ' + str(args.repeats):<52} {'videos/s':>8} {'source frames/s':>16} {'CPU s/video':>12}")
    for side in sides:
        print(f"  {side.label:<52} {n / side.best:8.2f} {frames / side.best:16.1f} {min(side.cpu_seconds) / n:12.4f}")
    print(f"  (the CLI defaults estimate shard sizes by encoding {calibration} of the {n} videos first, "
          "then reuse those outputs in the shards)")  # fmt: skip
    print(f"check: tool samples byte-identical to the plain PyAV files: {'NO' if differing else 'yes'}")
    if ffmpeg_check:
        print(f"check: ffmpeg files vs the tool's: {ffmpeg_check}")
    print("throughput ratios (target for the tool >= 0.8); best of N [range within single repeats]")
    print(f"  {'':<38} {'by wall-clock':<19} by CPU time (videos per CPU-second)")
    print(f"  {'tool / plain PyAV':<38} {_ratio(tool, pyav)}")
    if ffmpeg_side:
        print(f"  {'tool / plain ffmpeg CLI':<38} {_ratio(tool, ffmpeg_side)}")
        print(f"  {'plain PyAV / plain ffmpeg CLI':<38} {_ratio(pyav, ffmpeg_side)}")
        print(f"  {'tool CLI defaults / plain ffmpeg CLI':<38} {_ratio(tool_default, ffmpeg_side)}")
    print(f"  {'tool CLI defaults / plain PyAV':<38} {_ratio(tool_default, pyav)}")
    if not ffmpeg_side:
        print("  (no ffmpeg CLI comparison: no usable ffmpeg binary, see above)")
    if differing:
        print(f"differing clips: {differing}")
        sys.exit("the tool's samples differ from the plain transcode: the comparison is not like for like")
    if ffmpeg_check and not ffmpeg_check.startswith("same"):
        sys.exit("the ffmpeg CLI did not encode with the tool's settings: the comparison is not like for like")


def _compare_ffmpeg(tool_files: dict[str, bytes], ffmpeg_files: dict[str, bytes]) -> str:
    """'same ...' when every ffmpeg file has the tool's x264 settings, picture size and frame count."""
    problems = []
    for key, data in tool_files.items():
        theirs = ffmpeg_files.get(key)
        if theirs is None:
            problems.append(f"{key}: missing")
        elif x264_options(theirs) != x264_options(data):
            problems.append(f"{key}: x264 {x264_options(theirs)} != tool's {x264_options(data)}")
        elif stream_shape(theirs) != stream_shape(data):
            problems.append(f"{key}: (width, height, frames) {stream_shape(theirs)} != tool's {stream_shape(data)}")
    if problems:
        return "DIFFERENT SETTINGS: " + "; ".join(problems[:3])
    core = x264_options(next(iter(tool_files.values())))
    size = sum(map(len, ffmpeg_files.values())) / sum(map(len, tool_files.values()))
    return (f"same x264 core {core[0] if core else '?'} and option string, size and frame count in all {len(tool_files)}; "
            f"bytes ffmpeg/tool {size:.3f} (not identical: this ffmpeg's libswscale, another version than PyAV's, rounds some chroma samples differently)")  # fmt: skip


if __name__ == "__main__":
    main()
