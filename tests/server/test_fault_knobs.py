"""The reference server's fault knobs: each one changes one thing about a correct answer.

The client's fault suite (tests/faults/) relies on these; here each knob is
checked with a plain client (``http.client`` + ``ssl``), not tpmid's.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.server.helpers import csr_body, make_csr, new_key, request
from tpmid.est import messages
from tpmid.testing.estserver import RunningEstServer

SERVER = Callable[..., RunningEstServer]


def _enroll_idevid(srv: RunningEstServer, cn: str = "IDevID") -> tuple[int, dict[str, str], bytes]:
    key = new_key()
    reply = request(srv.url("idevid", "simpleenroll"), cafile=srv.tls_ca, method="POST",
                    body=csr_body(make_csr(key, cn)),
                    headers={"Content-Type": messages.PKCS10, "Secret-Value": srv.secret})
    return reply.status, reply.headers, reply.body


def test_retry_after_header_is_sent_verbatim(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", faults={
        "status": 202, "retry_after_header": "99999999999999999999999999999"})
    status, headers, _ = _enroll_idevid(fresh_est_server)
    assert (status, headers["retry-after"]) == (202, "99999999999999999999999999999")


def test_oversize_pads_the_answer(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", faults={"oversize": 300000,
                                                 "operations": ["simpleenroll"]})
    status, _, body = _enroll_idevid(fresh_est_server)
    assert status == 200 and len(body) == 300000
    assert messages.decode_certs_only(body.rstrip())  # the real answer is still in front


@pytest.mark.parametrize(("fault", "check"), [
    ({"foreign_issuer": True},
     lambda cert, srv: cert.issuer.rfc4514_string().find("nobody trusts") >= 0),
    ({"expired": True},
     lambda cert, srv: cert.not_valid_after_utc < datetime.now(UTC)),
    ({"subject": "CN=someone-else"},
     lambda cert, srv: cert.subject.rfc4514_string() == "CN=someone-else"),
], ids=["foreign-issuer", "expired", "rewritten-subject"])
def test_issuance_faults_change_one_thing_about_the_certificate(
        fresh_est_server: RunningEstServer, fault: dict[str, object],
        check: Callable[..., bool]) -> None:
    fresh_est_server.configure("idevid", faults=fault)
    status, _, body = _enroll_idevid(fresh_est_server)
    assert status == 200
    (cert,) = messages.decode_certs_only(body)
    assert check(cert, fresh_est_server)


def _raw_get(srv: RunningEstServer, timeout: float) -> tuple[bytes, float, BaseException | None]:
    parts = urlsplit(srv.url("idevid", "cacerts"))
    ctx = ssl.create_default_context(cafile=str(srv.tls_ca))
    start = time.monotonic()
    got = b""
    error: BaseException | None = None
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=parts.hostname) as s:
        s.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError as e:
            error = e
    return got, time.monotonic() - start, error


def test_trickle_sends_one_byte_at_a_time(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", faults={"trickle": "0.2s", "operations": ["cacerts"]})
    got, _, _ = _raw_get_partial(fresh_est_server, seconds=1.5)
    head, _, body = got.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert 2 <= len(body) <= 12  # about one byte per 0.2 s, far from the whole answer


def _raw_get_partial(srv: RunningEstServer, seconds: float) -> tuple[bytes, float, None]:
    parts = urlsplit(srv.url("idevid", "cacerts"))
    ctx = ssl.create_default_context(cafile=str(srv.tls_ca))
    got = b""
    deadline = time.monotonic() + seconds
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=parts.hostname) as s:
        s.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            got += chunk
    return got, seconds, None


def test_reset_cuts_the_answer_with_a_tcp_reset(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", faults={"reset": True, "operations": ["cacerts"]})
    got, _, error = _raw_get(fresh_est_server, timeout=10)
    head, _, body = got.partition(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
               if line.lower().startswith(b"content-length")]
    # Never a whole answer: the reset either arrives after half the body or (the kernel
    # drops unread data on RST) before the client read anything.
    assert (lengths and len(body) < lengths[0]) or isinstance(error, OSError)


def test_fault_knobs_are_documented(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "est-server.md").read_text()
    for knob in ("retry_after_header", "trickle", "reset", "oversize", "foreign_issuer",
                 "expired", "subject"):
        assert f"      {knob}:" in doc
