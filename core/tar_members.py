"""A shard's tar members read within bounds: the one reader the data service and ``verify`` share.

Shards are plain tar files that ``preprocessing`` writes with regular ``{key}.{ext}`` members, so anything
else in one was crafted or damaged, and must not cost more than the bytes it really holds. webdataset's
``tar_file_iterator`` (which this replaces for reading) opens with ``mode="r|*"``, so a gzip, bzip2 or
xz stream is inflated on the fly (4.6 MB of gzip made a 1 GiB member), reads every member whole
whatever size its header claims (a 10 KB GNU-sparse member claiming 1 GiB made a 1 GiB buffer), and
skips links and devices without a word. Here:

- the stream must be a plain tar: a compressed one is refused by its magic bytes before any header is
  parsed (``ShardFormatError``);
- a member's header decides before its data is read: sparse, link, device, FIFO and directory members
  are refused, and so is a regular member claiming more than ``cap`` bytes; a refused member's data is
  skipped as a stream (read and dropped in small blocks), never held;
- a member whose data ends before the size its header claims is refused by name, and the reading
  stops there (``ShardTruncatedError``, also when the cut member was one the caller skipped): nothing
  after it can be trusted;
- tar's own extended headers (pax records, GNU long names) are held in memory by ``tarfile`` while it
  parses them: the stream refuses to hand more than ``cap`` bytes past the end of the previous member's
  data, so a header cannot claim a gigabyte either.

The cap is per shard: its manifest's mean bytes per sample times a headroom, at most an absolute
ceiling (``member_cap``); both knobs are settings of the data service and flags of ``verify``.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

DEFAULT_MAX_MEMBER_BYTES = 256 << 20  # no transcoded clip or resized image comes near it
DEFAULT_MEMBER_HEADROOM = 16.0  # x the shard's mean sample: above the spread of real clip and image sizes
_HEADER_SLACK = 1 << 16  # tar headers between two members' data: pax records and long names of real shards
# Magic bytes of the compressions tarfile's "r|*" would inflate (and zstd, which newer Pythons add).
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


class ShardFormatError(ValueError):
    """The shard is not a plain tar, or a header claims more than the cap: nothing in it is read."""


class ShardTruncatedError(ValueError):
    """A member's data ends before its header's size: the reading stopped at that member."""


@dataclass(frozen=True)
class Member:
    """One tar member: ``data`` when it was read, ``problem`` when it was refused (its data skipped).
    ``data`` is None without a problem for a member the caller chose not to keep."""

    name: str
    data: bytes | None
    problem: str | None = None


def member_cap(shard_bytes: int, samples: int, headroom: float = DEFAULT_MEMBER_HEADROOM,
               ceiling: int = DEFAULT_MAX_MEMBER_BYTES) -> int:  # fmt: skip
    """The largest member a shard of ``shard_bytes`` holding ``samples`` samples may have.

    A sample's members together are one sample, so a member above ``headroom`` x the mean sample is an
    outlier no real shard set has (the mean includes the member itself: a one-sample shard's cap is at
    least its whole size); ``ceiling`` bounds what any shard may claim, whatever its manifest says.
    """
    if headroom < 1 or ceiling < 1:
        raise ValueError(f"member headroom must be >= 1 and the ceiling >= 1 byte (got {headroom}, {ceiling})")
    mean = shard_bytes / max(samples, 1)
    return max(1, int(min(ceiling, headroom * mean)))


def member_problem(info: tarfile.TarInfo, cap: int) -> str | None:
    """Why a member is refused from its header alone (None: it may be read)."""
    if info.issparse():
        return f"member {info.name!r} is sparse (it would expand to {info.size} bytes): shards hold plain members"
    if not info.isreg():
        kind = ("a hard link" if info.islnk() else "a symbolic link" if info.issym() else "a device"
                if info.ischr() or info.isblk() else "a FIFO" if info.isfifo() else "a directory" if info.isdir()
                else "not a regular file")  # fmt: skip
        return f"member {info.name!r} is {kind}: shards hold regular files only"
    if info.size > cap:
        return f"member {info.name!r} claims {info.size} bytes, over the cap of {cap} for this shard"
    return None


def iter_members(fileobj: IO[bytes], cap: int, keep: Callable[[str], bool] = lambda name: True) -> Iterator[Member]:
    """The members of the plain tar stream ``fileobj``, in order, each read (at most ``cap`` bytes) or
    refused with its reason. ``keep(name)`` False skips a member's data without reading it into memory.
    Raises ``ShardFormatError`` for a compressed stream or an oversized header, ``tarfile.TarError`` for
    a damaged one, and ``ShardTruncatedError`` (after yielding the cut member, refused) for a cut one."""
    stream = _BoundedStream(fileobj, cap + _HEADER_SLACK)
    head = stream.peek(512)
    for magic, name in _COMPRESSED:
        if head.startswith(magic):
            raise ShardFormatError(f"the shard is {name}-compressed: shards are plain tar files "
                                   "(a compressed stream would be inflated without bound)")  # fmt: skip
    tar = tarfile.open(fileobj=stream, mode="r|")
    last: tarfile.TarInfo | None = None
    members = iter(tar)
    try:
        while True:
            try:
                info = next(members)
            except StopIteration:
                break
            except tarfile.ReadError:  # skipping a member the caller did not keep ran off the end
                if last is not None and stream.pos < last.offset_data + last.size:
                    raise ShardTruncatedError(_cut(last)) from None
                raise
            last = info
            # Next, tarfile skips this member's data (to its padded end) and parses the next header:
            # the header may take cap + slack bytes past that point, no more.
            stream.limit = info.offset_data + _padded(info.size) + cap + _HEADER_SLACK
            problem = member_problem(info, cap)
            if problem is not None:
                yield Member(info.name, None, problem)
                continue
            if not keep(info.name):
                yield Member(info.name, None)
                continue
            reader = tar.extractfile(info)
            assert reader is not None  # a regular member always has a reader
            try:
                data = reader.read()
            except tarfile.ReadError:  # tarfile's "unexpected end of data"
                problem = _cut(info)
                yield Member(info.name, None, problem)
                raise ShardTruncatedError(problem) from None
            yield Member(info.name, data)
            tar.members = []  # a stream has no index to keep: members seen so far are not held
        if last is not None and stream.pos < last.offset_data + last.size:  # a skipped member was cut
            raise ShardTruncatedError(_cut(last))
    finally:
        tar.close()


def _cut(info: tarfile.TarInfo) -> str:
    return f"member {info.name!r} claims {info.size} bytes but the shard ends before them"


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class _BoundedStream(io.RawIOBase):
    """``fileobj`` read forward, refusing to go past ``limit`` bytes from its start; ``peek`` looks at
    the first bytes without consuming them."""

    def __init__(self, fileobj: IO[bytes], limit: int) -> None:
        super().__init__()
        self.upstream, self.limit, self.pos, self.held = fileobj, limit, 0, b""

    def readable(self) -> bool:
        return True

    def peek(self, size: int) -> bytes:
        while len(self.held) < size:
            more = self.upstream.read(size - len(self.held))
            if not more:
                break
            self.held += more
        return self.held[:size]

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("a shard is read in bounded pieces")
        if self.pos + size > self.limit:
            size = max(0, self.limit - self.pos)
            if size == 0:
                raise ShardFormatError(f"a tar header at byte {self.pos} claims more than the cap allows")
        if self.held:
            data, self.held = self.held[:size], self.held[size:]
            if len(data) < size:
                data += self.upstream.read(size - len(data))
        else:
            data = self.upstream.read(size)
        self.pos += len(data)
        return data
