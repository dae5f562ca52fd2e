"""Every byte the tool reads or writes goes through here, via fsspec, so any URL works.

Output objects appear at their final name only when complete:
- local disk: write a temporary file on the same filesystem, fsync, then `os.replace` (atomic);
- object stores (S3, ...): build the file locally, then upload it with one `put_file` (a single PUT,
  or a multipart upload that becomes visible only when it completes).

Credentials are never handled here: s3fs/botocore read them from the environment or the standard
AWS config files. Only a non-secret endpoint URL and the retry policy (``core.s3``) are passed in
`storage_options`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.errors import credentials_hint, is_client_error
from core.redact import redact_url

_TMP_DIR = "_state/tmp"


def join(url: str, name: str) -> str:
    """`url/name` for any fsspec URL or local path."""
    return url.rstrip("/") + "/" + name


def is_local(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in ("file", "local")


def read_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.cat_file(path).decode("utf-8-sig")


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(path)


def find_files(
    url: str, suffixes: tuple[str, ...], storage_options: dict[str, Any] | None = None
) -> list[tuple[str, str, int]]:
    """(url, path relative to `url`, size) of every file below `url` whose name ends with one of
    `suffixes` (case-insensitive), sorted by relative path. Local inputs keep plain paths."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"not a directory: {redact_url(url)}")
    found = []
    for path, info in fs.find(root, detail=True).items():
        if info.get("type") == "file" and path.lower().endswith(suffixes):
            relative = path[len(root) :].lstrip("/")
            found.append((join(url, relative) if not is_local(url) else path, relative, int(info["size"])))
    return sorted(found, key=lambda entry: entry[1])


@dataclass(frozen=True)
class Store:
    """A directory-like output location (`/dir`, `file:///dir`, `s3://bucket/prefix`, ...)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.url, **self.storage_options)[0]

    def path(self, name: str) -> str:
        root = fsspec.core.url_to_fs(self.url, **self.storage_options)[1]
        return root.rstrip("/") + "/" + name

    def size(self, name: str) -> int | None:
        """Size of an existing object, or None. Never answered from a stale listing cache."""
        fs = self.fs
        fs.invalidate_cache(self.path(name))
        try:
            info = fs.info(self.path(name))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        with self.fs.open(self.path(name), "rb") as f:
            yield f

    def list_names(self, prefix: str = "") -> list[str]:
        """Names of the objects directly under the root that start with `prefix`."""
        fs = self.fs
        root = self.path("").rstrip("/")
        fs.invalidate_cache(root)
        try:
            paths = fs.ls(root, detail=False)
        except FileNotFoundError:
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in paths)
        return sorted(n for n in names if n.startswith(prefix))

    @contextlib.contextmanager
    def staged_file(self, name: str) -> Iterator[IO[bytes]]:
        """Write `name` through a temporary file that replaces the final object only on success."""
        if isinstance(self.fs, LocalFileSystem):
            final = self.path(name)
            tmp_dir = self.path(_TMP_DIR)
            os.makedirs(tmp_dir, exist_ok=True)
            tmp = os.path.join(tmp_dir, f"{os.path.basename(name)}.{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(tmp, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
            return
        with _local_staging_file() as (f, local_path):
            yield f
            f.flush()
            self.fs.put_file(local_path, self.path(name))
        self.fs.invalidate_cache(self.path(name))

    def remove(self, name: str) -> None:
        """Delete `name` if it exists."""
        fs = self.fs
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(self.path(name))
        fs.invalidate_cache(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically create or replace `name` with `data`."""
        with self.staged_file(name) as f:
            f.write(data)

    def ensure_root(self) -> None:
        """Create the output directory (local) or check the bucket is reachable (object stores)."""
        fs = self.fs
        root = self.path("").rstrip("/")
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(root, exist_ok=True)
            return
        # info (HEAD bucket) rather than exists: s3fs's exists answers "no" to any failure, and an
        # outage must be reported as one, not as a missing bucket.
        bucket = root.split("/", 1)[0]
        missing = FileNotFoundError(f"bucket of {redact_url(self.url)} does not exist or is not accessible")
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise missing from None
        except PermissionError:  # may still be writable without HEAD rights: the older, wider probe
            if not fs.exists(bucket):
                raise missing from None
        except OSError as exc:
            raise OSError(f"cannot reach the bucket of {redact_url(self.url)}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - botocore errors that are not OSErrors, named with the URL
            if not is_client_error(exc):
                raise
            raise OSError(f"cannot reach the bucket of {redact_url(self.url)}: {type(exc).__name__}: {exc}"
                          f"{credentials_hint(exc)}") from exc

    def remove_stale_temps(self, belongs: Callable[[str], bool]) -> None:
        """Drop temporary files a killed local run left behind (object stores have none).

        `belongs(final_basename)` limits this to one run's objects, so a concurrent run on another
        split of the same output directory keeps its in-progress files.
        """
        if not isinstance(self.fs, LocalFileSystem):
            return
        tmp_dir = self.path(_TMP_DIR)
        for entry in os.listdir(tmp_dir) if os.path.isdir(tmp_dir) else []:
            final_name, _, tag = entry.rpartition(".")
            if len(tag) == 32 and belongs(final_name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(tmp_dir, entry))


@contextlib.contextmanager
def _local_staging_file() -> Iterator[tuple[IO[bytes], str]]:
    """A local temporary file to build an upload in, and a path that opens it.

    On Linux the file has no name at all (opened again through /proc/self/fd), so a run killed with
    SIGKILL leaves nothing behind in the temp directory; elsewhere it is a named temporary file,
    removed on any exit but a hard kill.
    """
    with tempfile.TemporaryFile(prefix="mvit-shard-") as f:
        proc_path = f"/proc/self/fd/{f.fileno()}"
        if os.path.exists(proc_path):
            yield f, proc_path
            return
    with tempfile.NamedTemporaryFile(prefix="mvit-shard-", suffix=".tmp") as f:
        yield f, f.name
