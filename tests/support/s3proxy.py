"""An HTTP reverse proxy for tests, placed between S3 clients and moto's S3 server, that can inject faults.

The proxy listens on a free 127.0.0.1 port and forwards each request to the upstream server with the
method, path, headers and body unchanged, then sends the upstream status, headers and body back. Rules
added with :meth:`S3FaultProxy.add_rule` change what happens to matching requests:

- ``stall``: wait ``stall_s`` seconds before forwarding, so a client with a shorter read timeout
  times out. The wait is capped at :data:`MAX_STALL_S` and ends early when the proxy closes.
- ``delay``: wait ``delay_ms`` milliseconds before forwarding, to make a job slow without failing it.
  The same cap and early end apply.
- ``error_500``: return ``500 InternalError`` with an S3 XML error body, without forwarding.
- ``slow_down_503``: return ``503 SlowDown`` with an S3 XML error body, without forwarding.
- ``drop``: close the connection without sending any response, without forwarding.

A rule matches on the HTTP method and on a substring of the URL-decoded path (``/bucket/key``), fires
for a ``fraction`` of the matching requests drawn from a seeded ``random.Random``, and may be limited to
its first ``max_hits`` firings. The first rule that fires decides a request. Only the standard library is
used. All methods are thread-safe.
"""

from __future__ import annotations

import http.client
import logging
import random
import sys
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
MAX_STALL_S = 30.0
UPSTREAM_TIMEOUT_S = 30.0
COPY_CHUNK_BYTES = 64 * 1024
ACTIONS = ("stall", "delay", "error_500", "slow_down_503", "drop")

# Headers that describe one HTTP connection rather than the message, so they are not copied across.
_HOP_BY_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
_ERROR_RESPONSES = {
    "error_500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "slow_down_503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclass
class FaultRule:
    """One fault: which requests it matches, what it does to them, and how often it has fired."""

    action: str
    method: str | None = None
    key_contains: str | None = None
    fraction: float = 1.0
    max_hits: int | None = None
    stall_s: float = 0.0
    delay_ms: int = 0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.key_contains is not None and self.key_contains not in path:
            return False
        return self.max_hits is None or self.hits < self.max_hits


@dataclass(frozen=True)
class InjectedFault:
    """A record of one request that a rule changed."""

    action: str
    method: str
    path: str


class S3FaultProxy:
    """A threaded reverse proxy in front of ``upstream_url`` that injects faults by rule.

    Use as a context manager, or call :meth:`start` and :meth:`close`. Clients use :attr:`endpoint_url`.
    ``seed`` fixes the random draws of rules whose ``fraction`` is below 1, so a run with the same
    seed and the same request order injects the same faults.
    """

    def __init__(self, upstream_url: str, seed: int = 0) -> None:
        upstream = urlsplit(upstream_url)
        if upstream.scheme != "http" or not upstream.hostname or upstream.port is None:
            raise ValueError(f"upstream_url must be http://HOST:PORT, got {upstream_url!r}")
        self.upstream_host = upstream.hostname
        self.upstream_port = upstream.port
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._injected: list[InjectedFault] = []
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("S3FaultProxy is not listening: call start() first")
        return f"http://{LOOPBACK_HOST}:{self._server.server_address[1]}"

    @property
    def injected(self) -> list[InjectedFault]:
        """A copy of the faults injected so far, in the order they were decided."""
        with self._lock:
            return list(self._injected)

    def add_rule(
        self,
        action: str,
        *,
        method: str | None = None,
        key_contains: str | None = None,
        fraction: float = 1.0,
        max_hits: int | None = None,
        stall_s: float = 0.0,
        delay_ms: int = 0,
    ) -> FaultRule:
        """Add a rule and return it. ``method=None`` or ``key_contains=None`` match every request.

        Raises:
            ValueError: an unknown action, a fraction outside 0..1, a max_hits below 1, a stall
                rule whose ``stall_s`` is not in (0, MAX_STALL_S], or a delay rule whose ``delay_ms``
                is not in (0, MAX_STALL_S x 1000].
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown fault action {action!r}, expected one of {ACTIONS}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be between 0 and 1, got {fraction!r}")
        if max_hits is not None and max_hits < 1:
            raise ValueError(f"max_hits must be at least 1 or None, got {max_hits!r}")
        if action == "stall" and not 0.0 < stall_s <= MAX_STALL_S:
            raise ValueError(f"stall_s must be above 0 and at most {MAX_STALL_S} s, got {stall_s!r}")
        if action == "delay" and not 0 < delay_ms <= MAX_STALL_S * 1000:
            raise ValueError(f"delay_ms must be above 0 and at most {MAX_STALL_S * 1000:.0f} ms, got {delay_ms!r}")
        rule = FaultRule(action, method.upper() if method else None, key_contains, fraction, max_hits, stall_s, delay_ms)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        """Remove every rule, so requests pass through unchanged. The record of injected faults stays."""
        with self._lock:
            self._rules.clear()

    def choose_rule(self, method: str, path: str) -> FaultRule | None:
        """Return the first matching rule that fires for this request, counting the hit, or ``None``."""
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, path):
                    continue
                # A fraction of 1 draws no number, so adding such a rule leaves the seeded sequence alone.
                if rule.fraction < 1.0 and self._random.random() >= rule.fraction:
                    continue
                rule.hits += 1
                self._injected.append(InjectedFault(rule.action, method, path))
                return rule
        return None

    def wait_stall(self, stall_s: float) -> None:
        """Sleep ``stall_s`` seconds, capped at MAX_STALL_S, or less when the proxy closes meanwhile."""
        self._closing.wait(min(stall_s, MAX_STALL_S))

    def start(self) -> S3FaultProxy:
        """Bind a free port on 127.0.0.1 and serve requests on a daemon thread."""
        if self._server is not None:
            raise RuntimeError(f"S3FaultProxy is already listening at {self.endpoint_url}")
        server = _ProxyServer((LOOPBACK_HOST, 0), _ProxyHandler)
        server.proxy = self
        self._closing.clear()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        logger.info("S3 fault proxy at %s forwards to %s:%d", self.endpoint_url, self.upstream_host, self.upstream_port)
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting requests, end every stall early and close the listening socket. Safe to call twice.

        Requests already being handled finish on their own daemon threads.
        """
        self._closing.set()
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def s3_error_body(code: str, message: str, resource: str) -> bytes:
    """Return an S3 XML error document, the body S3 sends with an error status."""
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: S3FaultProxy

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        # A client that closes its connection while the proxy reads or writes is expected here
        # (read timeouts, dropped connections), so it is logged without the socketserver traceback.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionResetError, BrokenPipeError, TimeoutError)):
            logger.debug("S3 fault proxy: client %s closed the connection: %s", client_address, error)
            return
        logger.exception("S3 fault proxy: request from %s failed", client_address)


class _ProxyHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps client connections open between requests, as botocore's connection pool expects.
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _handle(self) -> None:
        proxy = self.server.proxy
        # The whole request body is read before any rule applies, so an early response leaves the
        # connection at a message boundary and the client can reuse it.
        body = self._read_request_body()
        path = unquote(urlsplit(self.path).path)
        rule = proxy.choose_rule(self.command, path)
        if rule is not None:
            logger.info("S3 fault proxy: %s on %s %s", rule.action, self.command, path)
        if rule is not None and rule.action == "drop":
            self.close_connection = True
            return
        if rule is not None and rule.action in _ERROR_RESPONSES:
            self._send_error_response(rule.action, path)
            return
        if rule is not None and rule.action == "stall":
            proxy.wait_stall(rule.stall_s)
        if rule is not None and rule.action == "delay":
            proxy.wait_stall(rule.delay_ms / 1000)
        try:
            self._forward(proxy, body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up first, for example after its read timeout or once it had read enough.
            self.close_connection = True

    def _read_request_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked_body(self) -> bytes:
        # Keeps the chunk framing, so the upstream server receives the body bytes exactly as sent.
        parts = []
        while True:
            size_line = self.rfile.readline()
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            parts.append(self.rfile.read(size + 2))
        while True:
            trailer_line = self.rfile.readline()
            parts.append(trailer_line)
            if trailer_line in (b"\r\n", b"\n", b""):
                return b"".join(parts)

    def _send_error_response(self, action: str, path: str) -> None:
        status, reason, code, message = _ERROR_RESPONSES[action]
        body = s3_error_body(code, message, path)
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, proxy: S3FaultProxy, body: bytes) -> None:
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP_HEADERS or name.lower() == "transfer-encoding":
                    upstream.putheader(name, value)
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            self._relay_response(response)
        finally:
            upstream.close()

    def _relay_response(self, response: http.client.HTTPResponse) -> None:
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP_HEADERS:
                self.send_header(name, value)
        length = response.getheader("Content-Length")
        has_body = self.command != "HEAD" and response.status not in (204, 304)
        if has_body and length is None:
            # http.client has already removed any chunk framing, so the body is sent with its length.
            data = response.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.end_headers()
        while has_body:
            chunk = response.read(COPY_CHUNK_BYTES)
            if not chunk:
                break
            self.wfile.write(chunk)
