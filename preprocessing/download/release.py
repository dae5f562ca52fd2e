"""Where the CVDF Kinetics release (github.com/cvdfoundation/kinetics-dataset) keeps each file.

Under the base URL (the public one is `DEFAULT_BASE_URL`), each version has a folder (`400`, `600`,
`700_2020`) holding, per split, `{split}/k{tag}_{split}_path.txt`: the absolute URLs of the split's
`.tar.gz` parts, one a line; and `annotations/`, the split's annotation file. Kinetics-600's train and
val annotations are `.txt` file lists (its `.csv` ones are marked incomplete by CVDF), its test split
a `.csv` without labels. Kinetics-400 also ships `replacement_for_corrupted_k400.tgz`: about 1,400
re-encoded videos that replace corrupted ones of the same name.

These are facts of the release, kept as data so the rest of the downloader has no URL arithmetic of
its own and a mirror (`--base-url`) with the same layout works unchanged.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from core.redact import redact_url

DEFAULT_BASE_URL = "https://s3.amazonaws.com/kinetics"
SPLITS = ("train", "val", "test")
# A part's local name: what its URL's last path segment may keep (CVDF's Kinetics-600 parts are named
# after classes, with spaces and parentheses: "mountain climber (exercise).tar.gz").
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._()+-]")


@dataclass(frozen=True)
class Release:
    """One Kinetics version of the CVDF release.

    `folder`: its folder under the base URL, also the tag of its list names (`k{tag}_{split}_path.txt`).
    `txt_annotations`: splits whose annotation file is a `.txt` file list, not a CSV.
    `replacement`: the archive of replacement videos, relative to the version folder, if any.
    """

    name: str
    folder: str
    txt_annotations: tuple[str, ...] = ()
    replacement: str | None = None

    def part_list_url(self, base_url: str, split: str) -> str:
        return f"{base_url.rstrip('/')}/{self.folder}/{split}/k{self.folder}_{split}_path.txt"

    def annotation_url(self, base_url: str, split: str) -> str:
        suffix = "txt" if split in self.txt_annotations else "csv"
        return f"{base_url.rstrip('/')}/{self.folder}/annotations/{split}.{suffix}"

    def replacement_url(self, base_url: str) -> str | None:
        return f"{base_url.rstrip('/')}/{self.folder}/{self.replacement}" if self.replacement else None


RELEASES = {
    "kinetics400": Release("kinetics400", "400", replacement="replacement_for_corrupted_k400.tgz"),
    "kinetics600": Release("kinetics600", "600", txt_annotations=("train", "val")),
    "kinetics700": Release("kinetics700", "700_2020"),
}


def check_base_url(url: str) -> str:
    """The base URL without a trailing slash; anything but http(s) with a host is a ValueError, before
    any request (a typo must not become a local path or another scheme)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--base-url must be an http:// or https:// URL with a host, got {redact_url(url)!r}")
    return url.rstrip("/")


def parse_part_list(text: str, list_url: str) -> list[str]:
    """The part URLs of a `k*_path.txt`, in order, duplicates dropped.

    Every line must be an http(s) URL of a `.tar.gz` (or `.tgz`): the list decides what is fetched and
    what file names are written, so anything else refuses the whole list in one line rather than being
    fetched. Spaces and other characters CVDF leaves unescaped in its class-named parts are
    percent-encoded (already encoded ones are kept).
    """
    urls: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = urlsplit(line)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{list_url}:{number}: not an http(s) URL: {redact_url(line[:120])!r}")
        if not part_name(line).endswith((".tar.gz", ".tgz")):
            raise ValueError(f"{list_url}:{number}: not a .tar.gz part: {redact_url(line[:120])!r}")
        url = urlunsplit(parts._replace(path=quote(parts.path, safe="/%()+,;=:@!$&'*~")))
        if url not in urls:
            urls.append(url)
    if not urls:
        raise ValueError(f"{list_url}: lists no parts")
    return urls


def part_name(url: str) -> str:
    """A part's local file name: its URL's last path segment, decoded, with spaces and any character
    outside [A-Za-z0-9._()+-] turned into '_' (as CVDF's extractor renames them), never empty or '..'."""
    name = _UNSAFE_NAME.sub("_", posixpath.basename(unquote(urlsplit(url).path)))
    return name if name.strip(".") else "part"


def part_stem(name: str) -> str:
    """`part_0.tar.gz` -> `part_0`: the folder a part is extracted into."""
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
