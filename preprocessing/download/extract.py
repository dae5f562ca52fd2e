"""One `.tar.gz` part -> one folder, safely and all or nothing.

An archive from the network decides names and file types, so each member is judged before anything is
written: a name that is absolute or climbs out with `..`, a symbolic or hard link, a device file or a
fifo is refused, recorded with its reason, and skipped, while the part's other members are extracted
(one bad member must not cost a part of thousands of videos). Python's tarfile `data` filter (PEP 706)
then checks every accepted member again as it is written (it also drops set-uid bits and owners).
macOS resource-fork files (`._name`, found in some of CVDF's Kinetics-600 parts) are skipped as well:
they are not videos, yet carry video suffixes.

The part is extracted into a staging folder outside the video tree (on the same filesystem) and
renamed into place once complete, so a killed run leaves either the whole part or nothing under the
destination, and `preprocessing kinetics` never sees half a part; a rerun starts the staging afresh.
A truncated or corrupt archive raises `ArchiveError` with nothing left behind.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field


class ArchiveError(Exception):
    """The archive cannot be read to its end (truncated, not gzip, not tar). One line."""


@dataclass(frozen=True)
class Refused:
    """A member that was not extracted, and why."""

    name: str
    reason: str


@dataclass
class Extracted:
    """`files`: regular files written; `refused`: members skipped, with their reasons."""

    files: int = 0
    refused: list[Refused] = field(default_factory=list)


def refusal(member: tarfile.TarInfo) -> str | None:
    """Why `member` must not be extracted, or None. The checks that do not need the destination."""
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "path with '..' (would leave the output folder)"
    if member.issym():
        return f"symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "fifo"
    if not (member.isfile() or member.isdir()):
        return f"unsupported member type {member.type!r}"
    if os.path.basename(name.rstrip("/")).startswith("._"):
        return "macOS resource-fork file (AppleDouble), not a video"
    return None


def extract_part(archive: str, destination: str, staging: str) -> Extracted:
    """Extract `archive` into the folder `destination` (which must not exist yet) through the folder
    `staging` (removed first if a killed run left it), see the module docstring. Raises ArchiveError
    (and leaves neither folder) if the archive is unreadable."""
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    result = Extracted()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                reason = refusal(member)
                if reason is None:
                    try:
                        tar.extract(member, staging, filter="data")
                    except tarfile.FilterError as exc:
                        reason = f"refused by the tar data filter: {exc}"
                if reason is not None:
                    result.refused.append(Refused(member.name, reason))
                elif member.isfile():
                    result.files += 1
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and not _is_archive_error(exc):
            raise  # a disk problem of ours (full, read-only), not the archive's
        raise ArchiveError(f"{os.path.basename(archive)} is truncated or corrupt "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None  # fmt: skip
    os.replace(staging, destination)
    return result


def _is_archive_error(exc: OSError) -> bool:
    """gzip's BadGzipFile is an OSError, as are the errors of writing (ENOSPC, EROFS: those have an errno
    and are ours, not the archive's)."""
    return isinstance(exc, gzip.BadGzipFile) or exc.errno is None

