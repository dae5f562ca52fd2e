"""S3 as every part of the project talks to it: which endpoint, and how hard to retry.

Two clients reach S3: s3fs (fsspec; preprocessing, shard reads, artifact copies) and pyarrow (Ray
Train's checkpoint storage). Both are configured from here, from one ``RetryPolicy`` read from the
environment where the options are built (the CLI or the training driver), so that a flaky store is
ridden out and an outage fails the run in bounded time, the same way on every node. Credentials are
never handled: botocore and pyarrow read them from the standard AWS chain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_RETRY_MODES = ("standard", "adaptive", "legacy")


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: the one given (flag or config), else AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL from the environment, else None (AWS itself)."""
    return endpoint_url or next((os.environ[v] for v in _ENDPOINT_ENV if os.environ.get(v)), None)


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


@dataclass(frozen=True)
class RetryPolicy:
    """How many times one S3 request is tried (``AWS_MAX_ATTEMPTS``, first try included) and botocore's
    backoff mode (``AWS_RETRY_MODE``): exponential backoff with jitter, rand(0, 1) x 2^(n-1) s before
    try n, capped at 20 s.

    One policy, two default attempt counts, because the two clients stack retries differently:

    - s3fs (``fsspec_attempts``, 4): botocore tries a request 4 times, and s3fs repeats a call that
      still fails with a throttling, connection or cut-off-body error up to 5 more times (0.1 to 0.8 s
      apart), so a request gets up to 20 tries in about 20 s (about 40 s at worst), bounded per try by
      s3fs's timeouts (connect 5 s, read 15 s).
    - pyarrow (``pyarrow_attempts``, 10): its AWS SDK retry strategy is the only layer, and a lost
      checkpoint write costs a restart of every worker, so it gets the same order of patience in one
      layer: 10 tries within about 75 s, each bounded by connect 10 s / request 60 s timeouts.

    ``AWS_MAX_ATTEMPTS`` set in the environment overrides both, so an operator has one knob.
    """

    fsspec_attempts: int = 4
    pyarrow_attempts: int = 10
    mode: str = "standard"

    @classmethod
    def from_env(cls) -> RetryPolicy:
        raw = os.environ.get("AWS_MAX_ATTEMPTS")
        try:
            attempts = int(raw) if raw else None
        except ValueError:
            raise ValueError(f"AWS_MAX_ATTEMPTS must be an integer, got {raw!r}") from None
        if attempts is not None and attempts < 1:
            raise ValueError(f"AWS_MAX_ATTEMPTS must be >= 1, got {attempts}")
        mode = os.environ.get("AWS_RETRY_MODE") or cls.mode
        if mode not in _RETRY_MODES:
            raise ValueError(f"AWS_RETRY_MODE must be standard, adaptive or legacy, got {mode!r}")
        if attempts is None:
            return cls(mode=mode)
        return cls(fsspec_attempts=attempts, pyarrow_attempts=attempts, mode=mode)

    def s3fs_config(self) -> dict[str, Any]:
        """s3fs ``config_kwargs``: total_max_attempts counts the first try, like AWS_MAX_ATTEMPTS
        (botocore's max_attempts would not)."""
        return {"retries": {"total_max_attempts": self.fsspec_attempts, "mode": self.mode}}


def storage_options_for(url: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: for S3, the endpoint (given, else AWS_ENDPOINT_URL[_S3] env) and the
    retry policy; nothing for other URLs."""
    if not is_s3(url):
        return {}
    endpoint = s3_endpoint(endpoint_url)
    return {**({"endpoint_url": endpoint} if endpoint else {}), "config_kwargs": RetryPolicy.from_env().s3fs_config()}


# pyarrow's S3 timeouts (the s3fs ones are s3fs's own defaults).
PYARROW_CONNECT_TIMEOUT_S = 10.0
PYARROW_REQUEST_TIMEOUT_S = 60.0


def absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def pyarrow_target(path: str, endpoint_url: str | None = None, max_attempts: int | None = None,
                   request_timeout_s: float = PYARROW_REQUEST_TIMEOUT_S) -> tuple[str, Any]:  # fmt: skip
    """``(path, filesystem)`` in the form pyarrow users (``ray.train.RunConfig``) take them.

    A local path comes back absolute with no filesystem. An ``s3://`` URL comes back as
    ``bucket/prefix`` with a ``RetryingS3FileSystem`` on the endpoint ``s3_endpoint`` resolves;
    ``max_attempts`` defaults to the ``RetryPolicy``'s pyarrow attempts.
    """
    path = absolute(path)
    if not path.startswith("s3://"):
        return path, None
    options: dict[str, Any] = {
        "max_attempts": max_attempts or RetryPolicy.from_env().pyarrow_attempts,
        "connect_timeout": PYARROW_CONNECT_TIMEOUT_S,
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
            pass  # the storage check before a job starts reports an unreachable bucket clearly
    return path[len("s3://"):], RetryingS3FileSystem(**options)


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` whose retry strategy survives pickling: Ray ships the storage
    filesystem to its controller and every worker by pickling it, and pyarrow's own pickling of
    ``S3FileSystem`` drops ``retry_strategy`` (the copies fall back to 3 attempts)."""

    def __init__(self, max_attempts: int, **options: Any) -> None:
        super().__init__(retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
        self._options = {**options, "max_attempts": max_attempts}

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return _rebuild, (self._options,)


def _rebuild(options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)
