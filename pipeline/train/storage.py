"""Where a job's checkpoints and final model go: ``RunConfig.storage_path`` and its filesystem.

For S3 the job builds the pyarrow filesystem itself instead of letting Ray derive one from the URI, so
that every request is retried with backoff and bounded in time: a flaky store is survived, a dead one
fails the job with an error instead of hanging it. A custom endpoint (MinIO, moto) is honoured too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow.fs

from preprocessing.storage import s3_endpoint

# AWS "standard" retry mode: exponential backoff with jitter, capped at 20 s between attempts.
# pyarrow's default of 3 attempts is used up by a few seconds of 503 SlowDown, and a lost checkpoint
# write costs a restart of every worker, so checkpoints get more attempts than data reads
# (``AWS_MAX_ATTEMPTS`` overrides both).
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_REQUEST_TIMEOUT_S = 60.0


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` whose retry strategy survives pickling.

    Ray ships the storage filesystem to its controller and every worker by pickling it, and pyarrow's
    own pickling of ``S3FileSystem`` drops ``retry_strategy`` (the copies fall back to 3 attempts).
    """

    def __init__(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS, **options: Any) -> None:
        super().__init__(retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
        self._options = {**options, "max_attempts": max_attempts}

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return _rebuild, (self._options,)


def _rebuild(options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


def absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def storage_target(path: str, endpoint_url: str | None = None, max_attempts: int | None = None,
                   request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> tuple[str, Any]:  # fmt: skip
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``.

    A local path comes back absolute with no filesystem (Ray's default). An ``s3://`` URL comes back as
    ``bucket/prefix`` with a ``RetryingS3FileSystem``; the endpoint is ``endpoint_url``, else
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials come from the standard AWS chain.
    ``max_attempts`` defaults to ``AWS_MAX_ATTEMPTS``, else ``DEFAULT_MAX_ATTEMPTS``.
    """
    path = absolute(path)
    if not path.startswith("s3://"):
        return path, None
    if max_attempts is None:
        max_attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)
    options: dict[str, Any] = {
        "max_attempts": max_attempts,
        "connect_timeout": DEFAULT_CONNECT_TIMEOUT_S,
        "request_timeout": request_timeout_s,
    }
    endpoint = s3_endpoint(endpoint_url)
    if endpoint:
        options["endpoint_override"] = endpoint.split("://", 1)[-1]
        options["scheme"] = "http" if endpoint.startswith("http://") else "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    elif not endpoint:
        try:  # what Ray's own from_uri does: ask S3 where the bucket lives
            options["region"] = pyarrow.fs.resolve_s3_region(path[len("s3://"):].split("/", 1)[0])
        except OSError:
            pass  # the storage check before the job starts reports an unreachable bucket clearly
    return path[len("s3://"):], RetryingS3FileSystem(**options)
