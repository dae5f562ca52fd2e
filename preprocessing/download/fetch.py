"""One URL -> one local file, surviving what large downloads meet: dropped connections, 5xx answers,
a killed process.

Bytes go to `{path}.part`; a rerun (or a retry after a dropped connection) continues it with an HTTP
Range request, so nothing already on disk is fetched twice. The file gets its final name (an atomic
rename) only once its size matches what the server announced (Content-Length, or the total of a
Content-Range), so a file under its final name is complete. A server that ignores Range (200 instead
of 206) gets the file restarted from zero, never appended to.

Transient failures (no connection, a connection dropped mid-body, a read timeout, 429 and 5xx) are
retried with exponential backoff; the count restarts whenever a try made progress, so a large file on
a flaky link finishes as long as bytes keep coming. Other HTTP errors (404, 403, ...) fail at once:
retrying cannot fix them. Every request has a connect and a read timeout, so nothing waits forever.
`requests` does the HTTP; urllib3's own retries are not used because they cannot resume a body that
broke halfway, which is the failure that matters here.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from core.redact import redact_url

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$")
_CHUNK = 1 << 16  # what a kill or a dropped connection can lose of a try: at most this much is refetched


class FetchError(Exception):
    """A URL that could not be fetched: a permanent HTTP error, or transient ones beyond the retries.
    The message is one line, with any credentials in the URL redacted."""


class _Transient(Exception):
    """A failure worth retrying (a 5xx or 429 answer, a size mismatch)."""


@dataclass(frozen=True)
class FetchConfig:
    """`attempts`: tries in a row without progress before giving up. `backoff_s` doubles after each
    failed try up to `max_backoff_s` (tests make it tiny). `connect_timeout_s` / `read_timeout_s`: per
    request, the read timeout being the longest wait for the next bytes."""

    attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


@dataclass(frozen=True)
class Fetched:
    """`path`: the complete file; `size`: its bytes; `resumed_from`: bytes already on disk when this
    call started (0 for a fresh download, the size for a file that was already complete)."""

    path: str
    size: int
    resumed_from: int


def fetch(
    session: requests.Session,
    url: str,
    path: str,
    config: FetchConfig,
    progress: Callable[[int], None] | None = None,
    announce_total: Callable[[int], None] | None = None,
) -> Fetched:
    """Download `url` to `path` (see the module docstring). A complete `path` is kept as it is.

    `progress(n)` is called with each chunk's byte count; `announce_total(n)` once with the bytes still
    to come, when the server has said how many (for a progress bar's total)."""
    if os.path.isfile(path):
        size = os.path.getsize(path)
        return Fetched(path, size, size)
    partial = f"{path}.part"
    started_with = os.path.getsize(partial) if os.path.isfile(partial) else 0
    announced: list[int] = []

    def announce_once(remaining: int) -> None:  # a retry must not grow a progress bar's total again
        if announce_total is not None and not announced:
            announced.append(remaining)
            announce_total(remaining)

    failures = 0
    while True:
        before = os.path.getsize(partial) if os.path.isfile(partial) else 0
        try:
            total = _fetch_once(session, url, partial, config, progress, announce_once)
            os.replace(partial, path)
            return Fetched(path, total, started_with)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _Transient) as exc:  # fmt: skip
            after = os.path.getsize(partial) if os.path.isfile(partial) else 0
            failures = 1 if after > before else failures + 1
            if failures >= config.attempts:
                raise FetchError(f"{redact_url(url)}: gave up after {failures} tries in a row without progress "
                                 f"({_describe(exc)})") from None  # fmt: skip
            delay = min(config.backoff_s * 2 ** (failures - 1), config.max_backoff_s)
            log.info("download: %s: %s; retrying in %.2f s", redact_url(url), _describe(exc), delay)
            time.sleep(delay)


def _fetch_once(
    session: requests.Session,
    url: str,
    partial: str,
    config: FetchConfig,
    progress: Callable[[int], None] | None,
    announce_total: Callable[[int], None],
) -> int:
    """One GET, continuing `partial` where it ends; returns the file's total size once it is complete."""
    have = os.path.getsize(partial) if os.path.isfile(partial) else 0
    headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else {"Accept-Encoding": "identity"}
    timeout = (config.connect_timeout_s, config.read_timeout_s)
    with session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as response:
        status = response.status_code
        if status == 416 and have:
            done = _UNSATISFIED_RANGE.match(response.headers.get("Content-Range", ""))
            if done and int(done[1]) == have:
                return have  # the previous run stopped after the last byte, before the rename
            os.remove(partial)  # bigger than the file the server has: start again
            raise _Transient(f"range {have}- not satisfiable; restarting the file")
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}")
        if status not in (200, 206):
            raise FetchError(f"{redact_url(url)}: HTTP {status} {response.reason or ''}".rstrip())
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match[1]) != have:
                raise FetchError(f"{redact_url(url)}: the server answered a range request with "
                                 f"Content-Range {response.headers.get('Content-Range')!r} (wanted from byte {have})")
            total = int(match[3]) if match[3] != "*" else None
            mode = "ab"
        else:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            have, mode = 0, "wb"  # no range honoured: the body is the whole file
        if total is not None:
            announce_total(total - have)
        with open(partial, mode) as out:
            for chunk in response.iter_content(_CHUNK):
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
    size = os.path.getsize(partial)
    if total is not None and size != total:
        raise _Transient(f"got {size} of {total} bytes")
    return size


def _describe(exc: BaseException) -> str:
    """A short, credential-free description of a transient failure (requests' texts can be long)."""
    if isinstance(exc, _Transient):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {redact_url(text)[:200]}"
