"""Error types and error text shared by both sides of the project.

A problem the user can fix (a bad config value, an unusable store, a tampered checkpoint) is reported
as one line naming what is wrong and where, never as a stack trace; these are the pieces that line is
made of. Each type carries its facts as attributes, so callers read fields instead of parsing text.
"""

from __future__ import annotations

import re
from typing import Any

from core.redact import redact_text, redact_value

_NO_VALUE = object()


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, secrets scrubbed and long texts cut, for errors raised by storage
    clients and other libraries whose messages span lines."""
    text = redact_value(" ".join(str(err).split())) or "no detail"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


def is_client_error(exc: BaseException) -> bool:
    """An error of the S3 client stack that is not an OSError: botocore's NoCredentialsError,
    EndpointConnectionError, ... (they mean "this store cannot be used", not a bug)."""
    return type(exc).__module__.split(".", 1)[0] in ("botocore", "aiobotocore")


def credentials_hint(exc: BaseException) -> str:
    """Where credentials are looked for, appended to a "no credentials" error (never the values)."""
    if type(exc).__name__ not in ("NoCredentialsError", "PartialCredentialsError"):
        return ""
    return (" (credentials come only from the environment or the AWS config: AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)")


class ConfigError(ValueError):
    """A configuration problem found before any work started.

    ``key`` is the dotted key (``trainer.num_workers``), ``value`` the bad value (shown redacted),
    ``problem`` what is wrong with it (``must be >= 1``) and ``where`` the source that set it (a file,
    ``the command line``, or the schema defaults), filled in by the loader that knows the sources.
    A problem that is not about one key (a YAML syntax error, a missing file) has ``key`` None.

    The one line reads ``invalid config from {where}: {key} {problem}, got {value!r}``. A ``problem``
    that names the key or shows the value elsewhere in its sentence places them with the ``{key}`` /
    ``{value}`` markers, which are then not added again: ``ConfigError("{value} exceeds half of
    pool_kernel", "pool_padding", (1, 2, 1))`` reads ``pool_padding (1, 2, 1) exceeds half of pool_kernel``.
    Secrets are scrubbed from the value (also one inside a list or a mapping), the problem text and the
    source (``core.redact.redact_text``): an environment secret's value, a credential shape, a URL password.
    """

    KEY = "{key}"
    VALUE = "{value}"
    _MARKER = re.compile(r"\{(key|value)\}")

    def __init__(self, problem: str, key: str | None = None, value: Any = _NO_VALUE, where: str | None = None,
                 related: tuple[str, ...] = ()):
        self.problem, self.key, self.value, self.where = problem, key, value, where
        self.related = tuple(related)  # other keys the problem depends on (``optim.lr`` for ``optim.min_lr``)
        super().__init__(str(self))

    @property
    def has_value(self) -> bool:
        return self.value is not _NO_VALUE

    @property
    def detail(self) -> str:
        """The line without its source: ``trainer.num_workers must be >= 1, got 0``."""
        text = redact_value(self.problem)
        if self.key and self.KEY not in text:
            text = f"{self.KEY} {text}"
        if self.has_value and self.VALUE not in text:
            text += f", got {self.VALUE}"
        shown = {"key": self.key or "", "value": redact_text(repr(redact_value(self.value))) if self.has_value else ""}
        return self._MARKER.sub(lambda m: shown[m.group(1)], text)

    def __str__(self) -> str:
        return f"invalid config from {redact_text(self.where)}: {self.detail}" if self.where else self.detail

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under ``prefix`` (``pool_padding`` -> ``model.pool_padding``)."""
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(self.problem, key, self.value, self.where, tuple(f"{prefix}.{k}" for k in self.related))

    def at(self, where: str) -> ConfigError:
        """The same error, naming the source that set its key."""
        return ConfigError(self.problem, self.key, self.value, where, self.related)

    def __reduce__(self) -> tuple:
        # Pickled field by field (Ray sends errors between processes): rebuilding from the rendered
        # message would lose the key, the value and the source.
        state: dict[str, Any] = {"where": self.where, "related": self.related}
        if self.has_value:
            state["value"] = self.value
        return (type(self), (self.problem, self.key), state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.args = (str(self),)


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model; the message lists every offending key."""


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds more than tensors and plain containers (pickled code or objects), so it
    was refused unread. Raised instead of torch's ``UnpicklingError`` so the caller sees which file and
    why, not a pickle traceback."""


def weights_only_refusal(err: BaseException) -> str:
    """The one line of a ``torch.load(weights_only=True)`` refusal that says what was refused."""
    text = str(err)
    text = text.partition("WeightsUnpickler error:")[2] or text.partition("trusted source.")[2] or text
    text = text.split("Please use")[0].split("Check the documentation")[0]
    return next((line.strip() for line in text.splitlines() if line.strip()), "not plain data")
