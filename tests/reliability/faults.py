r"""A fault-injecting HTTP proxy on 127.0.0.1, put in front of the moto S3 server (or any HTTP service).

    with FaultProxy(s3_server) as proxy:          # or the ``fault_proxy`` fixture (tests/reliability/conftest.py)
        options = {"endpoint_url": proxy.url}     # point s3fs / boto / the CLI (--s3-endpoint-url) at it
        proxy.fail_next(3, status=503)            # the next 3 requests get an S3-style 503 SlowDown
        proxy.drop_next(2, methods={"PUT"})       # the next 2 PUTs: connection closed, no response at all
        proxy.drop_for(5.0, after=1)              # after 1 more request, every request for 5 s is dropped
        proxy.cut_next(1, methods={"GET"})        # the next GET: headers and half the body, then closed
        proxy.fail_always()                       # a permanent outage (status=None: drop instead of 503)
        rule = proxy.fail_always(paths=r"_step3/.*\.distcp")  # only requests whose path matches the regex
        proxy.fail_always(armed_by=r"^PUT [^?]*\.tar$")  # dormant until a request like this has been let through
        rule.fired                                # how many requests this rule has failed so far
        proxy.heal()                              # back to forwarding everything
        proxy.stats                               # requests seen, forwarded, errors / drops / cuts injected, and
                                                  # stats.log: (method, path, outcome) of every request

The proxy speaks just enough HTTP/1.1 to forward each request (keep-alive, Content-Length and
chunked bodies, ``Expect: 100-continue``) and relay the full upstream response; a fault replaces
the forwarding of one request. Rules apply in the order they were added; ``methods`` limits a rule to
some HTTP methods and ``paths`` (a regular expression searched in the request path, query included) to
some objects; requests that do not match pass through and do not use up the rule. ``after=k`` lets k
matching requests through before the rule starts (an outage beginning mid-run); ``armed_by`` (a regular
expression searched in ``"METHOD path"``) keeps the rule dormant until a request it matches has been
forwarded, so an outage can begin right after a given event (the first shard published) whatever the
order in which concurrent workers send their other requests. Every control method
returns its rule, whose ``fired`` counts the requests it faulted, so a test can show that each fault it
planted did happen, not only that some fault did.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "expect", "content-length",
}  # fmt: skip
_S3_ERROR_CODES = {500: "InternalError", 503: "SlowDown"}
_COUNTERS = {"error": "errors", "drop": "drops", "cut": "cuts"}


@dataclass
class FaultStats:
    """What the proxy saw and did (read it any time; the counters only grow)."""

    requests: int = 0
    forwarded: int = 0
    errors: int = 0
    drops: int = 0
    cuts: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str, str]] = field(default_factory=list, repr=False)  # (method, path, outcome), first 10k

    @property
    def faults(self) -> int:
        return self.errors + self.drops + self.cuts


@dataclass
class _Rule:
    kind: str  # "error" | "drop" | "cut"
    remaining: int | None  # requests left; None = no count limit
    seconds: float | None  # how long the rule lasts once active; None = no time limit
    status: int = 503
    methods: frozenset[str] | None = None
    after: int = 0  # matching requests still to pass before the rule becomes active
    paths: re.Pattern[str] | None = None
    until: float | None = None  # time.monotonic() deadline, set when the rule becomes active
    armed_by: re.Pattern[str] | None = None  # dormant until a forwarded request's "METHOD path" matches
    fired: int = 0  # requests this rule has faulted

    def applies(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and (self.paths is None or bool(self.paths.search(path)))

    def expired(self, now: float) -> bool:
        return (self.remaining is not None and self.remaining <= 0) or (self.until is not None and now >= self.until)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 (a free port) forwarding to ``upstream`` unless told to fail."""

    def __init__(self, upstream: str, upstream_timeout: float = 30.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.upstream_timeout = upstream_timeout
        self.stats = FaultStats()
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.block_on_close = False
        server.proxy = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                        name="fault-proxy")  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:  # kept-alive client connections: end them so no handler thread lingers
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- control ----------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 503, methods: set[str] | None = None, after: int = 0,
                  paths: str | None = None) -> _Rule:
        """Answer the next ``n`` (matching) requests with an S3-style error response of ``status``."""
        return self._add(_Rule("error", n, None, status, _methods(methods), after, _paths(paths)))

    def drop_next(self, n: int, methods: set[str] | None = None, after: int = 0, paths: str | None = None) -> _Rule:
        """Close the connection of the next ``n`` (matching) requests without any response."""
        return self._add(_Rule("drop", n, None, 0, _methods(methods), after, _paths(paths)))

    def drop_for(self, seconds: float, methods: set[str] | None = None, after: int = 0,
                 paths: str | None = None) -> _Rule:
        """Drop every (matching) request for ``seconds``, counted from the first one dropped."""
        return self._add(_Rule("drop", None, seconds, 0, _methods(methods), after, _paths(paths)))

    def cut_next(self, n: int, methods: set[str] | None = None, after: int = 0, paths: str | None = None) -> _Rule:
        """Forward the next ``n`` (matching) requests, then send the response's headers and only half
        its body before closing the connection (a download broken off in the middle)."""
        return self._add(_Rule("cut", n, None, 0, _methods(methods), after, _paths(paths)))

    def fail_always(self, status: int | None = 503, methods: set[str] | None = None, after: int = 0,
                    paths: str | None = None, armed_by: str | None = None) -> _Rule:
        """A permanent outage: every (matching) request fails (``status=None``: dropped) until ``heal``."""
        kind = "drop" if status is None else "error"
        return self._add(_Rule(kind, None, None, status or 0, _methods(methods), after, _paths(paths),
                               armed_by=_paths(armed_by)))

    def heal(self) -> None:
        """Remove every fault rule: forward everything from now on."""
        with self._lock:
            self._rules.clear()

    @property
    def pending_faults(self) -> int:
        """Count-limited faults not injected yet (0 also when only time-limited rules are left)."""
        with self._lock:
            return sum(r.remaining or 0 for r in self._rules if r.remaining is not None)

    def _add(self, rule: _Rule) -> _Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _decide(self, method: str, path: str) -> _Rule | None:
        """Count the request and pick the fault for it (None = forward)."""
        rule = self._pick(method, path)
        with self._lock:
            if len(self.stats.log) < 10_000:
                self.stats.log.append((method, path, rule.kind if rule else "forwarded"))
        return rule

    def _pick(self, method: str, path: str) -> _Rule | None:
        now = time.monotonic()
        with self._lock:
            self.stats.requests += 1
            self.stats.methods[method] = self.stats.methods.get(method, 0) + 1
            self._rules = [r for r in self._rules if not r.expired(now)]
            for rule in self._rules:
                if rule.armed_by is not None:  # dormant: the arming request itself still passes
                    if rule.armed_by.search(f"{method} {path}"):
                        rule.armed_by = None
                    continue
                if rule.applies(method, path):
                    if rule.after > 0:  # not active yet: this request passes it by
                        rule.after -= 1
                        continue
                    if rule.seconds is not None and rule.until is None:
                        rule.until = now + rule.seconds
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    rule.fired += 1
                    counter = _COUNTERS[rule.kind]
                    setattr(self.stats, counter, getattr(self.stats, counter) + 1)
                    return rule
            self.stats.forwarded += 1
            return None

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._sockets.add if add else self._sockets.discard)(sock)


def _methods(methods: set[str] | None) -> frozenset[str] | None:
    return frozenset(m.upper() for m in methods) if methods else None


def _paths(pattern: str | None) -> re.Pattern[str] | None:
    return re.compile(pattern) if pattern else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: tests read the stats instead
        pass

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None
        self.server.proxy._track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        if self._upstream is not None:
            self._upstream.close()
        self.server.proxy._track(self.connection, False)  # type: ignore[attr-defined]

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        rule = proxy._decide(self.command, self.path)
        if rule is not None and rule.kind == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return
        if rule is not None and rule.kind == "error":
            self._send_error(rule.status)
            return
        try:
            status, reason, headers, data = self._forward(proxy, body)
        except (OSError, http.client.HTTPException) as exc:
            if self._upstream is not None:
                self._upstream.close()
                self._upstream = None
            self._send_error(502, f"upstream unreachable: {exc}")
            return
        self.send_response_only(status, reason)
        length = len(data)
        for name, value in headers:
            if name.lower() == "content-length" and self.command == "HEAD":
                length = int(value)
            elif name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        cut = rule is not None and rule.kind == "cut"
        if cut:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2] if cut else data)
        self.wfile.flush()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _proxy  # noqa: N815

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, proxy: FaultProxy, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.upstream_timeout)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        self._upstream.request(self.command, self.path, body=body or None, headers=headers)
        response = self._upstream.getresponse()
        data = response.read()
        if response.will_close:
            self._upstream.close()
            self._upstream = None
        return response.status, response.reason, response.getheaders(), data

    def _send_error(self, status: int, message: str = "injected fault") -> None:
        code = _S3_ERROR_CODES.get(status, "ServiceUnavailable")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>fault-proxy</RequestId></Error>").encode()  # fmt: skip
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
