"""Decoding in a child process owned by the decoder actor, so a poison sample costs that sample only.

A video that segfaults or aborts Decord, gets the decoder OOM-killed, or hangs it (dmlc/decord#269)
would otherwise take the whole actor with it, and Ray Data would replay the same batch on a fresh
actor: forever with its default unlimited restarts, or failing the job once a bounded budget is spent.
Here the actor hands one sample at a time to a child process and waits at most
``decoder.sample_timeout_s`` for it:

- the child dies (a signal, or exits): a fresh child retries the sample, up to
  ``decoder.sample_retries`` more times, then the sample is FAILED with the signal as its reason;
- the child does not answer in time: it is killed and the sample is FAILED at once (a hang is not
  transient, and every retry would cost another full timeout);
- the decode raises: the child stays, the sample is FAILED with the exception (as in-process).

The child also bounds memory: it is replaced after ``decoder.recycle_after`` samples, so whatever a
Decord reader leaks (dmlc/decord#197, #208) is returned to the system with it.

Children are forked from a *zygote*: a fresh interpreter (``python -m pipeline.data.isolation``) that
the actor starts once, which imports torch, Decord and the decode code and then only forks. Forking
the actor itself is unsafe (it runs Ray's threads, and a fork can inherit a held lock), and
multiprocessing's spawn and forkserver modes would re-run the actor's ``__main__`` (Ray's worker
script); a fresh interpreter per child would pay the imports (seconds) on every crash and recycle,
a fork costs milliseconds. The zygote reaps the children and reports how each ended. Every process
asks the kernel to kill it when its parent goes, so a hung child never outlives its actor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from core.child import die_with_parent, exit_text

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 300  # the zygote imports torch and Decord before it answers
_CONTROL_BYTES = 1 << 16
_HEADER_BYTES = 1 << 12


class SampleFailed(Exception):
    """A sample could not be decoded; ``str(err)`` is the reason recorded with its key."""


@dataclass(frozen=True)
class ChildSettings:
    """What a child needs to build its ``SampleDecoder`` (picklable: sent to each child)."""

    cfg: Any  # DataConfig
    modality: str
    train: bool
    device_kind: str  # "cpu" | "gpu"
    device_index: int


# ---- the child: one SampleDecoder serving one connection -------------------------------------------

def _serve(conn: Connection) -> None:
    """Decode what the actor sends until it sends None or goes away."""
    from core.faults import fire_decode_fault
    from pipeline.data.sample_decode import SampleDecoder

    settings: ChildSettings = conn.recv()  # from the actor (the child trusts its actor, not the reverse)
    try:
        decoder = SampleDecoder(settings.cfg, settings.modality, settings.train, settings.device_kind,
                                settings.device_index)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the actor raises it: a broken set-up is not a bad sample
        _send_header(conn, "init-error", message=f"{type(exc).__name__}: {exc}")
        return
    _send_header(conn, "ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        data, meta, key, epoch, fault = message
        try:
            if fault:
                fire_decode_fault(fault)
            views = np.ascontiguousarray(decoder.decode(data, meta, key, epoch))
        except Exception as exc:  # noqa: BLE001 - reported to the actor, which records the sample FAILED
            _send_header(conn, "error", message=f"{type(exc).__name__}: {exc}"[:300])
            continue
        _send_header(conn, "ok", dtype=str(views.dtype), shape=list(views.shape))
        conn.send_bytes(memoryview(views).cast("B"))


def _send_header(conn: Connection, status: str, **fields: Any) -> None:
    """Child -> actor messages are JSON and raw bytes, never pickles: a child that untrusted media
    has compromised must not be able to make the actor run code by what it sends back."""
    conn.send_bytes(json.dumps({"status": status, **fields}).encode())


def _read_reply(conn: Connection) -> tuple[str, Any]:
    """(status, views or message) from the child; anything malformed is an error of that sample."""
    try:
        header = json.loads(conn.recv_bytes(_HEADER_BYTES))
        status = str(header.get("status"))
    except (ValueError, AttributeError):
        return "error", "the decode process sent a malformed reply"
    if status != "ok":
        return status, str(header.get("message", ""))[:300]
    shape = tuple(int(n) for n in header.get("shape", ()))
    data = conn.recv_bytes()
    if header.get("dtype") != "uint8" or len(data) != math.prod(shape):
        return "error", f"the decode process sent {header.get('dtype')} {list(shape)} in {len(data)} bytes"
    return "ok", np.frombuffer(data, np.uint8).reshape(shape)


# ---- the zygote: imports once, forks children, reaps them --------------------------------------------

def _zygote_main(control: socket.socket) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the actor's to handle
    import core.faults  # noqa: F401 - imported once here, so that every fork starts with them loaded
    import pipeline.data.sample_decode

    pipeline.data.sample_decode.load_decord()
    control.send(_control(["ready"]))
    while True:
        try:
            raw = control.recv(_CONTROL_BYTES)
        except OSError:
            return
        if not raw:
            return
        request = json.loads(raw)
        if request[0] == "fork":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:  # the child
                code = 0
                try:
                    control.close()
                    ours.close()
                    die_with_parent()  # a fork does not inherit this setting
                    _serve(Connection(theirs.detach()))
                except BaseException:  # noqa: BLE001 - a child must never return into the zygote's loop
                    code = 1
                finally:
                    os._exit(code)
            theirs.close()
            socket.send_fds(control, [_control(["forked", pid])], [ours.fileno()])
            ours.close()
        elif request[0] == "wait":
            _, pid, timeout = request
            control.send(_control(["exit", _reap(pid, timeout)]))
        else:
            return


def _control(message: list) -> bytes:
    return json.dumps(message).encode()


def _reap(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


class _Zygote:
    """The actor's handle on its zygote process."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The zygote finds this package (and a Ray job's working_dir) on the actor's own sys.path.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.data.isolation", str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)  # fmt: skip
        theirs.close()
        self.control = ours
        self._ready = False  # its imports run while the actor waits for its first batch

    def _wait_ready(self) -> None:
        self.control.settimeout(_START_TIMEOUT_S)
        try:
            reply = self._recv()
        except (OSError, EOFError) as err:
            self.close()
            raise RuntimeError(f"the decode zygote could not start: {err or exit_text(self.process.poll())}") from None
        if reply != ["ready"]:
            self.close()
            raise RuntimeError(f"the decode zygote could not start: {reply}")
        self.control.settimeout(60)
        self._ready = True

    def _recv(self) -> list:
        raw = self.control.recv(_CONTROL_BYTES)
        if not raw:
            raise EOFError(f"the decode zygote {exit_text(self.process.poll())}")
        return json.loads(raw)

    def fork(self) -> tuple[int, Connection]:
        if not self._ready:
            self._wait_ready()
        self.control.send(_control(["fork"]))
        raw, fds, _, _ = socket.recv_fds(self.control, _CONTROL_BYTES, 1)
        if not raw or not fds:
            raise EOFError(f"the decode zygote {exit_text(self.process.poll())}")
        _, pid = json.loads(raw)
        return int(pid), Connection(fds[0])

    def wait(self, pid: int, timeout: float) -> int | None:
        """The child's exit code once it has ended (None if it is still running after ``timeout``)."""
        self.control.send(_control(["wait", pid, timeout]))
        return self._recv()[1]

    def close(self) -> None:
        try:
            self.control.send(_control(["quit"]))
        except OSError:
            pass
        self.control.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class DecodeProcess:
    """The actor's handle on its decode child: ``decode`` returns the views or raises ``SampleFailed``."""

    def __init__(self, settings: ChildSettings, *, timeout_s: float, retries: int, recycle_after: int) -> None:
        self.settings = settings
        self.timeout_s, self.retries, self.recycle_after = timeout_s, retries, recycle_after
        self._zygote = _Zygote()
        self.pid: int | None = None
        self._conn: Connection | None = None
        self._served = 0
        self.restarts = 0  # children replaced after a crash or hang (recycling not counted)
        # The first child starts with the first sample: the zygote's imports overlap the actor's wait for it.

    def _start(self) -> None:
        self.pid, self._conn = self._zygote.fork()
        self._served = 0
        try:
            self._conn.send(self.settings)
            reply = _read_reply(self._conn) if self._conn.poll(_START_TIMEOUT_S) else ("init-error", "no answer")
        except (EOFError, OSError):  # it died while starting: how it ended is the reason
            reply = ("init-error", exit_text(self._stop(ask=False, grace=5)))
        if reply[0] != "ready":
            self._stop(ask=False, grace=0)
            raise RuntimeError(f"the decode process could not start: {reply[1]}")

    def _stop(self, ask: bool, grace: float) -> int | None:
        """Ends the child and returns its exit code: asks it to exit first if ``ask``, waits ``grace``
        seconds for it to end by itself, then kills it. The zygote reaps it exactly once, so the pid is
        never signalled after it could have been reused."""
        pid, conn = self.pid, self._conn
        self.pid = self._conn = None
        if pid is None:
            return None
        if ask:
            try:
                conn.send(None)
            except OSError:
                pass
        try:
            code = self._zygote.wait(pid, grace)
            if code is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                code = self._zygote.wait(pid, 5)
        except (OSError, EOFError):  # the zygote is gone (the actor is shutting down): so is the child
            code = None
        conn.close()
        return code

    def close(self) -> None:
        self._stop(ask=True, grace=5)
        self._zygote.close()

    def start(self) -> None:
        """Start the child now (``decode`` does it on demand); raises if it cannot start."""
        if self.pid is None:
            self._start()

    def decode(self, data: bytes, meta: dict[str, Any], key: str, epoch: int, fault: Any = None) -> np.ndarray:
        """The sample's views; ``fault`` is ``core.faults.FaultPlan`` (or None)."""
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            if self.pid is None or (self.recycle_after and self._served >= self.recycle_after):
                self._stop(ask=True, grace=5)
                self._start()
            planted = fault.decode_fault(key, attempt) if fault is not None else None
            started = time.monotonic()
            try:
                self._conn.send((data, meta, key, epoch, planted))
                ready = self._conn.poll(self.timeout_s)
                reply = _read_reply(self._conn) if ready else None
            except (EOFError, OSError):  # the child died while receiving or decoding
                ready, reply = True, None
            self._served += 1
            if reply is not None:
                status, value = reply
                if status == "ok":
                    return value
                raise SampleFailed(value)
            if not ready:  # still running after the deadline: a hang
                self._stop(ask=False, grace=0)
                self.restarts += 1
                raise SampleFailed(f"decode did not finish within decoder.sample_timeout_s={self.timeout_s:g} s "
                                   f"(killed; a hang, as in dmlc/decord#269)")
            # The connection closed: the child has ended (or is ending); the zygote says how.
            how = exit_text(self._stop(ask=False, grace=5))
            self.restarts += 1
            log.warning("decode process %s on sample %s after %.1f s (attempt %d of %d)", how, key,
                        time.monotonic() - started, attempt, attempts)  # fmt: skip
        raise SampleFailed(f"decode process {how} on each of {attempts} attempts")


if __name__ == "__main__":
    _zygote_main(socket.socket(fileno=int(sys.argv[1])))
    os._exit(0)  # nothing to flush or finalise: skip the interpreter's (torch's) slow shutdown
