"""Check a shard set against its manifest: totals, sizes, sha256, key digests, tar structure, decodable samples.

Each shard is read once, as a stream: the bytes feed the sha256 and Python's tarfile reader at the
same time, so verifying a remote set costs one download of it and no local copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any

import av
from PIL import Image

from core.manifest import (
    UNLABELED,
    Manifest,
    ShardInfo,
    check_split,
    format_digest,
    keys_digest,
    load_manifest,
    rejects_name,
)
from core.errors import credentials_hint, is_client_error
from core.redact import redact_url
from core.tar_members import (
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_MEMBER_HEADROOM,
    ShardFormatError,
    ShardTruncatedError,
    iter_members,
    member_cap,
)
from core.storage import Store

_MEDIA = {"video": "mp4", "image": "jpg"}
_META_FIELDS = {
    "video": {"label", "source_id", "segment", "trimmed", "start_in_source", "fps", "frames", "width", "height",
              "duration"},
    "image": {"label", "source_id", "width", "height"},
}
# Shard sets written before `trimmed` / `start_in_source` existed still verify.
_LEGACY_META_FIELDS = {"video": _META_FIELDS["video"] - {"trimmed", "start_in_source"}}


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    decoded: int = 0
    unlabeled: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_split(
    url: str, split: str, storage_options: dict[str, Any] | None = None, decode_per_shard: int = 1,
    member_headroom: float = DEFAULT_MEMBER_HEADROOM, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> VerifyReport:
    """All problems found in one split; `decode_per_shard` samples of each shard are decoded.

    Shards are read by the data service's own bounded reader (``core.tar_members``) with the same
    per-member cap (``member_headroom`` x the shard's mean sample, at most ``max_member_bytes``), so what
    verify passes the service reads, and a crafted member costs verify no more memory than it does a
    training job.

    A store that cannot be used at all (no credentials, an endpoint that refuses connections) raises
    OSError naming the URL and the cause: that is no finding about the shard set, and the CLI reports
    it as its one `error:` line, as for every other command.
    """
    report = VerifyReport()
    store = Store(url, dict(storage_options or {}))
    try:
        manifest = load_manifest(url, check_split(split), storage_options)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        report.problems.append(f"manifest unreadable: {type(exc).__name__}: {exc}")
        return report
    except Exception as exc:  # noqa: BLE001 - storage unusable (no credentials, endpoint down): name the URL
        if not (isinstance(exc, OSError) or is_client_error(exc)):
            raise
        raise OSError(f"manifest unreadable at {redact_url(url)}: {type(exc).__name__}: "
                      f"{' '.join(str(exc).split())}{credentials_hint(exc)}") from exc
    _check_totals(manifest, report)
    _check_rejects(store, manifest, report)
    seen_keys: set[str] = set()
    for shard in manifest.shards:
        report.shards += 1
        size = store.size(shard.name)
        if size is None:
            report.problems.append(f"{shard.name}: missing")
            continue
        if size != shard.bytes:
            report.problems.append(f"{shard.name}: {size} bytes, manifest says {shard.bytes}")
        cap = member_cap(shard.bytes, shard.samples, member_headroom, max_member_bytes)
        _check_shard(store, manifest, shard, cap, seen_keys, decode_per_shard, report)
    if manifest.num_unlabeled is not None and report.unlabeled != manifest.num_unlabeled:
        report.problems.append(f"{report.unlabeled} unlabelled samples (class {UNLABELED}), manifest says "
                               f"{manifest.num_unlabeled}")
    return report


def _check_totals(m: Manifest, report: VerifyReport) -> None:
    if m.num_inputs != m.num_samples + m.num_rejected:
        report.problems.append(f"num_inputs {m.num_inputs} != num_samples {m.num_samples} + num_rejected {m.num_rejected}")
    if sum(s.samples for s in m.shards) != m.num_samples:
        report.problems.append("shard sample counts do not add up to num_samples")
    if sum(s.bytes for s in m.shards) != m.total_bytes:
        report.problems.append("shard sizes do not add up to total_bytes")
    expected = [f"{m.split}-{i:06d}.tar" for i in range(len(m.shards))]
    if [s.name for s in m.shards] != expected:
        report.problems.append("shard names are not contiguous {split}-000000.tar ...")


def _check_rejects(store: Store, m: Manifest, report: VerifyReport) -> None:
    try:
        lines = store.read_bytes(rejects_name(m.split)).decode("utf-8").splitlines()
    except FileNotFoundError:
        report.problems.append(f"{rejects_name(m.split)}: missing")
        return
    if len(lines) != m.num_rejected:
        report.problems.append(f"{rejects_name(m.split)}: {len(lines)} lines, manifest says {m.num_rejected} rejected")
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            assert isinstance(entry["source"], str) and isinstance(entry["reason"], str)
        except (ValueError, KeyError, TypeError, AssertionError):
            report.problems.append(f"{rejects_name(m.split)}:{number}: not a {{source, reason}} object")


def _check_shard(
    store: Store, m: Manifest, shard: ShardInfo, cap: int, seen_keys: set[str], decode_budget: int,
    report: VerifyReport,
) -> None:
    name, media = shard.name, _MEDIA[m.modality]
    groups: dict[str, dict[str, bytes]] = {}

    def keep(member_name: str) -> bool:
        """Media of samples that will not be decoded is skipped, not held in memory."""
        key, _, ext = member_name.partition(".")
        position = list(groups).index(key) if key in groups else len(groups)
        return ext != media or position < decode_budget

    with store.open_read(name) as raw:
        reader = _HashingReader(raw)
        try:
            for member in iter_members(reader, cap, keep):
                problem = member.problem or _name_problem(member.name)
                if problem:
                    report.problems.append(f"{name}: {problem}")
                    continue
                key, _, ext = member.name.partition(".")
                groups.setdefault(key, {})[ext] = member.data if member.data is not None else b""
        except ShardTruncatedError as exc:  # a cut member that was read is a finding already
            if f"{name}: {exc}" not in report.problems:
                report.problems.append(f"{name}: {exc}")
        except (tarfile.TarError, ShardFormatError, EOFError, OSError) as exc:
            report.problems.append(f"{name}: unreadable tar: {type(exc).__name__}: {exc}")
        reader.drain()
    if reader.digest.hexdigest() != shard.sha256:
        report.problems.append(f"{name}: sha256 {reader.digest.hexdigest()} != manifest {shard.sha256}")
    if len(groups) != shard.samples:
        report.problems.append(f"{name}: {len(groups)} samples, manifest says {shard.samples}")
    # The data service checks each epoch against these digests, so a wrong one must show up here
    # first (as the shard's keys differing from the manifest), not as a failed training epoch.
    found = format_digest(keys_digest(groups))
    if shard.key_digest is not None and found != shard.key_digest:
        report.problems.append(f"{name}: key digest {found} != manifest {shard.key_digest}: "
                               "the shard's sample keys are not the ones the manifest records")
    for position, (key, parts) in enumerate(groups.items()):
        report.samples += 1
        if key in seen_keys:
            report.problems.append(f"{name}: key {key!r} also in an earlier shard")
        seen_keys.add(key)
        report.unlabeled += parts.get("cls", b"").strip() == str(UNLABELED).encode()
        problem = _sample_problem(m, parts, media, decode=position < decode_budget)
        if problem:
            report.problems.append(f"{name}/{key}: {problem}")
        elif position < decode_budget:
            report.decoded += 1


def _name_problem(name: str) -> str | None:
    """Member types and sizes are ``core.tar_members``'s rules; names are checked here."""
    if name.startswith("/") or "/" in name or ".." in name:
        return f"unsafe member name {name!r}"
    if name.count(".") != 1:
        return f"member {name!r} is not {{key}}.{{ext}}"
    return None


def placement_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a video's `trimmed` / `start_in_source`, which tell a reader where the
    annotated segment lies in the stored video (None if fine, or if the sample predates them)."""
    if "trimmed" not in meta:
        return None
    trimmed, start = meta["trimmed"], meta["start_in_source"]
    if isinstance(trimmed, bool) and isinstance(start, (int, float)) and not isinstance(start, bool) and start >= 0:
        return None
    return f"metadata trimmed={trimmed!r} / start_in_source={start!r}: expected true/false and a time >= 0"


def _sample_problem(m: Manifest, parts: dict[str, bytes], media: str, decode: bool) -> str | None:
    if set(parts) != {media, "cls", "json"}:
        return f"has {sorted(parts)}, expected {sorted({media, 'cls', 'json'})}"
    try:
        label_index = int(parts["cls"].decode("ascii"))
        meta = json.loads(parts["json"].decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return f"bad cls/json: {exc}"
    if not -1 <= label_index < len(m.classes):
        return f"class index {label_index} out of range"
    if label_index >= 0 and meta.get("label") != m.classes[label_index]:
        return f"label {meta.get('label')!r} does not match class {label_index} ({m.classes[label_index]!r})"
    if set(meta) not in (_META_FIELDS[m.modality], _LEGACY_META_FIELDS.get(m.modality)):
        return f"metadata fields {sorted(meta)} != {sorted(_META_FIELDS[m.modality])}"
    placement = placement_problem(meta)
    if placement:
        return placement
    if not decode:
        return None
    try:
        size, frames = _decode(parts[media], m.modality)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        return f"does not decode: {type(exc).__name__}: {exc}"
    if size != (meta["width"], meta["height"]):
        return f"decoded size {size} != metadata {(meta['width'], meta['height'])}"
    if m.modality == "video" and frames != meta["frames"]:
        return f"decoded {frames} frames, metadata says {meta['frames']}"
    return None


def _decode(data: bytes, modality: str) -> tuple[tuple[int, int], int]:
    """((width, height), frame count) of a fully decoded sample."""
    if modality == "image":
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size, 1
    with av.open(io.BytesIO(data)) as container:
        frames = [(f.width, f.height) for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no frames")
    return frames[0], len(frames)


class _HashingReader(io.RawIOBase):
    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self._source = source
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Hash whatever the tar reader did not consume (end-of-archive padding, or garbage)."""
        while self.read(8 << 20):
            pass
