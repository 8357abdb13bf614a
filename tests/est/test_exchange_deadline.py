"""One deadline per EST exchange: a slow or silent server cannot keep tpmid waiting.

The reference server trickles its answer (a fault knob); a few raw servers here
trickle the HTTP header, or never finish the TLS handshake — things the
reference server does not do. A stop request cuts every such wait short.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tpmid import cancel
from tpmid.certfiles import load_pem_certificates
from tpmid.errors import EstTransportError
from tpmid.est.client import EstClient, make_session
from tpmid.testing.estserver import RunningEstServer
from tpmid.tls import client_tls


def _client(srv: RunningEstServer, deadline: float, label: str = "idevid") -> EstClient:
    tls = client_tls(trust_anchors=load_pem_certificates([srv.tls_ca], "TLS CA"))
    return EstClient(srv.url(label), make_session(tls), tls=tls, timeout=(5, 30),
                     deadline=deadline)


def test_an_answer_trickled_one_byte_at_a_time_ends_at_the_deadline(
        fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", faults={"trickle": "0.2s", "operations": ["cacerts"]})
    start = time.monotonic()
    with pytest.raises(EstTransportError, match=r"within the exchange deadline of 1.5 s "
                                                r"\(est.timeout.total\)") as e:
        _client(fresh_est_server, 1.5).cacerts()
    assert 1.4 < time.monotonic() - start < 6
    assert "retried on the retry schedule" in (e.value.hint or "")


def test_each_exchange_gets_its_own_deadline(fresh_est_server: RunningEstServer) -> None:
    client = _client(fresh_est_server, 3.0)
    for _ in range(4):  # more than the deadline in total: each exchange is bounded alone
        client.cacerts()
        time.sleep(0.8)


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """A TCP server running ``serve(conn)`` per connection (fault injection); its port."""
    stop = threading.Event()
    servers: list[socket.socket] = []

    def start(serve: Callable[[socket.socket], None]) -> int:
        srv = socket.create_server(("127.0.0.1", 0))
        srv.settimeout(0.2)
        servers.append(srv)

        def loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except OSError:
                    continue
                threading.Thread(target=_serve_quietly, args=(serve, conn), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        return int(srv.getsockname()[1])

    yield start
    stop.set()
    for s in servers:
        s.close()


def _serve_quietly(serve: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with conn:
        try:
            serve(conn)
        except OSError:
            pass


def _trickle_header(conn: socket.socket) -> None:
    conn.recv(65536)
    for b in b"HTTP/1.1 200 OK\r\nContent-Type: application/pkcs7-mime\r\n" * 100:
        conn.sendall(bytes([b]))
        time.sleep(0.05)


def test_a_header_trickled_over_plain_http_ends_at_the_deadline(
        raw_server: Callable[..., int]) -> None:
    port = raw_server(_trickle_header)
    client = EstClient(f"http://127.0.0.1:{port}/.well-known/est", make_session(None),
                       allow_http=True, timeout=(5, 30), deadline=1.0)
    start = time.monotonic()
    with pytest.raises(EstTransportError, match="exchange deadline of 1 s"):
        client.cacerts()
    assert time.monotonic() - start < 5


def test_a_server_that_never_finishes_the_tls_handshake_ends_at_the_deadline(
        raw_server: Callable[..., int], fresh_est_server: RunningEstServer) -> None:
    port = raw_server(lambda conn: time.sleep(20))  # accepts, reads nothing, says nothing
    tls = client_tls(trust_anchors=load_pem_certificates([fresh_est_server.tls_ca], "TLS CA"))
    client = EstClient(f"https://127.0.0.1:{port}/.well-known/est", make_session(tls), tls=tls,
                       timeout=(5, 30), deadline=1.0)
    start = time.monotonic()
    with pytest.raises(EstTransportError, match="exchange deadline"):
        client.cacerts()
    assert time.monotonic() - start < 5


def test_a_stop_request_cuts_a_slow_exchange_short(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", faults={"trickle": "1s", "operations": ["cacerts"]})
    old = signal.signal(signal.SIGUSR1, lambda *_: cancel.request())
    cancel.reset()
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        start = time.monotonic()
        with pytest.raises(cancel.Cancelled):
            _client(fresh_est_server, 60).cacerts()
        assert time.monotonic() - start < 3
    finally:
        signal.signal(signal.SIGUSR1, old)
        cancel.reset()
