"""Secrets out of text before it reaches a log line, an error message, MLflow or a written file.

One place decides what a secret is, by three rules:

- **by value**: the value of any environment variable that is secret, wherever it appears in a text
  (a config value resolved from ``${oc.env:GITHUB_PAT}``, an error quoting it). A variable is secret when
  its name says so (``PAT``, ``PASS``, ``SECRET``, ``TOKEN``, ``CREDENTIAL``, ``KEY``, ``AUTH``,
  ``CONN(ECTION)_STRING``, ``SAS``, ``PRIVATE``, ``API``; not ``..._FILE``, ``..._DIR``, ``..._URL`` and
  the like) or when its value has the shape of a credential, whatever its name;
- **by shape**: credentials recognisable on their own, in the environment or not: AWS access key ids
  (``AKIA``/``ASIA`` + 16) and a 40-character secret key beside one, GitHub tokens (``ghp_``, ``gho_``,
  ``ghu_``, ``ghs_``, ``ghr_``, ``github_pat_``), Slack tokens (``xox?-``), JWTs, ``Bearer`` tokens and
  ``Authorization:`` values, PEM private key blocks, and the value of any ``key=value`` (or quoted
  ``"key": "value"``) whose key ends like a credential (``aws_secret_access_key``, ``AccountKey`` and
  ``SharedAccessSignature`` of an Azure connection string, ``sig`` of a SAS URL, ``password``, ``token``);
- **in URLs**: the password (or the whole ``user:password@`` part) of a URL.

Mapping keys named like credentials (``db_password``, ``api_key``) have their whole value blanked. Git
SHAs, paths, bucket URLs, model names and numbers match none of these. Credentials themselves are never
read here: only matched and replaced, by ``***``.

``install_redaction`` puts the same rules on every log record of the process and on the traceback of an
uncaught exception; the driver calls it, and every Ray worker of a job runs it at start
(``WORKER_SETUP_HOOK``, a ``worker_process_setup_hook``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Collection, Mapping
from typing import Any

REDACTED = "***"
WORKER_SETUP_HOOK = "core.redact.install_redaction"  # runtime_env["worker_process_setup_hook"] of a job

_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):[^/@\s]*@")

# Words that make a key a credential. A mapping key holding one anywhere is blanked; a ``key=value`` in
# text is scrubbed when its key ends with one (``token_file=...`` or ``num_tokens=3`` are not).
_CREDENTIAL_WORDS = (
    r"pass(?:word|wd|phrase)|secret|token|credentials?|signature|conn(?:ection)?_?str(?:ing)?"
    r"|(?:api|access|account|private|shared_?access|sas|master|signing|encryption|storage)[_-]?key"
    r"|(?<![a-z])(?:pat|sig|sas|auth(?!or))(?![a-z])"
)
_SECRET_KEY = re.compile(_CREDENTIAL_WORDS, re.I)
_SECRET_KEY_END = re.compile(f"(?:{_CREDENTIAL_WORDS})$", re.I)

# Environment variables named like secrets, less those whose name says they hold a place or a setting.
_SECRET_ENV = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL|KEY|AUTH|PRIVATE|CONN(?:ECTION)?_?STR(?:ING)?"
                         r"|(?<![A-Z])(?:PAT|SAS|API)(?![A-Z])", re.I)
_NOT_SECRET_ENV = re.compile(r"_(?:FILE|PATH|DIR|SOCK|SOCKET|MODE|TYPE|URL|URI|ENDPOINT|HOST|PORT|REGION|VERSION|"
                             r"LEVEL|ENABLED|TIMEOUT)$", re.I)
_PLAIN_VALUE = re.compile(r"[-+]?[\d.]+|true|false|yes|no|none|null|enabled?|disabled?", re.I)
_MIN_SECRET_LEN = 6  # shorter values (flags, small numbers) are not worth a false match in every text

_PEM = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.S)
_AWS_KEY_ID = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
                         r"(?:(?P<sep>['\"]?\s*[,:;|=\s]\s*['\"]?)(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=]))?")
_TOKENS = re.compile(
    r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"  # GitHub
    r"|(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"  # JWT
)
_AUTHORIZATION = re.compile(r"(?P<head>\b(?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?(?:[A-Za-z]+\s+)?)"
                            r"(?P<value>[^\s'\",]+)", re.I)
_BEARER = re.compile(r"(?P<head>\bbearer\s+)(?=[A-Za-z0-9._~+/-]*\d)[A-Za-z0-9._~+/-]{16,}=*", re.I)
# key=value (also key = 'value') and "key": "value"; the key is checked by _SECRET_KEY_END
_ASSIGNMENT = re.compile(r"(?<![\w.-])(?P<key>[\w.-]+)(?P<sep>\s*=\s*['\"]?|['\"]\s*:\s*['\"]?)"
                         r"(?P<value>[^\s'\"&;,]+)")
# An environment variable whose value holds one of these, or a credential assignment, is secret whatever its name.
_CREDENTIAL_SHAPES = (_PEM, _AWS_KEY_ID, _TOKENS, _AUTHORIZATION, _BEARER)


def redact_url(text: str, keep_user: bool = False) -> str:
    """``text`` with the ``user:password@`` part of every URL in it replaced by ``***@``; with
    ``keep_user`` only the password (``user:***@``), where the user name helps tell settings apart."""
    if keep_user:
        return _PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    return _USERINFO.sub(f"{REDACTED}@", text)


def _assignment(match: re.Match[str]) -> str:
    if not _SECRET_KEY_END.search(match["key"]):
        return match[0]
    return f"{match['key']}{match['sep']}{REDACTED}"


def _aws_key(match: re.Match[str]) -> str:
    return REDACTED + (f"{match['sep']}{REDACTED}" if match["secret"] else "")


def redact_shapes(text: str) -> str:
    """``text`` with every credential recognisable by its shape replaced (see the module docstring)."""
    text = _PEM.sub(REDACTED, text)
    text = _AWS_KEY_ID.sub(_aws_key, text)
    text = _TOKENS.sub(REDACTED, text)
    text = _AUTHORIZATION.sub(lambda m: m["head"] + REDACTED, text)
    text = _BEARER.sub(lambda m: m["head"] + REDACTED, text)
    if "=" in text or ":" in text:
        text = _ASSIGNMENT.sub(_assignment, text)
    return text


def _has_credential_shape(value: str) -> bool:
    return any(shape.search(value) for shape in _CREDENTIAL_SHAPES) or any(
        _SECRET_KEY_END.search(m["key"]) for m in _ASSIGNMENT.finditer(value))


def _is_secret_env(name: str, value: str) -> bool:
    if len(value) < _MIN_SECRET_LEN or _PLAIN_VALUE.fullmatch(value):
        return False
    if _has_credential_shape(value):
        return True
    if not _SECRET_ENV.search(name) or _NOT_SECRET_ENV.search(name):
        return False
    # a place on this machine (GIT_ASKPASS=/usr/bin/..., XAUTHORITY=...) is not a credential
    return not (value[0] in "/~" and os.path.exists(os.path.expanduser(value)))


_env_cache: tuple[dict[str, str], frozenset[str]] = ({}, frozenset())


def secret_env_values() -> frozenset[str]:
    """Values of the environment variables that are secret: named like one, or shaped like a credential.

    Recomputed only when the environment changed since the last call (this runs for every log record)."""
    global _env_cache
    env = dict(os.environ)
    if env != _env_cache[0]:
        _env_cache = (env, frozenset(v for k, v in env.items() if _is_secret_env(k, v)))
    return _env_cache[1]


@functools.lru_cache(maxsize=64)
def _values_pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    """One pattern for all values, the longest first (a secret that contains another is replaced whole)."""
    values = sorted((s for s in secrets if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, values))) if values else None


def redact_text(text: str, secrets: Collection[str] | None = None) -> str:
    """``text`` with environment secrets (or the given ``secrets``), credential shapes and URL passwords
    replaced by ``***``."""
    pattern = _values_pattern(secret_env_values() if secrets is None else frozenset(secrets))
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    return redact_shapes(redact_url(text, keep_user=True))


def is_secret_name(name: str) -> bool:
    """A mapping key whose whole value is a credential (``db_password``, ``aws_secret_access_key``)."""
    return bool(_SECRET_KEY.search(name))


def redact_value(value: Any, secrets: Collection[str] | None = None) -> Any:
    """A string with its secrets replaced (``redact_text``); other values unchanged."""
    return redact_text(value, secrets) if isinstance(value, str) else value


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


class RedactingFilter(logging.Filter):
    """Scrubs a log record in place (its message with its arguments, its traceback, its stack) and lets
    it through. The message is formatted once here; a record with nothing to scrub is left as it was."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is the handler's to report
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def _redacting_factory(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    scrub = RedactingFilter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        scrub.filter(record)
        return record

    factory.redacting = True  # type: ignore[attr-defined]
    return factory


def _redacting_excepthook(kind: type[BaseException], err: BaseException, tb: Any) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, err, tb))))


def install_redaction() -> None:
    """Scrubs every log record of this process, from any logger to any handler (also handlers that Ray
    or a library adds later), and the traceback of an uncaught exception. Idempotent.

    The filter runs where records are made (the log record factory): a filter on a logger misses the
    records of its child loggers, and one on a handler misses handlers added after it. Records below a
    logger's level are never made, so they cost nothing."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "redacting", False):
        logging.setLogRecordFactory(_redacting_factory(factory))
    sys.excepthook = _redacting_excepthook
