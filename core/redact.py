"""Secrets out of text before it reaches a log line, an error message, MLflow or a written file.

One place decides what a secret looks like: a password (or a whole ``user:password@`` part) inside a
URL, the value of an environment variable whose name says it is secret, and any mapping key named like
a credential. Credentials themselves are never read here: only matched and replaced.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):[^/@\s]*@")
_SECRET_NAME = re.compile(r"(pass(word|wd)?|secret|token|credential|api[_-]?key|access[_-]?key|private[_-]?key)", re.I)
_SECRET_ENV = re.compile(r"(PASS|SECRET|TOKEN|CREDENTIAL|KEY)", re.I)


def redact_url(text: str, keep_user: bool = False) -> str:
    """``text`` with the ``user:password@`` part of every URL in it replaced by ``***@``; with
    ``keep_user`` only the password (``user:***@``), where the user name helps tell settings apart."""
    if keep_user:
        return _PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    return _USERINFO.sub(f"{REDACTED}@", text)


def secret_env_values() -> set[str]:
    """Values of environment variables named like secrets (6 characters or more, to spare short flags)."""
    return {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 6}


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_value(value: Any, secrets: set[str] | None = None) -> Any:
    """A string with URL passwords and any environment secret in it replaced; other values unchanged."""
    if not isinstance(value, str):
        return value
    out = redact_url(value, keep_user=True)
    for secret in secret_env_values() if secrets is None else secrets:
        if secret in out:
            out = out.replace(secret, REDACTED)
    return out


def redact_mapping(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a (nested) mapping with secret-named keys blanked and secret values scrubbed."""
    secrets = secret_env_values()

    def walk(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: (REDACTED if is_secret_name(str(k)) else walk(v)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v) for v in obj]
        return redact_value(obj, secrets)

    return walk(mapping)
