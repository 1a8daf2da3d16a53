"""The gunicorn worker that serves Fable: gthread, with whole requests read before a thread
takes them.

gthread gives a connection to a pool thread as soon as its first bytes arrive, and the
thread then blocks until the rest of the request is in: 64 clients that sent half a header
and stopped held every thread, and ``/healthz`` with them. Here the main loop reads every
waiting connection without blocking, as nginx does, and submits a request to the pool only
once its head and body have arrived; a waiting connection costs a buffer, not a thread.

- A request must arrive whole within ``FABLE_READ_TIMEOUT_S`` of the connection (or of the
  first byte after a kept-alive one); then 408 and the connection closes.
- The framing is read by h11 (``Pending``), never by hand: a malformed request (a signed or
  prefixed chunk size, a bad field, both Content-Length and Transfer-Encoding) gets 400
  from the main loop and never reaches gunicorn's parser or a thread.
- A head, chunk-size line or trailer over ``MAX_HEAD_BYTES`` gets 431 (400 after the
  head). A body over its limit goes to the app, which refuses it (413, in each API's
  error shape) from what is already held, and the connection then closes: nothing is
  ever read from a slow client in a thread. Chunked framing counts too: past
  ``MAX_HEAD_BYTES`` of it on top of the body limit, 413 from the main loop.
- The body limit is ``FABLE_MAX_BODY_BYTES``, decided from the head: only the training
  page's upload (POST /train) from a client allowed to train may send
  ``FABLE_TRAIN_UPLOAD_BYTES``, so an anonymous client never makes a worker buffer more
  (``body_limit_for``; the app decides with the same rule).
- An answer's writes have a deadline, ``FABLE_WRITE_TIMEOUT_S``: a client that stops
  reading is dropped, and its generation cancelled.
- Closing lingers in the main loop too (the kernel would otherwise answer a client still
  sending with a reset, which can cut the answer off); gunicorn lingers in its main thread,
  where one silent client stalled every connection of the worker for 2 s.
- gunicorn's own error pages (400, 414, 431, ...) become JSON with the app's security
  headers.

TLS and HTTP/2 (not used by the Space, whose proxy terminates TLS) keep gthread's way.
"""

from __future__ import annotations

import errno
import html
import json
import logging
import selectors
import socket
import time
from collections.abc import Callable
from functools import partial

import h11
from gunicorn.http import get_parser
from gunicorn.http2 import negotiation
from gunicorn.util import split_request_uri, unquote_to_wsgi_str
from gunicorn.workers.gthread import TConn, ThreadWorker

from app.platform.settings import Settings
from app.platform.web import is_train_upload  # the app's rule; adds no module the master lacks

#: Largest request head (request line and header fields), as nginx's default buffers.
MAX_HEAD_BYTES = 32 * 1024
#: How long a closed connection is drained, and how much of it at most.
HEAD_TOO_LARGE = (431, "Request Header Fields Too Large",
                  f"the request head is over {MAX_HEAD_BYTES} bytes")
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024
_RECEIVE = 64 * 1024
#: Each connection's kernel send buffer (Linux doubles it). Autotuned, it grows to 4 MB,
#: which a client that never reads takes a long time to fill before a write even waits;
#: bounded, the write deadline drops it soon after it stops reading.
SEND_BUFFER_BYTES = 128 * 1024


def error_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection: ``{"error": message}`` with the
    security headers every page of the app carries."""
    from app.platform.security import SECURITY_HEADERS  # not at import: the master loads this module

    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close",
            *(f"{name}: {value}" for name, value in SECURITY_HEADERS.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def body_limit_for(settings: Settings) -> Callable[[h11.Request], int]:
    """Each request's body limit, from its head: ``FABLE_TRAIN_UPLOAD_BYTES`` for the
    training page's upload by a client allowed to train (app.platform.web.is_train_upload,
    the rule the app applies too), else ``FABLE_MAX_BODY_BYTES``."""
    def body_limit(request: h11.Request) -> int:
        upload = is_train_upload(request.method.decode("latin-1"), app_path(request.target),
                                 authorization(request), settings.admin_token)
        return settings.train_upload_bytes if upload else settings.max_body_bytes
    return body_limit


def app_path(target: bytes) -> str:
    """The path the app will see for a request target: gunicorn's PATH_INFO (the target's
    path, percent-decoded) as werkzeug reads it. The worker must not judge a target
    differently from the app (``/tr%61in``, ``//train``, ``http://host/train``)."""
    try:
        path = unquote_to_wsgi_str(split_request_uri(target.decode("latin-1")).path)
    except ValueError:  # gunicorn refuses it too
        return ""
    return "/" + path.encode("latin-1").decode(errors="replace").lstrip("/")


def authorization(request: h11.Request) -> str | None:
    """The Authorization header as the app reads it: repeated fields joined with ","
    (as gunicorn joins them), decoded as latin-1 (as WSGI does); None when absent."""
    values = [value for name, value in request.headers if name == b"authorization"]
    return b",".join(values).decode("latin-1") if values else None


class Pending:
    """What a waiting connection has sent so far, and whether it makes a whole request.

    The framing (request line, fields, Content-Length or chunks, trailers) is read by h11,
    a maintained HTTP/1.1 parser, fed each piece as it arrives: a client that sends a byte
    at a time costs the main loop no more than one that sends it all, and no line is
    buffered past ``MAX_HEAD_BYTES``. gunicorn's parser later reads the same bytes; only a
    request h11 found well framed (or over the body limit) ever reaches it.

    ``body_limit`` gives the body limit of a request from its head (``body_limit_for``);
    it holds for the rest of that request."""

    def __init__(self, data: bytes, deadline: float,
                 body_limit: Callable[[h11.Request], int]) -> None:
        self.data = bytearray(data)
        self.deadline = deadline
        self.body_limit = body_limit
        self.max_body: int | None = None  # the limit once the head is in
        self.sent_continue = False  # answered "Expect: 100-continue" ourselves
        self.whole = False
        self.expects_continue = False
        self.refusal: tuple[int, str, str] | None = None  # status, reason, message
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._started = False  # a byte other than an empty line has come
        self._fed = 0  # bytes of data handed to the parser (or skipped)
        self._body_start: int | None = None  # where the head ended
        self._content = 0  # body content (chunked: without its framing) read so far

    def state(self) -> str:
        """"more" (wait), "ready" (submit: whole, or the app can refuse it from what is
        here) or "refused" (``refusal`` says how to answer: malformed framing, a head or
        a chunk line too long, a body whose framing passes the limit)."""
        if self.refusal:
            return "refused"
        if not self._started:  # empty lines before a request are ignored (RFC 9112, 2.2)
            self._fed = len(self.data) - len(self.data.lstrip(b"\r\n"))
            if self._fed == len(self.data):
                return "more" if self._fed <= MAX_HEAD_BYTES else self._refuse(*HEAD_TOO_LARGE)
            self._started = True
        if self._fed < len(self.data):
            self._parser.receive_data(bytes(self.data[self._fed:]))
            self._fed = len(self.data)
        try:
            verdict = self._read_events()
        except h11.RemoteProtocolError as e:
            return self._refuse(*self._explain(e))
        if verdict or self._body_start is None:
            return verdict or "more"
        max_body = self.max_body  # set with _body_start, from the head
        if self._content > max_body:
            return "ready"  # the app refuses it from what is here (413, in its API's shape)
        # Framing counts too: chunk-size lines, extensions and trailers get the head's
        # allowance on top of the body limit (a client's own framing is a few bytes a
        # chunk; tiny chunks with long extensions would otherwise be buffered for ever).
        if len(self.data) - self._body_start > max_body + MAX_HEAD_BYTES:
            return self._refuse(413, "Content Too Large", f"request body over {max_body} bytes "
                                f"with more than {MAX_HEAD_BYTES} bytes of chunked framing")
        return "more"

    def _read_events(self) -> str | None:
        while True:
            event = self._parser.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Request):
                self._body_start = self._fed - len(self._parser.trailing_data[0])
                self.max_body = self.body_limit(event)
                self.expects_continue = self._parser.they_are_waiting_for_100_continue
                fields = {name for name, _ in event.headers}
                if b"content-length" in fields and b"transfer-encoding" in fields:
                    return self._refuse(400, "Bad Request", "a request may not have both "
                                        "Content-Length and Transfer-Encoding")
                length = dict(event.headers).get(b"content-length")
                if length is not None and int(length) > self.max_body:
                    return "ready"  # refused from its Content-Length alone
            elif isinstance(event, h11.Data):
                self._content += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.whole = True
                return "ready"

    def _explain(self, error: h11.RemoteProtocolError) -> tuple[int, str, str]:
        if self._body_start is None:
            if error.error_status_hint == 431:
                return HEAD_TOO_LARGE
            if error.error_status_hint == 501:
                return 501, "Not Implemented", str(error)
        elif error.error_status_hint == 431:  # an endless chunk-size line or trailer
            return 400, "Bad Request", \
                f"a chunk-size line or trailer field is over {MAX_HEAD_BYTES} bytes"
        detail = str(error)  # h11's words quote the client's bytes: a short piece of them
        return 400, "Bad Request", "malformed request: " + (
            detail if len(detail) <= 120 else detail[:120] + "...")

    def _refuse(self, status: int, reason: str, message: str) -> str:
        self.refusal = (status, reason, message)
        return "refused"


class RequestBytesFilter(logging.Filter):
    """Keeps what a client sent out of gunicorn's error log: its warning about an invalid
    request quotes the request line or field (a URL can carry a token or a prompt), and
    its error for a failed request logs the query string. The kind of error stays."""

    PREFIX = "Invalid request from ip="

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            ip, _, error = message[len(self.PREFIX):].partition(": ")
            kind = error.split("'", 1)[0].split(": ", 1)[0].rstrip()
            record.msg, record.args = f"{self.PREFIX}{ip}: {kind}", None
        elif record.msg == "Error handling request %s %s" and isinstance(record.args, tuple):
            method, uri = record.args
            record.args = (str(method)[:20], str(uri).partition("?")[0][:200])
        return True


class Connection(TConn):
    """gthread's connection, whose graceful close lingers in the worker's main loop."""

    def __init__(self, cfg, sock, client, server, linger) -> None:
        super().__init__(cfg, sock, client, server)
        self.linger = linger
        self.pending: Pending | None = None  # the request being served, as it arrived

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self.linger(self.sock)
        else:
            super().close()


class BufferingThreadWorker(ThreadWorker):
    """gunicorn's gthread worker that submits only whole requests to its threads."""

    def init_process(self) -> None:
        settings = Settings.load()
        self.body_limit = body_limit_for(settings)
        self.read_timeout = settings.read_timeout_s
        self.write_timeout = settings.write_timeout_s
        self.waiting: dict[TConn, Pending] = {}
        self.lingering: dict[socket.socket, tuple[float, int]] = {}  # deadline, bytes read
        self.log.error_log.addFilter(RequestBytesFilter())
        super().init_process()

    def _buffers(self, conn: TConn) -> bool:
        return not (self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, conn.client))

    # ---- waiting for a whole request ----------------------------------------------------

    def accept(self, listener) -> None:
        try:
            sock, client = listener.accept()
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        self.nr_conns += 1
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        except OSError:  # not a TCP socket (a Unix one): its own default
            pass
        self.enqueue_req(Connection(self.cfg, sock, client, listener.getsockname(), self._linger))

    def enqueue_req(self, conn: TConn) -> None:
        """Every way into the thread pool (a new connection, a kept-alive one with a next
        request, bytes read ahead) passes here: wait in the poller for a whole request."""
        if not self._buffers(conn):
            return super().enqueue_req(conn)
        held = conn.parser.unreader.take_buffered() if conn.parser else b""
        pending = Pending(held, time.monotonic() + self.read_timeout, self.body_limit)
        conn.sock.setblocking(False)
        self.waiting[conn] = pending
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        if held:
            self._advance(conn, pending)

    def _on_readable(self, conn: TConn, sock: socket.socket) -> None:
        data = _receive(sock)
        if data is None:
            return
        if not data:  # the client closed (or reset) the connection
            self._forget(conn)
            self.nr_conns -= 1
            conn.close()
            return
        pending = self.waiting[conn]
        pending.data += data
        self._advance(conn, pending)

    def _advance(self, conn: TConn, pending: Pending) -> None:
        state = pending.state()
        if state == "more":
            if pending.expects_continue and not pending.sent_continue:
                pending.sent_continue = _send(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._forget(conn)
        if state == "refused":
            return self._refuse(conn, *pending.refusal)
        if conn.parser is None:
            conn.parser = get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(pending.data))
        conn.data_ready = True  # gthread's own wait for a first byte is not needed
        conn.pending = pending
        super().enqueue_req(conn)

    def _forget(self, conn: TConn) -> None:
        del self.waiting[conn]
        self.poller.unregister(conn.sock)

    def _refuse(self, conn: TConn, status: int, reason: str, message: str) -> None:
        # the status only: a message may quote what the client sent
        self.log.warning("Refused request from ip=%s: %d %s", conn.client[0], status, reason)
        _send(conn.sock, error_response(status, reason, message))
        self.nr_conns -= 1
        self._linger(conn.sock)

    def handle_request(self, req, conn):
        """Writes have a deadline: a client that stops reading for ``FABLE_WRITE_TIMEOUT_S``
        is dropped (the answer's iterator is closed, which cancels its generation), so it
        holds a thread no longer than that. A request that arrived incomplete (a body over
        the limit) closes its connection after the answer: the rest of its body is never
        read in a thread."""
        pending = conn.pending
        if pending is not None:
            if not pending.whole:
                req.must_close = True
            if pending.sent_continue:
                req._expected_100_continue = False  # the 100 went out already
        if self._buffers(conn):
            conn.sock.settimeout(self.write_timeout)  # each send, and each sendfile chunk
        try:
            return super().handle_request(req, conn)
        except TimeoutError:
            self.log.info("Dropped ip=%s: it read nothing for %g s", conn.client[0],
                          self.write_timeout)
            return False

    # ---- a full connection table -------------------------------------------------------

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread stops accepting once ``worker_connections`` are open, and then a client
        that sent half a request a thousand times shuts everyone out (/healthz waited 9.6 s).
        Here the table sheds instead: connections that have not sent a whole request,
        oldest first, then idle kept-alive ones, until 1/16 of the table is free again."""
        if not enabled and self.alive and self._shed(self.worker_connections * 15 // 16):
            return  # room made: go on accepting
        super().set_accept_enabled(enabled)

    def _shed(self, target: int) -> bool:
        for conn, pending in list(self.waiting.items()):  # in the order they began waiting
            if self.nr_conns <= target:
                break
            self._forget(conn)
            if pending.data:
                self._refuse(conn, 503, "Service Unavailable",
                             "too many connections are waiting for their requests; retry")
            else:
                self.nr_conns -= 1
                conn.close()
        while self.nr_conns > target and self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self.nr_conns -= 1
            conn.close()
        return self.nr_conns < self.worker_connections

    # ---- closing ------------------------------------------------------------------------

    def finish_request(self, conn, fs) -> None:
        conn.pending = None
        super().finish_request(conn, fs)

    def _linger(self, sock: socket.socket) -> None:
        """Half-close, then read and drop what the client still sends, for LINGER_S at
        most, before closing: its last answer reaches it whole."""
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self.lingering[sock] = (time.monotonic() + LINGER_S, 0)
        self.poller.register(sock, selectors.EVENT_READ, self._drain)

    def _drain(self, sock: socket.socket) -> None:
        deadline, read = self.lingering[sock]
        data = _receive(sock)
        if data is None:
            return
        if data and read + len(data) < LINGER_BYTES:
            self.lingering[sock] = (deadline, read + len(data))
            return
        del self.lingering[sock]
        self.poller.unregister(sock)
        sock.close()

    def murder_pending(self) -> None:
        """Each turn of the main loop: close what waited too long (408 to a client that
        began a request), and end lingering closes that are due."""
        super().murder_pending()
        now = time.monotonic()
        for conn, pending in [(c, p) for c, p in self.waiting.items() if p.deadline <= now]:
            self._forget(conn)
            if pending.data:
                self._refuse(conn, 408, "Request Timeout",
                             f"the request did not arrive within {self.read_timeout:g} s")
            else:
                self.nr_conns -= 1
                conn.close()
        for sock in [s for s, (deadline, _) in self.lingering.items() if deadline <= now]:
            del self.lingering[sock]
            self.poller.unregister(sock)
            sock.close()

    # ---- gunicorn's own errors ----------------------------------------------------------

    def handle_error(self, req, client, addr, exc) -> None:
        """gunicorn's answer (status and message, logged as it logs them), sent as JSON
        with the security headers instead of its bare HTML page."""
        page = _Captured()
        super().handle_error(req, page, addr, exc)
        status_line, _, rest = page.data.partition(b"\r\n")
        _, status, reason = status_line.decode("latin-1").split(" ", 2)
        message = rest.partition(b"</h1>")[2].partition(b"</body>")[0]
        text = html.unescape(message.decode("latin-1").strip()) or reason
        _send(client, error_response(int(status), reason, text), blocking=True)


class _Captured:
    """Stands in for the socket gunicorn writes its error page to."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def sendall(self, data: bytes) -> None:
        self.data += data


def _receive(sock: socket.socket) -> bytes | None:
    """What a readable non-blocking socket holds: b"" once the client has closed or reset
    it, None when there was nothing after all."""
    try:
        return sock.recv(_RECEIVE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes, blocking: bool = False) -> bool:
    """Send a short answer; from the main loop never blocking (a client that does not read
    just does not get it)."""
    try:
        if blocking:
            sock.sendall(data)
        else:
            sock.send(data)
        return True
    except OSError:
        return False
