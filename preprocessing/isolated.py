"""Each input is encoded in a child process that its worker can stop: the per-input time limit.

The caps (transcode.py) refuse an input over a size or length from its header, before anything is
decoded. What a header cannot show (a slow path through a decoder, a hang inside libav, a crash) is
bounded here. A worker process (a local worker, the process running a Ray task, the driver while it
calibrates or runs with one worker) hands its inputs one at a time to its encoder child and waits at
most `timeout` seconds (`--item-timeout`) for each:

- an answer in time: the sample, or the reject and its reason, exactly as in-process encoding gives;
- no answer in time: the child is killed with SIGKILL, so the work stops whatever C code it is in, and
  the input is a reject naming the limit and the time spent;
- the child dies (a decoder crash, the kernel's OOM killer): the input is a reject saying how it ended.

After a kill or a death the next input gets a fresh child; otherwise one child serves every input and
every shard of its worker. It is a new interpreter (`python -m preprocessing.isolated`, ~0.3 s to
import the encoders), not a fork: a worker holds threads (s3fs's event loop, the progress queue) that
a forked copy must not inherit, and multiprocessing's spawn would run a Ray worker's main script
again. The worker, not the child, reads the input (`transcode.open_input`), so a storage error still
fails the shard (a rerun redoes it) instead of becoming a reject; a remote input reaches the child as
the descriptor of the nameless local file it was streamed into, passed over the socket.

The child trusts its worker (requests are pickles); the worker does not trust the child, which
decodes untrusted media: replies are a JSON header and raw bytes, so a child taken over by a crafted
input cannot make its worker run code. The kernel kills a child whose worker has gone, so a hung
child never outlives it.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import IO, Any

from core.child import die_with_parent, exit_text
from preprocessing.items import WorkItem
from preprocessing.transcode import EncodedSample, Encoder, RejectError, open_input

DEFAULT_ITEM_TIMEOUT_S = 300.0
_START_TIMEOUT_S = 120.0  # the child imports PyAV, Pillow and NumPy before it says it is ready
_HEADER_MAX_BYTES = 1 << 20


def encode(encoder: Encoder, item: WorkItem, storage_options: dict[str, Any], timeout: float | None) -> EncodedSample:
    """The sample of `item`, encoded by this process's child within `timeout` seconds (None: no limit).

    Raises RejectError for an input that is bad, over a cap, over the time limit or that killed the
    child; storage errors while reading the input propagate."""
    with open_input(item, storage_options) as src:
        for attempt in (1, 2):
            child = start()
            try:
                child.send(encoder, item, src)
            except OSError:  # it died while idle (not this input's doing): once more with a fresh child
                if attempt == 2:
                    raise
                close()
                continue
            return child.result(item, timeout)
    raise AssertionError("unreachable")


def start() -> _Child:
    """This process's encoder child, started now if there is none (it gets ready while the caller goes
    on: `encode` waits for it only when it sends the first input)."""
    global _child
    if _child is None or _child.process.poll() is not None:
        close()
        _child = _Child()
    return _child


def close() -> None:
    """Ends this process's encoder child, if any (the next `encode` starts another)."""
    global _child
    child, _child = _child, None
    if child is not None:
        child.stop(grace=5, ask=True)


_child: _Child | None = None
# At the exit of the driver and of the local workers (spawned: they run atexit), so the child is reaped
# by its parent; a process that ends otherwise closes the socket, and its child exits at end of file.
atexit.register(close)


class _Child:
    """The worker's handle on its encoder child: one request at a time, over a socket pair."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        # The child imports this package from wherever the worker did (a Ray runtime env included).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-m", "preprocessing.isolated", str(theirs.fileno()), str(os.getpid())]
        self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.ready = False

    def _wait_ready(self) -> None:
        try:
            self.ready = self.conn.poll(_START_TIMEOUT_S) and _header(self.conn).get("status") == "ready"
        except (EOFError, OSError, ValueError):
            pass
        if not self.ready:
            ended = self.stop(grace=5)
            raise RuntimeError(f"the encoder process did not start ({ended})")

    def send(self, encoder: Encoder, item: WorkItem, src: str | IO[bytes]) -> None:
        if not self.ready:
            self._wait_ready()
        local_path = src if isinstance(src, str) else None
        self.conn.send((encoder, item, local_path))
        if local_path is None:  # the descriptor shares its offset with the child: start it at 0
            src.seek(0)
            with socket.fromfd(self.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                socket.send_fds(sock, [b"F"], [src.fileno()])

    def result(self, item: WorkItem, timeout: float | None) -> EncodedSample:
        """The reply to the request just sent; the whole of it must arrive within `timeout` seconds."""
        started = time.monotonic()

        def arrives() -> bool:
            return self.conn.poll(None if timeout is None else max(0.0, started + timeout - time.monotonic()))

        try:
            header = _header(self.conn) if arrives() else None
            if header is not None and header.get("status") == "ok":
                data = self.conn.recv_bytes() if arrives() else None
                if data is not None:
                    if len(data) != header.get("bytes") or not isinstance(header.get("meta"), dict):
                        raise ValueError("a reply that does not match its header")
                    return EncodedSample(data, header["meta"])
                header = None
        except (EOFError, OSError, ValueError):  # it died, or what it sent is not a reply
            raise RejectError(f"the encoder process {self.stop(grace=5)} while encoding this input") from None
        if header is None:
            self.stop(grace=0)
            raise RejectError(f"over the time limit: still encoding after {time.monotonic() - started:.1f} s "
                              f"> --item-timeout {timeout:g} (stopped)")  # fmt: skip
        if header.get("status") == "reject":
            raise RejectError(str(header.get("reason")))
        raise RuntimeError(f"encoding {item.source} failed in the encoder process: {header.get('message')}")

    def stop(self, grace: float, ask: bool = False) -> str:
        """Ends the child: asks it to exit if `ask`, waits `grace` seconds for it to end, then kills
        it; reaps it and says how it ended."""
        if ask:
            try:
                self.conn.send(None)
            except OSError:
                pass
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()
        return exit_text(self.process.returncode)


def _header(conn: Connection) -> dict[str, Any]:
    header = json.loads(conn.recv_bytes(_HEADER_MAX_BYTES))
    if not isinstance(header, dict):
        raise ValueError("a reply header that is not an object")
    return header


# ---- the child ---------------------------------------------------------------------------------


def _reply(conn: Connection, status: str, **fields: Any) -> None:
    conn.send_bytes(json.dumps({"status": status, **fields}).encode("utf-8"))


def _next_request(conn: Connection) -> Any:
    """The worker's next request; None when it says so or has gone away."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def _serve(conn: Connection) -> None:
    """Encode what the worker sends until it sends None or goes away."""
    _reply(conn, "ready")
    for encoder, item, local_path in iter(lambda: _next_request(conn), None):
        src = local_path if local_path is not None else os.fdopen(_received_fd(conn), "rb")
        try:
            sample = encoder.encode_local(item, src)
        except RejectError as exc:
            _reply(conn, "reject", reason=str(exc))
        except Exception:  # noqa: BLE001 - a bug, not a bad input: the worker raises it
            _reply(conn, "error", message=traceback.format_exc()[-4000:])
        else:
            _reply(conn, "ok", meta=sample.meta, bytes=len(sample.data))
            conn.send_bytes(sample.data)
        finally:
            if local_path is None:
                src.close()


def _received_fd(conn: Connection) -> int:
    """The descriptor the worker sent after its request (the nameless file a remote input is in)."""
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if len(fds) != 1:
        raise OSError("no file descriptor came with the request")
    return fds[0]


def _main(fd: int, parent: int) -> None:
    die_with_parent()  # killed when the worker goes, even while stuck in a decoder
    if os.getppid() != parent:  # the worker went before the request above took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle
    _serve(Connection(fd))


if __name__ == "__main__":
    from core.redact import install_redaction

    install_redaction()  # secrets out of the encoder child's log records and tracebacks
    _main(int(sys.argv[1]), int(sys.argv[2]))
    os._exit(0)  # nothing to flush: skip the interpreter's teardown of PyAV and NumPy (~1 s)
