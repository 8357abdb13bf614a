"""A small mutual-TLS server on loopback, for tests, benchmarks and demos.

It is a real Python ``ssl`` server: it requires a client certificate that
chains to the given CAs, records what each handshake produced (the peer's
certificate, the protocol version, or the error), and answers one minimal
HTTP request per connection with ``200`` and a JSON body naming the client
certificate, so ``requests`` can talk to it too. Each connection gets its own
thread, so concurrent handshakes really are concurrent.

Binds 127.0.0.1 (or ::1) only.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes


@dataclass(frozen=True)
class HandshakeRecord:
    """What the server saw for one connection."""

    peer_der: bytes | None
    version: str | None
    error: str | None

    @property
    def peer(self) -> x509.Certificate | None:
        """The client certificate, parsed."""
        return x509.load_der_x509_certificate(self.peer_der) if self.peer_der else None


class LoopbackTlsServer:
    """A threaded TLS server on loopback that demands and records client certificates."""

    def __init__(self, *, cert_chain: Sequence[x509.Certificate],
                 private_key: CertificateIssuerPrivateKeyTypes,
                 client_cas: Sequence[x509.Certificate] = (), require_client_cert: bool = True,
                 min_version: ssl.TLSVersion | None = None,
                 max_version: ssl.TLSVersion | None = None,
                 client_sigalgs: str | None = None, host: str = "127.0.0.1") -> None:
        """Configure the server; ``client_sigalgs`` restricts the CertificateRequest
        signature algorithms (OpenSSL syntax, e.g. ``"ECDSA+SHA384"``)."""
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("the loopback TLS server binds loopback addresses only")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if min_version is not None:
            ctx.minimum_version = min_version
        if max_version is not None:
            ctx.maximum_version = max_version
        with tempfile.TemporaryDirectory(prefix="tpmid-loopback-") as d:
            chain_path = os.path.join(d, "chain.pem")
            key_path = os.path.join(d, "key.pem")
            with open(chain_path, "wb") as f:
                for c in cert_chain:
                    f.write(c.public_bytes(serialization.Encoding.PEM))
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(private_key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
            ctx.load_cert_chain(chain_path, key_path)
        if client_cas:
            ctx.load_verify_locations(cadata=b"".join(
                c.public_bytes(serialization.Encoding.DER) for c in client_cas))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        if client_sigalgs:
            from tpmid.tls import _openssl

            lib = _openssl.load()
            lib.set_client_sigalgs(lib.ssl_ctx(ctx), client_sigalgs)
        self.ssl_context = ctx
        self.host = host
        self.port = 0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._records: list[HandshakeRecord] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to connect to."""
        return self.host, self.port

    @property
    def url(self) -> str:
        """``https://host:port/`` of the server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}/"

    @property
    def records(self) -> list[HandshakeRecord]:
        """Every handshake so far, in completion order."""
        with self._lock:
            return list(self._records)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[HandshakeRecord]:
        """Wait until ``n`` handshakes were recorded (or the timeout passed)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._records) >= n, timeout)
            return list(self._records)

    def start(self) -> LoopbackTlsServer:
        """Bind a free port and start accepting; returns ``self``."""
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.socket(fam)
        self._sock.bind((self.host, 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True,  # type: ignore[arg-type]
                             name=f"loopback-tls-{self.port}")
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._spawn(self._serve, conn)

    def _record(self, rec: HandshakeRecord) -> None:
        with self._cond:
            self._records.append(rec)
            self._cond.notify_all()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.ssl_context.wrap_socket(conn, server_side=True,
                                               do_handshake_on_connect=False)
        except OSError:
            conn.close()
            return
        with tls:
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as e:
                self._record(HandshakeRecord(None, None, f"{type(e).__name__}: {e}"))
                return
            peer = tls.getpeercert(binary_form=True)
            self._record(HandshakeRecord(peer, tls.version(), None))
            self._answer(tls, peer)

    @staticmethod
    def _answer(tls: ssl.SSLSocket, peer: bytes | None) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = tls.recv(4096)
                if not chunk:
                    return
                data += chunk
            subject = (x509.load_der_x509_certificate(peer).subject.rfc4514_string()
                       if peer else None)
            body = json.dumps({"peer_subject": subject, "tls_version": tls.version()}).encode()
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode()
                        + b"\r\nConnection: close\r\n\r\n" + body)
        except (ssl.SSLError, OSError):
            return

    def stop(self) -> None:
        """Stop accepting and wait for connection threads to finish."""
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=5)

    def __enter__(self) -> LoopbackTlsServer:
        if not self.port:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def request_once(context: ssl.SSLContext, host: str, port: int, server_hostname: str,
                 timeout: float = 10.0) -> bytes:
    """Connect, handshake, send one ``GET /`` and return the raw response.

    The round trip matters: in TLS 1.3 the client finishes its handshake before
    the server has checked the client certificate, so only the response proves
    the server accepted it.
    """
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: " + server_hostname.encode()
                        + b"\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                raise ssl.SSLError(f"the server closed the connection without answering "
                                   f"({data[:40]!r})")
            return data
