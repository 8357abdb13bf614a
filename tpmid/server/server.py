"""The reference EST server: HTTPS on loopback, one thread per connection.

``EstServer(dir).start()`` serves the labels of ``dir/config.yaml`` until
``stop()``. TLS 1.2 and 1.3; client certificates are *requested but optional*
at the TLS layer (``CERT_OPTIONAL`` against the manufacturer and operator CAs),
so Secret-Value/Basic labels and mTLS labels share one port and each label's
policy is enforced per request by :class:`~tpmid.server.app.EstApp`. A client
certificate from an unknown CA fails the TLS handshake.

The TLS handshake runs in the connection's own thread, so a slow client never
holds up the accept loop. ``stop()`` is graceful: it stops accepting, closes
idle keep-alive connections, lets requests in flight finish (up to a timeout)
and cuts injected delays short.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509

from tpmid.errors import ConfigError
from tpmid.render import name as render_name
from tpmid.server.app import EstApp, Request
from tpmid.server.ca import IssueLog, cert_pem
from tpmid.server.config import ServerConfig, load_server_config
from tpmid.server.state import ServerState, est_url

log = logging.getLogger("tpmid.server")

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
_DRAIN_LIMIT = 1 << 20
_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class _Conn:
    sock: ssl.SSLSocket
    busy: bool = False


class _HttpServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose connections are TLS-wrapped in their own thread."""

    daemon_threads = True
    block_on_close = False  # EstServer.stop() waits for connections itself, with a timeout
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: EstServer, family: int) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup; loopback needs none.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.owner._serve_connection(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP/1.1 requests into :class:`Request` objects for the app."""

    protocol_version = "HTTP/1.1"
    server_version = "tpmid-est-server"
    sys_version = ""
    server: _HttpServer
    request: ssl.SSLSocket

    @property
    def _owner(self) -> EstServer:
        return self.server.owner

    def parse_request(self) -> bool:
        self._owner._mark(self.request, busy=True)
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            self._owner._mark(self.request, busy=False)
            if self._owner.stopping:
                self.close_connection = True

    def version_string(self) -> str:
        return self.server_version

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # one access line per request is written by _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_GET
    do_PUT = do_GET
    do_DELETE = do_GET
    do_PATCH = do_GET

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool = False) -> None:
        app = self._owner.app
        path = self.path.split("?", 1)[0]
        peer = self.request.getpeercert(binary_form=True)
        client = "-"
        if peer:
            try:
                client = render_name(x509.load_der_x509_certificate(peer).subject)
            except ValueError:
                client = "(unparseable)"
        body = b""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._send_simple(411, "chunked request bodies are not supported; send Content-Length",
                              path, client)
            return
        length_header = self.headers.get("Content-Length")
        if length_header:
            try:
                length = int(length_header)
                if length < 0:
                    raise ValueError
            except ValueError:
                self._send_simple(400, "bad Content-Length", path, client)
                return
            if length > app.config.max_body:
                # Drain what is reasonable first: closing with unread data makes
                # the kernel send RST, and the client would never see the 413.
                remaining = min(length, _DRAIN_LIMIT)
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 65536))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                self._send_simple(413, f"request body over {app.config.max_body} bytes",
                                  path, client)
                return
            body = self.rfile.read(length)
        version = self.request.version()
        tls_unique = None
        if version == "TLSv1.2":
            tls_unique = self.request.get_channel_binding("tls-unique")
        req = Request(
            method=self.command,
            path=path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            peer_cert_der=peer,
            tls_version=version,
            tls_unique=tls_unique,
        )
        resp = app.handle(req)
        if resp.drop:
            log.info("%s %s label=%s status=- client=%s %s %s", self.command, _clean(path),
                     resp.label, _clean(client), version, _clean(resp.note))
            self.close_connection = True
            return
        self.send_response(resp.status)
        for k, v in resp.headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.body)))
        if self._owner.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        # One line per request; never a header value or body (secrets live there).
        # Written before the body goes out, so a client that has its answer can
        # rely on the line being there.
        log.info("%s %s label=%s status=%d client=%s %s %s", self.command, _clean(path),
                 resp.label, resp.status, _clean(client), version, _clean(resp.note))
        self.end_headers()
        if not head and resp.body:
            self._write_body(resp)

    def _write_body(self, resp: Any) -> None:
        if resp.reset:
            # Half the answer, then RST (SO_LINGER 0): a connection reset mid-response.
            self.wfile.write(resp.body[:len(resp.body) // 2])
            self.wfile.flush()
            # Let the client read that half first: a reset discards unread data.
            self._owner._stop.wait(0.2)
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            self.close_connection = True
            self.request.close()
            return
        if not resp.trickle:
            self.wfile.write(resp.body)
            return
        for i in range(len(resp.body)):
            self.wfile.write(resp.body[i:i + 1])
            self.wfile.flush()
            if self._owner._stop.wait(resp.trickle):
                self.close_connection = True
                return

    def _send_simple(self, status: int, message: str, path: str, client: str) -> None:
        data = (message + "\n").encode()
        log.info("%s %s label=- status=%d client=%s %s", self.command, _clean(path), status,
                 _clean(client), message)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True


class EstServer:
    """The reference EST server over a directory made by ``init_server_dir``.

    >>> with EstServer(dir).start() as srv:          # doctest: +SKIP
    ...     srv.url("idevid", "cacerts")
    'https://127.0.0.1:40123/.well-known/est/idevid/cacerts'

    ``port=0`` picks a free port (read it from :attr:`port` after ``start``).
    Non-loopback hosts are refused unless ``allow_remote`` is set.
    """

    def __init__(self, dir: Path, host: str = "127.0.0.1", port: int = 0, *,
                 allow_remote: bool = False, clock: Callable[[], datetime] | None = None) -> None:
        if not is_loopback(host) and not allow_remote:
            raise ConfigError(f"refusing to listen on {host}: not a loopback address",
                              hint="this is a lab server; pass --allow-remote if you mean it")
        self.host = host.strip("[]")
        self._requested_port = port
        self.state = ServerState.load(dir)
        # An injected clock (tests of renewal schedules): the CAs issue and judge
        # validity by it, and the TLS layer leaves time checks to them.
        self.clock = clock
        for ca in self.state.cas.values():
            ca.clock = clock
        self._stop = threading.Event()
        self.app = EstApp(self.state.config, self.state.cas, IssueLog(self.state.paths.issued_log),
                          sleep=self._stop.wait)
        self._ssl_context = self._make_context(self.state.config)
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[int, _Conn] = {}
        self._cv = threading.Condition()

    # ------------------------------------------------------------------ lifecycle

    def _make_context(self, config: ServerConfig) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _TLS_VERSIONS[config.tls_min]
        ctx.maximum_version = _TLS_VERSIONS[config.tls_max]
        try:
            ctx.load_cert_chain(self.state.paths.tls_cert, self.state.paths.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the server's TLS certificate and key: {e}") from e
        # Requested, not required: Secret-Value/Basic labels share the port with mTLS labels.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(
            cadata=b"".join(cert_pem(ca.cert) for ca in self.state.cas.values()).decode())
        if self.clock is not None:
            # X509_V_FLAG_NO_CHECK_TIME: validity is judged by the CAs on the injected
            # clock (auth.issuer_of / CertificateAuthority.issued), not the wall clock.
            ctx.verify_flags = ctx.verify_flags | 0x200000
        return ctx

    def start(self) -> EstServer:
        """Bind and serve in a background thread; returns self."""
        if self._httpd is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._httpd = _HttpServer((self.host, self._requested_port), self, family)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.host}:{self._requested_port}: "
                              f"{e.strerror or e}") from e
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"est-server-{self.port}", daemon=True)
        self._thread.start()
        log.info("EST server listening on %s", self.base_url)
        return self

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._httpd is None:
            raise RuntimeError("EstServer.port is known only after start()")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``https://host:port/``."""
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{h}:{self.port}/"

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has begun."""
        return self._stop.is_set()

    def url(self, label: str | None = None, operation: str | None = None) -> str:
        """The URL of ``label`` (None: label-less) and optionally one ``operation``."""
        return est_url(self.host, self.port, label, operation)

    def reload(self) -> None:
        """Re-read ``config.yaml`` and ``lab.yaml``; on error the old config stays (ConfigError)."""
        config = load_server_config(self.state.paths.config, self.state.paths.lab)
        context = self._make_context(config)
        self.state.config = config
        self.app.set_config(config)
        self._ssl_context = context
        log.info("configuration reloaded from %s", self.state.paths.config)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully: no new connections, idle ones closed, in-flight ones finish."""
        if self._httpd is None or self._stop.is_set():
            return
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._cv:
            for conn in self._conns.values():
                if not conn.busy:
                    _shutdown_socket(conn.sock)
            self._cv.wait_for(lambda: not self._conns, timeout=timeout)
            for conn in self._conns.values():
                _shutdown_socket(conn.sock)
        if self._thread is not None:
            self._thread.join(timeout)
        log.info("EST server on port %d stopped", self.port)

    def __enter__(self) -> EstServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ connections

    def _mark(self, sock: ssl.SSLSocket, *, busy: bool) -> None:
        with self._cv:
            conn = self._conns.get(id(sock))
            if conn is not None:
                conn.busy = busy

    def _serve_connection(self, sock: socket.socket, address: Any) -> None:
        """Handshake, then run the HTTP handler on this connection (worker thread)."""
        assert self._httpd is not None
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            tls = self._ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as e:
            log.info("connection from %s failed before TLS: %s", address[0], e)
            sock.close()
            return
        try:
            tls.do_handshake()
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "reason", None) or e
            log.info("TLS handshake with %s failed: %s", address[0], reason)
            tls.close()
            return
        with self._cv:
            self._conns[id(tls)] = _Conn(tls)
        try:
            tls.settimeout(IDLE_TIMEOUT)
            _Handler(tls, address, self._httpd)
        except (OSError, ssl.SSLError) as e:
            log.debug("connection from %s: %s", address[0], e)
        finally:
            with self._cv:
                self._conns.pop(id(tls), None)
                self._cv.notify_all()
            try:
                tls.close()
            except OSError:
                pass


def _clean(text: str) -> str:
    """Client-controlled text (paths, subjects) made safe for a one-line log entry."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def _shutdown_socket(sock: ssl.SSLSocket) -> None:
    # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops the SSL
    # object under the feet of the thread that is reading from it.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
