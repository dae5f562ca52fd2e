"""Planted faults, for the reliability suite and for fire drills on a real cluster: off unless the
``MVIT_FAULTS`` environment variable holds a plan.

A poison video that segfaults Decord, or a rank that raises mid-epoch, cannot be produced on demand
from real data, yet the answer to each must be tested end to end, through Ray, in the processes where
it happens. A plan names where each fault fires; the code paths that honour it are the production
paths, so a drill on a cluster (``ray job submit --runtime-env-json '{"env_vars": {"MVIT_FAULTS":
...}}'``) exercises exactly what a real fault would::

    MVIT_FAULTS='{"decode": {"k400-000123": "segfault", "k400-000456": "hang:1"},
                  "raise_at": {"rank": 1, "step": 3},
                  "kill_read": ["train-000002.tar"], "kill_decoder_actor": ["k400-000789"]}'

``decode`` maps a sample key to what its decode does: ``segfault`` (SIGSEGV), ``abort`` (SIGABRT, as a
C++ assertion), ``kill`` (SIGKILL, what the kernel's OOM killer sends), ``hang`` (never returns, as in
dmlc/decord#269) or ``raise`` (a Python exception). ``kind:N`` fires only on the first N attempts, so a
transient crash that a retry gets past can be planted too. ``raise_at`` makes that rank raise
``PlantedFault`` before the optimiser step numbered ``step``. ``kill_read`` names shard files whose read
task SIGKILLs its own process before reading, and ``kill_decoder_actor`` sample keys whose batch SIGKILLs the
decoder actor itself (not its decode child), both on every attempt: what a lost node does to a read task
or an actor, so that the bounds on Ray's retries (``data.read_max_retries``, ``data.decoder.max_restarts``)
are seen to hold.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache

ENV = "MVIT_FAULTS"
DECODE_FAULTS = ("segfault", "abort", "kill", "hang", "raise")
_SECTIONS = {"decode", "raise_at", "kill_read", "kill_decoder_actor"}


class PlantedFault(RuntimeError):
    """Raised where a plan says a fault fires (never without ``MVIT_FAULTS``)."""


@dataclass(frozen=True)
class FaultPlan:
    decode: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (kind, attempts it fires on; 0 = all)
    raise_at: tuple[int, int] | None = None  # (rank, step)
    kill_read: frozenset[str] = frozenset()  # shard file names (basename)
    kill_decoder_actor: frozenset[str] = frozenset()  # sample keys

    @property
    def empty(self) -> bool:
        return not self.decode and self.raise_at is None and not self.kill_read and not self.kill_decoder_actor

    def decode_fault(self, key: str, attempt: int) -> str | None:
        """The fault to fire on ``attempt`` (1-based) of decoding ``key``, if any."""
        kind, attempts = self.decode.get(key, (None, 0))
        return kind if kind is not None and (attempts == 0 or attempt <= attempts) else None


def parse(text: str) -> FaultPlan:
    """A plan from its JSON text; a malformed plan is an error, never silently ignored."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict) or set(raw) - _SECTIONS:
            raise ValueError(f"expected an object with some of {', '.join(sorted(_SECTIONS))}")
        decode = {}
        for key, spec in (raw.get("decode") or {}).items():
            kind, _, count = str(spec).partition(":")
            if kind not in DECODE_FAULTS:
                raise ValueError(f"decode fault {spec!r} for {key!r}: use one of {', '.join(DECODE_FAULTS)}")
            decode[str(key)] = (kind, int(count or 0))
        raise_at = raw.get("raise_at")
        at = (int(raise_at["rank"]), int(raise_at["step"])) if raise_at else None
        names = {}
        for section in ("kill_read", "kill_decoder_actor"):
            listed = raw.get(section) or []
            if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
                raise ValueError(f"{section} must be a list of names")
            names[section] = frozenset(listed)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{ENV} is not a valid fault plan: {err}") from None
    return FaultPlan(decode, at, **names)


@lru_cache(maxsize=1)
def _plan_from(text: str) -> FaultPlan:
    return parse(text) if text.strip() else FaultPlan()


def current() -> FaultPlan:
    """This process's plan (empty unless ``MVIT_FAULTS`` is set)."""
    return _plan_from(os.environ.get(ENV, ""))


def fire_decode_fault(kind: str) -> None:
    """Do what a poison sample does to the process decoding it."""
    if kind == "segfault":
        ctypes.string_at(0)  # a read of address 0: SIGSEGV, in C, as a broken decoder would
    elif kind == "abort":
        os.abort()
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "raise":
        raise PlantedFault("planted decode error")
    raise ValueError(f"unknown decode fault {kind!r}")


def kill_process_if_planted(planted: frozenset[str], names: list[str], what: str) -> None:
    """SIGKILL this process if one of ``names`` is in ``planted`` (a line on stderr first: its last words)."""
    hit = sorted(set(names) & planted)
    if hit:
        print(f"planted fault ({ENV}): killing the {what} process for {hit[0]}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def check_step(rank: int, step: int) -> None:
    """Raise ``PlantedFault`` if the plan says this rank fails before optimiser step ``step``."""
    at = current().raise_at
    if at is not None and at == (rank, step):
        raise PlantedFault(f"planted failure on rank {rank} before step {step}")
