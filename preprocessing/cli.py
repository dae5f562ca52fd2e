"""`python -m preprocessing` (also installed as `mvit-preprocess`): argument parsing only.

Each subcommand builds the typed configs of the modules that do the work and calls them once.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence

from preprocessing import __version__, imagenet, isolated, kinetics, ssv2, transcode
from preprocessing.parallel import ParallelConfig
from preprocessing.run import SplitJob, run_split
from preprocessing.shards import ShardingConfig
from core.errors import one_line
from core.redact import install_redaction, redact_url, redact_value
from core.s3 import storage_options_for
from core.tar_members import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MEMBER_HEADROOM
from preprocessing.synth import SynthImageNet, SynthKinetics, SynthSsv2, synth_imagenet, synth_kinetics, synth_ssv2
from preprocessing.transcode import ImageEncoder, VideoEncoder
from preprocessing.download import release as download_release, ssv2 as download_ssv2
from preprocessing.download.fetch import FetchConfig
from preprocessing.download.kinetics import DownloadJob, run_download
from preprocessing.verify import verify_split

_OVERVIEW = """\
Turn raw Kinetics, Something-Something v2 (ssv2) or ImageNet into WebDataset tar shards at any fsspec
URL (a local folder, file://..., s3://bucket/prefix), with {split}.manifest.json and {split}.rejects.jsonl
beside them.

Try it end to end on synthetic data (seconds, no download needed):
  python -m preprocessing synth kinetics --out /tmp/k400 --classes 3 --per-class 4
  python -m preprocessing kinetics --csv /tmp/k400/annotations/train.csv --videos /tmp/k400/train --out /tmp/shards
  python -m preprocessing verify /tmp/shards --split train
  python -m preprocessing synth ssv2 --out /tmp/ssv2
  python -m preprocessing ssv2 --root /tmp/ssv2 --split train --out /tmp/ssv2-shards
  python -m preprocessing verify /tmp/ssv2-shards --split train

Run `python -m preprocessing COMMAND --help` for the options of each command.
Rerunning an interrupted command resumes it: finished shards are kept, the rest is redone, and the
result is byte-identical to an uninterrupted run.
"""

_STORAGE_HELP = """\
S3: credentials come only from the environment or the standard AWS config (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_PROFILE / instance roles); set the endpoint of a non-AWS store with
--s3-endpoint-url or AWS_ENDPOINT_URL(_S3)."""

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """'1GB' -> 10**9, '512MiB' -> 512 * 2**20, '250k' -> 250000; '0' or 'none' -> None."""
    if text.strip().lower() in ("0", "none", "off"):
        return None
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1GB, 512MiB, 250000)")
    number, prefix, binary = match.groups()
    power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]. Out-of-range flags are refused while parsing, before
    any input is read (an x264 CRF of 99 would otherwise reject every video one by one)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


_positive_int = _int_in(1)
_non_negative_int = _int_in(0)


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_positive_float.__name__ = "number"
_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                 "placebo")


def _dimensions(text: str) -> tuple[int, int]:
    """'128x96' -> (128, 96); both sides must be positive even numbers (H.264 with yuv420p)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 2 or int(height) < 2 \
            or int(width) % 2 or int(height) % 2:
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT with even sides >= 2, got {text!r}")
    return int(width), int(height)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing", description=_OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_kinetics(commands)
    _add_ssv2(commands)
    _add_imagenet(commands)
    _add_synth(commands)
    _add_verify(commands)
    _add_download(commands)
    return parser


def _command(commands: argparse._SubParsersAction, name: str, summary: str, details: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=summary, description=f"{summary}\n\n{details}", formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _add_kinetics(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands,
        "kinetics",
        "Kinetics-400/600/700 videos -> H.264 MP4 shards (one split per run).",
        "Videos are found by name anywhere below --videos: {youtube_id}_{start:06d}_{end:06d}.mp4|.mkv|.webm\n"
        "(flat train/ val/ test/ folders or per-class folders), or uncut {youtube_id}.* downloads.\n"
        "CSV rows without a video, with an unknown label or malformed times, and videos that do not decode\n"
        "go to {split}.rejects.jsonl. A display-matrix rotation is applied (output stored upright).\n"
        "Transcoding uses PyAV (libx264, in-process; no ffmpeg binary needed).\n\n"
        "example:\n  python -m preprocessing kinetics --csv k400/annotations/train.csv --videos k400/train \\\n"
        "      --out s3://bucket/k400-shards --workers 16\n\n" + _STORAGE_HELP,
    )
    p.add_argument("--csv", required=True, help="annotation CSV of the split (train.csv, validate.csv, val.csv, test.csv)")
    p.add_argument("--videos", required=True, help="folder (or URL) searched recursively for the split's videos")
    p.add_argument("--split", help="output split name (default: the CSV's split column, 'validate' -> 'val')")
    p.add_argument(
        "--classes-from",
        help="CSV whose sorted labels define class indices, or a text file with one label per line "
        "(default: train.csv beside --csv if present, else --csv)",
    )
    p.add_argument("--trim", action="store_true", help="cut uncut {youtube_id}.* downloads to the annotated segment")
    _add_video_encoder_args(p, 320)
    _add_output_args(p, default_shard_bytes="1GB")


def _add_ssv2(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands,
        "ssv2",
        "Something-Something v2 videos -> H.264 MP4 shards (one split per run).",
        f"Reads the release layout below --root: {ssv2.VIDEO_FOLDER}/{{id}}.webm (or the videos in --root\n"
        f"itself) and {ssv2.LABELS_FILE} with something-something-v2-train|validation|test.json\n"
        "(in --root, --root/labels or --root/annotations). A record's class is its template with the brackets\n"
        "removed, looked up in the labels file: the official class indices are kept. The validation split is\n"
        "written as 'val'; the test split (no labels) is written unlabelled (class -1: for prediction only).\n"
        "Records without a video, with an unknown template or malformed, and videos that do not decode go to\n"
        "{split}.rejects.jsonl. VP9 is re-encoded to H.264 like Kinetics (docs/preprocessing.md, \"SSv2\").\n\n"
        "example:\n  python -m preprocessing ssv2 --root /data/ssv2 --split validation --out s3://bucket/ssv2-shards\n\n"
        + _STORAGE_HELP,
    )
    p.add_argument("--root", required=True, help="folder (or URL) of the extracted release")
    p.add_argument("--split", required=True, type=_ssv2_split, metavar="{train,validation,val,test}",
                   help="split to write (output name: train, val, test)")
    p.add_argument("--annotations", help="folder of the four JSON files (default: --root, --root/labels or "
                                         "--root/annotations, the first holding the labels file)")
    p.add_argument("--videos", help=f"folder of the {{id}}.webm files (default: --root/{ssv2.VIDEO_FOLDER} if "
                                    "present, else --root)")
    _add_video_encoder_args(p, 240, ": the release's height, no upscaling")
    _add_output_args(p, default_shard_bytes="1GB")


def _add_video_encoder_args(p: argparse.ArgumentParser, short_side: int, why: str = "") -> None:
    """The H.264 settings and the caps of a video dataset (kinetics, ssv2)."""
    p.add_argument("--short-side", type=_positive_int, default=short_side,
                   help=f"output short side in pixels (default {short_side}{why})")
    p.add_argument("--gop", type=_positive_int, default=16, help="max frames between keyframes (default 16)")
    p.add_argument("--crf", type=_int_in(0, 51), default=23,
                   help="x264 constant rate factor 0-51, lower = better (default 23)")
    p.add_argument("--preset", choices=_X264_PRESETS, default="veryfast", help="x264 preset (default veryfast)")
    _add_limit_args(p, video=True)


def _video_encoder(args: argparse.Namespace) -> VideoEncoder:
    return VideoEncoder(args.short_side, args.gop, args.crf, args.preset, args.max_pixels, args.max_frames, args.max_seconds)


def _ssv2_split(text: str) -> str:
    try:
        return ssv2.release_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_imagenet(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands,
        "imagenet",
        "ImageNet-1k (ILSVRC2012) images -> JPEG shards (one split per run).",
        "Layout: ROOT/train/<wnid>/*.JPEG; ROOT/val/ either flat (labels from LOC_val_solution.csv or the\n"
        "devkit) or in <wnid>/ folders. Class index = position in the sorted wnids. CMYK, grayscale and\n"
        "PNG-named-.JPEG inputs are converted to RGB JPEG; undecodable files are rejected with the reason.\n\n"
        "example:\n  python -m preprocessing imagenet --root ILSVRC/Data/CLS-LOC --split val \\\n"
        "      --synsets LOC_synset_mapping.txt --val-labels LOC_val_solution.csv --out /data/in1k\n\n" + _STORAGE_HELP,
    )
    p.add_argument("--root", required=True, help="folder holding train/ and val/")
    p.add_argument("--split", required=True, help="split folder under --root, also the output split name")
    p.add_argument("--synsets", help=f"{imagenet.SYNSETS_FILE} for label names (default: ROOT/{imagenet.SYNSETS_FILE} if present)")
    p.add_argument("--val-labels", help=f"{imagenet.VAL_SOLUTION_FILE} (default: ROOT/{imagenet.VAL_SOLUTION_FILE} if present)")
    p.add_argument("--devkit", help=f"{imagenet.DEVKIT_DIR} folder (default: ROOT/{imagenet.DEVKIT_DIR} if present)")
    p.add_argument("--max-side", type=_positive_int, default=512, help="longer side bound in pixels (default 512)")
    p.add_argument("--quality", type=_int_in(1, 95), default=90, help="JPEG quality 1-95 (default 90)")
    _add_limit_args(p, video=False)
    _add_output_args(p, default_shard_bytes="256MB")


def _add_limit_args(p: argparse.ArgumentParser, video: bool) -> None:
    g = p.add_argument_group(
        "limits per input",
        "An input over a cap (checked from its header, before decoding) or over the time limit is rejected\n"
        "(in {split}.rejects.jsonl, with the cap and the measured value); the other inputs go on.",
    )
    pixels = transcode.VIDEO_MAX_PIXELS if video else transcode.IMAGE_MAX_PIXELS
    g.add_argument("--max-pixels", type=_positive_int, default=pixels, help=(
        f"reject videos whose frame (width x height) has more pixels (default {pixels} = 4096x4096)" if video else
        f"reject images with more pixels, against decompression bombs (default {pixels}, Pillow's)"))  # fmt: skip
    if video:
        g.add_argument("--max-frames", type=_positive_int, default=transcode.VIDEO_MAX_FRAMES,
                       help="reject videos with more frames, as the container states or as decoded "
                            f"(default {transcode.VIDEO_MAX_FRAMES}: 20 minutes at 60 fps)")
        g.add_argument("--max-seconds", type=_positive_float, default=transcode.VIDEO_MAX_SECONDS,
                       help="reject videos (with --trim: segments) that last longer "
                            f"(default {transcode.VIDEO_MAX_SECONDS:g}: 20 minutes)")
    g.add_argument("--item-timeout", type=_positive_float, default=isolated.DEFAULT_ITEM_TIMEOUT_S, metavar="SECONDS",
                   help="stop and reject an input still encoding after this long "
                        f"(default {isolated.DEFAULT_ITEM_TIMEOUT_S:g})")


def _add_output_args(p: argparse.ArgumentParser, default_shard_bytes: str) -> None:
    g = p.add_argument_group("output, sharding and parallelism")
    g.add_argument("--out", required=True, help="output folder or URL: /dir, file:///dir, s3://bucket/prefix")
    g.add_argument(
        "--shard-bytes",
        type=parse_size,
        default=parse_size(default_shard_bytes),
        help=f"target shard size, estimated before encoding (default {default_shard_bytes}; 0 = no byte bound)",
    )
    g.add_argument("--shard-samples", type=_positive_int, help="max samples per shard (default: no count bound)")
    g.add_argument("--seed", type=int, default=0, help="seed of the shuffle that assigns inputs to shards (default 0)")
    g.add_argument("--workers", type=_positive_int, default=ParallelConfig().workers, help="local processes (default: CPU count)")
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run shards as Ray tasks. ADDRESS: ray://head:10001, host:port, 'auto' (an existing cluster), "
        "'local' (a new private instance); none = Ray's default (RAY_ADDRESS, else the latest cluster "
        "started on this machine, else a new one). On a multi-node cluster --out must be S3 or a shared filesystem",
    )
    g.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL(_S3) env, else AWS)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_synth(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands,
        "synth",
        "Write a small synthetic Kinetics, SSv2 or ImageNet in the real layout, with a learnable class signal.",
        "kinetics: real H.264 (and, with --containers, Matroska / VP8 WebM) videos + annotations/*.csv;\n"
        "  class = shape + motion direction.\n"
        "ssv2: the release layout: VP9 {id}.webm + the four something-something-v2-*.json files; classes are\n"
        "  real SSv2 templates in pairs a horizontal flip swaps (Pushing [something] from left to right / from\n"
        "  right to left; Pulling ...; Turning the camera left / right while filming [something]), told apart\n"
        "  within a pair only by the horizontal direction: learnable with horizontal flip off, not with it on.\n"
        "imagenet: real JPEG train/val trees + LOC_val_solution.csv, LOC_synset_mapping.txt and a devkit;\n"
        "  class = shape + stripe orientation; includes CMYK, grayscale and PNG-named-.JPEG files.\n\n"
        "example:\n  python -m preprocessing synth kinetics --out /tmp/k400 --classes 5 --per-class 8",
    )
    p.add_argument("dataset", choices=["kinetics", "ssv2", "imagenet"])
    p.add_argument("--out", required=True, help="local folder to create")
    p.add_argument("--classes", type=_positive_int, help="number of classes (default 3; ssv2: 2, 4 or 6, default 2)")
    p.add_argument("--per-class", type=_positive_int, help="train inputs per class (default 3; ssv2 6)")
    p.add_argument("--val-per-class", type=_non_negative_int, help="val inputs per class (default 1; ssv2 2)")
    p.add_argument("--corrupt", type=_non_negative_int, default=0, help="train files that do not decode (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    v = p.add_argument_group("kinetics and ssv2")
    v.add_argument("--seconds", type=_positive_int, default=2, help="clip length (default 2)")
    v.add_argument("--fps", type=_positive_int, help="frame rate (default 25; ssv2 12, the release's)")
    v.add_argument("--size", type=_dimensions, help="WIDTHxHEIGHT of the videos (default 128x96; ssv2 96x64)")
    v.add_argument("--missing", type=_non_negative_int, default=0,
                   help="extra train CSV rows / records with no video file (default 0)")
    s = p.add_argument_group("ssv2 only")
    s.add_argument("--test", type=_non_negative_int, default=2,
                   help="videos of the unlabelled test split (default 2)")
    v = p.add_argument_group("kinetics only")
    v.add_argument("--layout", choices=["flat", "per-class"], default="flat", help="video folders (default flat)")
    v.add_argument("--full-videos", action="store_true", help="uncut {youtube_id}.mp4 files (use with kinetics --trim)")
    v.add_argument("--containers", default="mp4", help="comma list cycled over clips: mp4,mkv,webm (default mp4)")
    i = p.add_argument_group("imagenet only")
    i.add_argument("--image-size", type=_positive_int, default=96, help="typical image side (default 96)")
    i.add_argument("--no-quirks", action="store_true", help="leave out the CMYK / grayscale / PNG-named-.JPEG files")
    i.add_argument("--val-layout", choices=["flat", "class-folders"], default="flat", help="val folder (default flat)")


def _add_verify(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands,
        "verify",
        "Check a shard set against its manifest; exit status 1 if anything is wrong.",
        "Checks totals (inputs = written + rejected), each shard's size and sha256, tar structure\n"
        "(safe member names; no sparse, link, device or oversized member; a plain, uncompressed tar;\n"
        "every sample has media + .cls + .json), unique keys, and decodes samples.\n\n"
        "example:\n  python -m preprocessing verify s3://bucket/k400-shards --split train\n\n" + _STORAGE_HELP,
    )
    p.add_argument("url", help="output folder or URL given as --out when the shards were written")
    p.add_argument("--split", required=True, action="append", help="split to check (repeatable)")
    p.add_argument("--decode", type=_non_negative_int, default=1, metavar="N",
                   help="samples decoded per shard (default 1)")
    p.add_argument("--member-headroom", type=_positive_float, default=DEFAULT_MEMBER_HEADROOM, metavar="X",
                   help="largest tar member accepted, as a multiple of its shard's mean sample size "
                        f"(default {DEFAULT_MEMBER_HEADROOM:g}; the data service's data.member_headroom)")
    p.add_argument("--max-member-bytes", type=_positive_int, default=DEFAULT_MAX_MEMBER_BYTES, metavar="BYTES",
                   help=f"largest tar member accepted in any shard (default {DEFAULT_MAX_MEMBER_BYTES}; "
                        "data.max_member_bytes)")
    p.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL(_S3) env)")


def _add_download(commands: argparse._SubParsersAction) -> None:
    p = _command(
        commands,
        "download",
        "Download one split of Kinetics-400/600/700-2020 from the CVDF release (or say how to get SSv2).",
        "Fetches the split's .tar.gz parts listed in {base}/{400|600|700_2020}/{split}/k*_{split}_path.txt in\n"
        "parallel (resumable: a rerun continues half-fetched parts with HTTP range requests and skips finished\n"
        "ones; retries with backoff), extracts each safely (no member outside OUT, no links, no device files:\n"
        "refused and recorded), applies Kinetics-400's replacements for corrupted videos, and writes\n"
        "OUT/annotations/{split}.csv (Kinetics-600's .txt file lists converted). Then:\n"
        "  python -m preprocessing kinetics --csv OUT/annotations/{split}.csv --videos OUT/{split} --out SHARDS\n"
        "ssv2 needs a licence accepted on Qualcomm's site: this prints how to get it and checks OUT if it holds\n"
        "a release (exit status 1 if incomplete).\n\n"
        "example:\n  python -m preprocessing download kinetics400 --split val --out /data/k400",
    )
    p.add_argument("dataset", choices=[*download_release.RELEASES, "ssv2"])
    p.add_argument("--split", choices=download_release.SPLITS, help="split to download (required for Kinetics)")
    p.add_argument("--out", required=True, help="local folder (created; a rerun resumes into it)")
    p.add_argument("--base-url", default=download_release.DEFAULT_BASE_URL,
                   help=f"root of the release or of a mirror with its layout (default {download_release.DEFAULT_BASE_URL})")
    p.add_argument("--jobs", type=_positive_int, default=4, help="parts fetched and extracted at once (default 4)")
    p.add_argument("--keep-archives", action="store_true", help="keep each .tar.gz after extracting it")
    p.add_argument("--retries", type=_positive_int, default=FetchConfig.attempts,
                   help=f"tries in a row without progress before a file fails (default {FetchConfig.attempts})")
    p.add_argument("--backoff", type=_positive_float, default=FetchConfig.backoff_s, metavar="SECONDS",
                   help=f"first wait before a retry, doubled each time up to {FetchConfig.max_backoff_s:g} s "
                        f"(default {FetchConfig.backoff_s:g})")
    p.add_argument("--timeout", type=_positive_float, default=FetchConfig.read_timeout_s, metavar="SECONDS",
                   help=f"longest wait for the next bytes of a response (default {FetchConfig.read_timeout_s:g})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_dataset(args: argparse.Namespace) -> int:
    if args.shard_bytes is None and args.shard_samples is None:  # before any input is read
        raise ValueError("--shard-bytes 0 means no byte bound: give --shard-samples N as well")
    options = storage_options_for(args.out, args.s3_endpoint_url)
    # One endpoint for all inputs (CSVs, label files, media): set if any of them is on S3; non-S3
    # filesystems ignore it.
    inputs = {
        "kinetics": ("csv", "videos", "classes_from"),
        "ssv2": ("root", "annotations", "videos"),
        "imagenet": ("root", "synsets", "val_labels", "devkit"),
    }[args.command]
    input_options: dict = {}
    for url in filter(None, (getattr(args, name) for name in inputs)):
        input_options.update(storage_options_for(url, args.s3_endpoint_url))
    isolated.start()  # the encoder child imports its libraries while the inputs are listed
    if args.command == "kinetics":
        source = kinetics.KineticsSource(args.csv, args.videos, args.classes_from, args.trim)
        discovery = kinetics.discover(source, input_options)
        split = args.split or kinetics.default_split(kinetics.read_annotations(args.csv, input_options), args.csv)
        encoder = _video_encoder(args)
        source_settings = {"trim": args.trim}
    elif args.command == "ssv2":
        ssv2_source = ssv2.Ssv2Source(args.root, args.split, args.annotations, args.videos)
        discovery = ssv2.discover(ssv2_source, input_options)
        split = ssv2_source.output_split
        encoder = _video_encoder(args)
        source_settings = {"release_split": args.split}
    else:
        source = imagenet.ImageNetSource(args.root, args.split, args.synsets, args.val_labels, args.devkit)
        discovery = imagenet.discover(source, input_options)
        split = args.split
        encoder = ImageEncoder(args.max_side, args.quality, args.max_pixels)
        source_settings = {}
    job = SplitJob(
        dataset=args.command,
        split=split,
        out=args.out,
        encoder=encoder,
        sharding=ShardingConfig(args.seed, args.shard_bytes, args.shard_samples),
        storage_options=options,
        input_options=input_options,
        source_settings=source_settings,
        item_timeout=args.item_timeout,
    )
    parallel = ParallelConfig(workers=args.workers, ray_address=args.ray, progress=not args.no_progress)
    report = run_split(job, discovery, parallel)
    print(report.summary(redact_url(args.out)))
    return 0


_SYNTH_DEFAULTS = {  # classes, per_class, val_per_class, fps, size
    "kinetics": (3, 3, 1, 25, (128, 96)),
    "ssv2": (2, 6, 2, 12, (96, 64)),
    "imagenet": (3, 3, 1, None, None),
}


def _run_synth(args: argparse.Namespace) -> int:
    defaults = _SYNTH_DEFAULTS[args.dataset]
    for name, default in zip(("classes", "per_class", "val_per_class", "fps", "size"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.dataset == "ssv2":
        report = synth_ssv2(SynthSsv2(args.out, args.classes, args.per_class, args.val_per_class, args.test, args.size,
                                      args.seconds, args.fps, args.missing, args.corrupt, args.seed))  # fmt: skip
        follow_up = f"python -m preprocessing ssv2 --root {args.out} --split train --out {args.out}-shards"
    elif args.dataset == "kinetics":
        width, height = args.size
        cfg = SynthKinetics(
            args.out, args.classes, args.per_class, args.val_per_class, args.seconds, args.fps, width, height,
            args.layout, args.full_videos, tuple(args.containers.split(",")), args.missing, args.corrupt, args.seed,
        )  # fmt: skip
        report = synth_kinetics(cfg)
        trim = " --trim" if args.full_videos else ""
        follow_up = (
            f"python -m preprocessing kinetics --csv {args.out}/annotations/train.csv --videos {args.out}/train{trim} "
            f"--out {args.out}-shards"
        )
    else:
        cfg = SynthImageNet(
            args.out, args.classes, args.per_class, args.val_per_class, args.image_size, not args.no_quirks, args.corrupt,
            args.val_layout, args.seed,
        )  # fmt: skip
        report = synth_imagenet(cfg)
        follow_up = f"python -m preprocessing imagenet --root {args.out} --split train --out {args.out}-shards"
    print(f"wrote {report.files} {args.dataset} files and {report.labelled_rows} label rows to {report.root}")
    print(f"next: {follow_up}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    if args.member_headroom < 1:  # before any shard is read
        raise ValueError(f"--member-headroom must be >= 1 (a member may be as large as the mean sample), got {args.member_headroom:g}")
    failed = False
    for split in args.split:
        report = verify_split(args.url, split, storage_options_for(args.url, args.s3_endpoint_url), args.decode,
                              args.member_headroom, args.max_member_bytes)  # fmt: skip
        for problem in report.problems:
            print(f"FAIL {split}: {problem}")
        status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
        print(f"{split}: {status}: {report.shards} shards, {report.samples} samples, {report.decoded} decoded")
        failed |= not report.ok
    return 1 if failed else 0


def _run_download(args: argparse.Namespace) -> int:
    if args.dataset == "ssv2":
        print(download_ssv2.instructions(args.out))
        if not download_ssv2.holds_release(args.out):
            return 0
        check = ssv2.check_release(args.out)
        print(check.summary())
        return 0 if check.ok else 1
    if args.split is None:
        raise ValueError(f"download {args.dataset} needs --split (one of {', '.join(download_release.SPLITS)})")
    fetch = FetchConfig(attempts=args.retries, backoff_s=args.backoff, read_timeout_s=args.timeout,
                        max_backoff_s=max(args.backoff, FetchConfig.max_backoff_s))  # fmt: skip
    job = DownloadJob(download_release.RELEASES[args.dataset], args.split, args.out, args.base_url, args.jobs,
                      not args.no_progress, args.keep_archives, fetch)  # fmt: skip
    try:
        report = run_download(job)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume (finished parts and fetched bytes are kept)",
              file=sys.stderr)  # fmt: skip
        return 130
    for line in report.summary():
        print(line)
    if not report.ok:
        print("rerun the same command to retry the failed parts (finished parts are kept)", file=sys.stderr)
        return 1
    print(f"next: python -m preprocessing kinetics --csv {args.out}/annotations/{args.split}.csv "
          f"--videos {args.out}/{args.split} --out SHARDS")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    install_redaction()  # every log record and an uncaught traceback, secrets scrubbed (core.redact)
    run = {"kinetics": _run_dataset, "ssv2": _run_dataset, "imagenet": _run_dataset, "synth": _run_synth,
           "verify": _run_verify, "download": _run_download}[args.command]  # fmt: skip
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as exc:  # bad paths, layouts or CSVs: say what, not where
        print(f"error: {redact_value(str(exc))}", file=sys.stderr)
        return 2
    except _storage_errors() as exc:
        # The store failed even after the retries (storage.s3_client_options), or cannot be used at all
        # (credentials, endpoint). One line, not a traceback from deep inside botocore (that is logged at
        # DEBUG); published shards are complete, so the same command resumes the work.
        logging.getLogger(__name__).debug("storage failure", exc_info=True)
        resume = "; shards already written are complete, rerun the same command to resume"
        print(f"error: storage failure ({one_line(exc)})"
              f"{resume if args.command in ('kinetics', 'ssv2', 'imagenet') else ''}", file=sys.stderr)  # fmt: skip
        return 1


def _storage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the store or the network failed" (not a bug in this tool)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:  # no S3 support installed
        pass
    return tuple(errors)
