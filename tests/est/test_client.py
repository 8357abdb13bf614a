"""EstClient against real servers on loopback: the reference EST server and canned HTTPS servers.

Server authentication only here (Secret-Value / Basic labels), CSRs signed by
software keys: this file is about the protocol. Mutual TLS with TPM keys is in
``test_client_tpm.py``; whole enrollments in ``tests/lifecycle/test_enroll.py``.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.est.test_client_support import (
    CannedServer,
    Seen,
    TestCa,
    name,
    server_identity,
    spki,
)
from tpmid.config import SanConfig, SubjectConfig
from tpmid.csr import build_csr
from tpmid.errors import (
    ConfigError,
    EstAuthError,
    EstProtocolError,
    EstRetryLater,
    EstServerError,
    EstTransportError,
    VerificationError,
)
from tpmid.est import messages
from tpmid.est.client import EstClient, est_base_url, make_session
from tpmid.server import EstServer, init_server_dir
from tpmid.testing.estserver import RunningEstServer
from tpmid.tls import ClientTls, client_tls

CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"


class FakeClock:
    """``now`` and ``sleep`` for the 202 loop: sleeping advances the clock, nothing waits."""

    def __init__(self, start: datetime | None = None) -> None:
        self.t = start or datetime.now(UTC)
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += timedelta(seconds=s)


def load(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@pytest.fixture
def tls_contexts() -> Iterator[Callable[..., ClientTls]]:
    made: list[ClientTls] = []

    def make(**kw: Any) -> ClientTls:
        t = client_tls(**kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def client_for(tls_contexts: Callable[..., ClientTls]) -> Callable[..., EstClient]:
    """``client_for(srv, label, secret=..., anchors=..., **EstClient kwargs)``."""

    def make(srv: RunningEstServer, label: str = "idevid", *, secret: str | None = None,
             anchors: list[x509.Certificate] | None = None, tls_version: str | None = None,
             **kw: Any) -> EstClient:
        version = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}.get(
            tls_version or "")
        tls = tls_contexts(trust_anchors=anchors if anchors is not None else load(srv.tls_ca),
                           max_version=version)
        headers = {"Secret-Value": secret} if secret is not None else None
        return EstClient(srv.url(label), make_session(tls), tls=tls, headers=headers, **kw)

    return make


def software_csr(cn: str = "device-1", key: ec.EllipticCurvePrivateKey | None = None,
                 challenge: str | None = None) -> tuple[x509.CertificateSigningRequest, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return build_csr(key, SubjectConfig(cn=cn), SanConfig(), hash_name="sha256",
                     challenge_password=challenge), key


# --------------------------------------------------------------------------- operations


LABEL_CAS = {"idevid label": ("idevid", "manufacturer_ca"),
             "ldevid label": ("ldevid", "operator_ca"),
             "edgeca label": ("edgeca", "operator_ca")}


@pytest.mark.parametrize(("label", "ca"), LABEL_CAS.values(), ids=LABEL_CAS.keys())
def test_cacerts_returns_the_labels_issuing_ca(
    label: str, ca: str, est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    certs = client_for(est_server, label).cacerts()
    assert certs == load(getattr(est_server, ca))


def test_csrattrs_lists_key_type_curve_and_signature_algorithm(
    est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    attrs = client_for(est_server, "idevid").csrattrs()
    described = [(a.oid.dotted_string, a.value_oids) for a in attrs]
    assert described == [("1.2.840.10045.2.1", ("1.2.840.10045.3.1.7",)),
                         ("1.2.840.10045.4.3.2", ())]


def test_csrattrs_no_content_means_no_attributes(
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    fresh_est_server.configure("idevid", csrattrs=[])
    assert client_for(fresh_est_server, "idevid").csrattrs() == []


def test_simpleenroll_with_secret_value_returns_the_certificate_for_the_csr_key(
    est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    csr, key = software_csr("device-enroll")
    resp = client_for(est_server, "idevid", secret=est_server.secret).simpleenroll(csr)
    assert spki(resp.certificate) == spki(key)
    assert resp.certificate.subject == name("device-enroll")
    assert resp.certificate.issuer == load(est_server.manufacturer_ca)[0].subject


def test_serverkeygen_returns_a_key_that_matches_its_certificate(
    est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    csr, key = software_csr("device-keygen")
    resp = client_for(est_server, "idevid", secret=est_server.secret).serverkeygen(csr)
    server_key = serialization.load_der_private_key(resp.private_key_der, None)
    assert spki(resp.certificate) == spki(server_key)
    assert spki(resp.certificate) != spki(key)  # RFC 7030 §4.4.1: the server made the key


def test_the_request_body_is_base64_der_in_lines_ending_with_a_newline(
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    # libest rejects a single base64 line without a newline; the reference server
    # imitates that with libest_quirks.
    fresh_est_server.configure("idevid", libest_quirks=True)
    csr, key = software_csr("device-libest")
    resp = client_for(fresh_est_server, "idevid",
                      secret=fresh_est_server.secret).simpleenroll(csr)
    assert spki(resp.certificate) == spki(key)


# --------------------------------------------------------------------------- 202 Accepted


def test_pending_request_is_resent_after_retry_after_and_then_succeeds(
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    fresh_est_server.configure("idevid", pending=2, retry_after=7)
    clock = FakeClock()
    client = client_for(fresh_est_server, "idevid", secret=fresh_est_server.secret,
                        sleep=clock.sleep, now=clock.now, max_wait=60)
    csr, key = software_csr("device-pending")
    resp = client.simpleenroll(csr)
    assert clock.sleeps == [7, 7]
    assert spki(resp.certificate) == spki(key)
    assert len(fresh_est_server.issued()) == 1


def test_pending_beyond_max_wait_raises_retry_later_with_the_servers_delay(
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    fresh_est_server.configure("idevid", pending=5, retry_after=30)
    clock = FakeClock()
    client = client_for(fresh_est_server, "idevid", secret=fresh_est_server.secret,
                        sleep=clock.sleep, now=clock.now, max_wait=45)
    with pytest.raises(EstRetryLater) as info:
        client.simpleenroll(software_csr()[0])
    assert info.value.retry_after == 30
    assert clock.sleeps == [30]  # a second wait would exceed the 45 s allowed
    assert "this command waits at most 45 s (est.max_wait)" in info.value.message
    assert fresh_est_server.issued() == []


def _pending_then(answer: Callable[[], tuple[int, list[tuple[str, str]], bytes]],
                  retry_after: str | None) -> Callable[[Seen], Any]:
    calls = {"n": 0}

    def respond(seen: Seen) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            return 202, ([("Retry-After", retry_after)] if retry_after else []), b"later"
        return answer()

    return respond


@pytest.fixture
def tls_ca() -> TestCa:
    return TestCa.root("canned server CA")


@pytest.fixture
def canned(tls_ca: TestCa) -> Iterator[Callable[..., CannedServer]]:
    servers: list[CannedServer] = []

    def make(respond: Callable[[Seen], Any], *, tls: bool = True, **ident: Any) -> CannedServer:
        srv = CannedServer(respond, tls=server_identity(tls_ca, **ident) if tls else None)
        servers.append(srv.start())
        return srv

    yield make
    for s in servers:
        s.stop()


def _canned_client(srv: CannedServer, tls_ca: TestCa, tls_contexts: Callable[..., ClientTls],
                   *, check_hostname: bool = True, url: str | None = None,
                   **kw: Any) -> EstClient:
    tls = tls_contexts(trust_anchors=[tls_ca.cert], check_hostname=check_hostname)
    return EstClient(url or srv.url(), make_session(tls), tls=tls, **kw)


def _issued_for(key: Any) -> bytes:
    ca = TestCa.root("canned issuer")
    cert = ca.issue(key.public_key(), name("device-1"), eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    return messages.encode_certs_only([cert])


def test_retry_after_as_an_http_date_is_honoured(
    canned: Callable[..., CannedServer], tls_ca: TestCa,
    tls_contexts: Callable[..., ClientTls],
) -> None:
    clock = FakeClock(datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC))
    csr, key = software_csr()
    when = format_datetime(clock.t + timedelta(seconds=90), usegmt=True)
    srv = canned(_pending_then(lambda: (200, [("Content-Type", CERTS_ONLY)], _issued_for(key)),
                               when))
    client = _canned_client(srv, tls_ca, tls_contexts, sleep=clock.sleep, now=clock.now)
    assert spki(client.simpleenroll(csr).certificate) == spki(key)
    assert clock.sleeps == [90]
    assert srv.seen[0].body == srv.seen[1].body  # the same request was resent


def test_202_without_retry_after_is_a_protocol_error(
    canned: Callable[..., CannedServer], tls_ca: TestCa,
    tls_contexts: Callable[..., ClientTls],
) -> None:
    srv = canned(_pending_then(lambda: (500, [], b""), None))
    with pytest.raises(EstProtocolError, match="202 Accepted without Retry-After"):
        _canned_client(srv, tls_ca, tls_contexts).simpleenroll(software_csr()[0])


# --------------------------------------------------------------------------- server errors


FAULTS: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "5xx from the server": ({"faults": {"status": 503}}, EstServerError,
                            "answered 503 Service Unavailable: fault injected: status 503"),
    "wrong content type": ({"faults": {"wrong_content_type": True}}, EstProtocolError,
                           "wrong media type 'text/plain"),
    "malformed body": ({"faults": {"malformed_body": True}}, EstProtocolError,
                       "the body is not a certs-only PKCS#7"),
}


@pytest.mark.parametrize(("settings", "error", "message"), FAULTS.values(), ids=FAULTS.keys())
@pytest.mark.parametrize("operation", ["cacerts", "simpleenroll"])
def test_server_faults_are_rejected_precisely(
    settings: dict[str, Any], error: type[Exception], message: str, operation: str,
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    fresh_est_server.configure("idevid", **settings)
    client = client_for(fresh_est_server, "idevid", secret=fresh_est_server.secret)
    with pytest.raises(error) as info:
        if operation == "cacerts":
            client.cacerts()
        else:
            client.simpleenroll(software_csr()[0])
    assert message in str(info.value)
    assert f"/idevid/{operation}" in str(info.value)


def test_server_error_carries_status_and_body(
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    fresh_est_server.configure("idevid", faults={"status": 500})
    with pytest.raises(EstServerError) as info:
        client_for(fresh_est_server, "idevid").cacerts()
    assert info.value.status == 500
    assert info.value.body == "fault injected: status 500"
    assert info.value.exit_code == 4


CREDENTIALS = {"wrong secret": "not-the-secret", "no secret": None}


@pytest.mark.parametrize("secret", CREDENTIALS.values(), ids=CREDENTIALS.keys())
def test_rejected_credentials_raise_auth_error_with_401(
    secret: str | None, est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    with pytest.raises(EstAuthError) as info:
        client_for(est_server, "idevid", secret=secret).simpleenroll(software_csr()[0])
    assert info.value.status == 401
    assert info.value.exit_code == 5
    assert "rejected our credentials" in info.value.message


def test_redirects_are_not_followed_and_credentials_stay_home(
    canned: Callable[..., CannedServer], tls_ca: TestCa,
    tls_contexts: Callable[..., ClientTls],
) -> None:
    target = canned(lambda seen: (200, [], b""))
    srv = canned(lambda seen: (302, [("Location", target.url())], b""))
    client = _canned_client(srv, tls_ca, tls_contexts, headers={"Secret-Value": "s3cret"})
    with pytest.raises(EstServerError, match="does not follow EST redirects") as info:
        client.simpleenroll(software_csr()[0])
    assert info.value.status == 302
    assert target.seen == []


def test_an_oversized_answer_is_refused(
    canned: Callable[..., CannedServer], tls_ca: TestCa,
    tls_contexts: Callable[..., ClientTls],
) -> None:
    srv = canned(lambda seen: (200, [("Content-Type", CERTS_ONLY)], b"A" * (2 << 20)))
    with pytest.raises(EstProtocolError, match="more than the 1048576 allowed"):
        _canned_client(srv, tls_ca, tls_contexts).cacerts()


def test_an_oversized_answer_without_length_is_cut_off(
    canned: Callable[..., CannedServer], tls_ca: TestCa,
    tls_contexts: Callable[..., ClientTls],
) -> None:
    srv = canned(lambda seen: (200, [("Content-Type", CERTS_ONLY), ("Connection", "close")],
                               b"A" * 4096))
    with pytest.raises(EstProtocolError, match="larger than the 1000 bytes allowed"):
        _canned_client(srv, tls_ca, tls_contexts, max_body=1000).cacerts()


# --------------------------------------------------------------------------- wire leniency


def _bodies(der: bytes, cert: x509.Certificate) -> dict[str, bytes]:
    b64 = base64.b64encode(der)
    return {
        "base64 on one line without newline": b64,
        "base64 in 64-column lines": messages.b64_lines(der),
        "base64 in 76-column CRLF lines": b"".join(b64[i:i + 76] + b"\r\n"
                                                  for i in range(0, len(b64), 76)),
        "PEM PKCS7": b"-----BEGIN PKCS7-----\n" + messages.b64_lines(der) + b"-----END PKCS7-----\n",
        "PEM CERTIFICATE": cert.public_bytes(serialization.Encoding.PEM),
        "raw DER": der,
    }


BODY_KINDS = list(_bodies(b"\x30\x00", TestCa.root().cert))
CONTENT_TYPES = {
    "with smime-type": CERTS_ONLY,
    "upper case, no space": "APPLICATION/PKCS7-MIME;smime-type=CERTS-ONLY",
    "without parameters": "application/pkcs7-mime",
}


@pytest.mark.parametrize("content_type", CONTENT_TYPES.values(), ids=CONTENT_TYPES.keys())
@pytest.mark.parametrize("kind", BODY_KINDS)
@pytest.mark.parametrize("cte", [True, False], ids=["with CTE header", "without CTE header"])
def test_certs_only_answers_are_accepted_in_every_layout_servers_use(
    kind: str, content_type: str, cte: bool, canned: Callable[..., CannedServer],
    tls_ca: TestCa, tls_contexts: Callable[..., ClientTls],
) -> None:
    cert = TestCa.root("some EST CA").cert
    from cryptography.hazmat.primitives.serialization import pkcs7

    der = pkcs7.serialize_certificates([cert], serialization.Encoding.DER)
    body = _bodies(der, cert)[kind]
    headers = [("Content-Type", content_type)]
    if cte:
        headers.append(("Content-Transfer-Encoding", "base64"))
    srv = canned(lambda seen: (200, headers, body))
    assert _canned_client(srv, tls_ca, tls_contexts).cacerts() == [cert]


def test_enrollment_request_has_pkcs10_media_type_and_line_broken_base64(
    canned: Callable[..., CannedServer], tls_ca: TestCa,
    tls_contexts: Callable[..., ClientTls],
) -> None:
    csr, key = software_csr()
    srv = canned(lambda seen: (200, [("Content-Type", CERTS_ONLY)], _issued_for(key)))
    _canned_client(srv, tls_ca, tls_contexts).simpleenroll(csr)
    seen = srv.seen[0]
    assert seen.method == "POST" and seen.path == "/.well-known/est/idevid/simpleenroll"
    assert seen.headers["content-type"] == "application/pkcs10"
    lines = seen.body.split(b"\n")
    assert lines[-1] == b"" and all(len(line) <= 64 for line in lines) and len(lines) > 2
    assert base64.b64decode(seen.body) == csr.public_bytes(serialization.Encoding.DER)


def test_the_issued_certificate_is_picked_by_key_from_a_bag_with_its_chain(
    canned: Callable[..., CannedServer], tls_ca: TestCa,
    tls_contexts: Callable[..., ClientTls],
) -> None:
    csr, key = software_csr()
    root = TestCa.root("bag root")
    inter = root.sub_ca("bag intermediate")
    leaf = inter.issue(key.public_key(), name("device-1"))
    body = messages.encode_certs_only([root.cert, leaf, inter.cert])
    srv = canned(lambda seen: (200, [("Content-Type", CERTS_ONLY)], body))
    resp = _canned_client(srv, tls_ca, tls_contexts).simpleenroll(csr)
    assert resp.certificate == leaf
    assert set(resp.extra_certs) == {root.cert, inter.cert}


# --------------------------------------------------------------------------- server authentication


@pytest.fixture
def est_server_on_127_0_0_2(tmp_path: Path) -> Iterator[tuple[EstServer, Path]]:
    """A reference server bound to 127.0.0.2, whose certificate names only 127.0.0.1/::1/localhost."""
    res = init_server_dir(tmp_path / "srv2")
    srv = EstServer(res.dir, host="127.0.0.2", port=0).start()
    try:
        yield srv, res.tls_ca_path
    finally:
        srv.stop()


def test_server_with_a_wrong_hostname_is_rejected(
    est_server_on_127_0_0_2: tuple[EstServer, Path], tls_contexts: Callable[..., ClientTls],
) -> None:
    srv, ca = est_server_on_127_0_0_2
    tls = tls_contexts(trust_anchors=load(ca))
    client = EstClient(srv.url("idevid"), make_session(tls), tls=tls)
    with pytest.raises(EstTransportError) as info:
        client.cacerts()
    assert "127.0.0.2" in info.value.message
    assert "certificate verify failed: IP address mismatch" in info.value.message


def test_untrusted_server_is_rejected(
    est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    # The operator CA is a real CA of this deployment, but not the server's TLS CA.
    client = client_for(est_server, "idevid", anchors=load(est_server.operator_ca))
    with pytest.raises(EstTransportError) as info:
        client.cacerts()
    assert "certificate verify failed: unable to get local issuer certificate" in info.value.message
    assert f"127.0.0.1:{est_server.port}" in info.value.message


def test_a_server_that_is_not_there_is_a_transport_error_naming_it(
    tls_contexts: Callable[..., ClientTls], tls_ca: TestCa,
) -> None:
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tls = tls_contexts(trust_anchors=[tls_ca.cert])
    client = EstClient(f"https://127.0.0.1:{port}/.well-known/est/x", make_session(tls), tls=tls)
    with pytest.raises(EstTransportError, match=f"127.0.0.1:{port} failed: .*refused"):
        client.cacerts()


def test_a_slow_server_hits_the_read_timeout(
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    fresh_est_server.configure("idevid", faults={"delay": 3, "operations": ["cacerts"]})
    client = client_for(fresh_est_server, "idevid", timeout=(5.0, 0.3))
    with pytest.raises(EstTransportError, match="timed out"):
        client.cacerts()


def test_a_slow_answer_is_announced_once_and_counted_at_verbose(
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tpmid.est import client as client_module

    monkeypatch.setattr(client_module, "SLOW_COUNTDOWN_S", 0.5)
    fresh_est_server.configure("idevid", faults={"delay": 2, "operations": ["cacerts"]})
    lines: list[str] = []
    client = client_for(fresh_est_server, "idevid", progress=lines.append, deadline=30.0)
    with caplog.at_level("INFO", logger="tpmid.est.client"):
        assert client.cacerts()
    assert lines == [f"{fresh_est_server.url('idevid')}/cacerts: waiting for the server's answer; "
                     "gives up after 30 s (est.timeout.total)"]
    counts = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert counts and all("so far; gives up after 30 s" in c for c in counts)


def test_a_prompt_answer_prints_no_waiting_line(
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    lines: list[str] = []
    client = client_for(fresh_est_server, "idevid", progress=lines.append)
    assert client.cacerts()
    assert lines == []


def test_plain_http_is_refused_unless_allowed(
    canned: Callable[..., CannedServer], tls_ca: TestCa,
) -> None:
    cert = tls_ca.cert
    srv = canned(lambda seen: (200, [("Content-Type", CERTS_ONLY)],
                               messages.encode_certs_only([cert])), tls=False)
    with pytest.raises(ConfigError, match="plain HTTP"):
        EstClient(srv.url(), make_session(None))
    assert EstClient(srv.url(), make_session(None), allow_http=True).cacerts() == [cert]


CMC_RA = {
    "name matches": ({"ips": ("127.0.0.1",)}, None),
    "name does not match but id-kp-cmcRA": ({"dns": ("ra.invalid",), "ips": (),
                                             "cmc_ra": True}, None),
    "neither name nor id-kp-cmcRA": ({"dns": ("ra.invalid",), "ips": ()},
                                     "neither names '127.0.0.1' nor carries id-kp-cmcRA"),
}


@pytest.mark.parametrize(("ident", "error"), CMC_RA.values(), ids=CMC_RA.keys())
def test_cmc_ra_server_certificate_is_an_alternative_to_the_host_check(
    ident: dict[str, Any], error: str | None, canned: Callable[..., CannedServer],
    tls_ca: TestCa, tls_contexts: Callable[..., ClientTls],
) -> None:
    cert = TestCa.root("label CA").cert
    srv = canned(lambda seen: (200, [("Content-Type", CERTS_ONLY)],
                               messages.encode_certs_only([cert])), **ident)
    client = _canned_client(srv, tls_ca, tls_contexts, check_hostname=False,
                            server_check="hostname-or-cmc-ra",
                            headers={"Secret-Value": "s3cret"})
    if error is None:
        assert client.cacerts() == [cert]
    else:
        with pytest.raises(EstTransportError, match=error):
            client.cacerts()
        assert srv.seen == []  # nothing, and so no secret, was sent to that server


def test_cmc_ra_mode_still_requires_the_chain_to_the_anchors(
    canned: Callable[..., CannedServer], tls_contexts: Callable[..., ClientTls],
) -> None:
    srv = canned(lambda seen: (200, [], b""), dns=("ra.invalid",), ips=(), cmc_ra=True)
    stranger = TestCa.root("not the server's CA")
    tls = tls_contexts(trust_anchors=[stranger.cert], check_hostname=False)
    client = EstClient(srv.url(), make_session(tls), tls=tls, server_check="hostname-or-cmc-ra")
    with pytest.raises(EstTransportError, match="unable to get local issuer certificate"):
        client.cacerts()


# --------------------------------------------------------------------------- pinned bootstrap


def _pin(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def test_pinned_bootstrap_accepts_a_server_under_the_pinned_root(
    canned: Callable[..., CannedServer], tls_ca: TestCa, tls_contexts: Callable[..., ClientTls],
) -> None:
    # The server's TLS certificate is issued by the very CA /cacerts returns.
    srv = canned(lambda seen: (200, [("Content-Type", CERTS_ONLY)],
                               messages.encode_certs_only([tls_ca.cert])))
    tls = tls_contexts(verify_server=False)
    client = EstClient(srv.url(), make_session(tls), tls=tls, server_check="pin",
                       pin=_pin(tls_ca.cert), headers={"Secret-Value": "s3cret"})
    assert client.cacerts() == [tls_ca.cert]
    assert "secret-value" not in srv.seen[0].headers  # no credentials before authentication
    with pytest.raises(ConfigError, match="only /cacerts"):
        client.simpleenroll(software_csr()[0])


def test_pinned_bootstrap_refuses_a_pin_mismatch(
    est_server: RunningEstServer, tls_contexts: Callable[..., ClientTls],
) -> None:
    tls = tls_contexts(verify_server=False)
    client = EstClient(est_server.url("idevid"), make_session(tls), tls=tls, server_check="pin",
                       pin=_pin(load(est_server.operator_ca)[0]))
    with pytest.raises(VerificationError, match="matches the pinned SHA-256 fingerprint"):
        client.cacerts()


def test_pinned_bootstrap_refuses_a_server_whose_tls_certificate_is_not_under_the_pin(
    est_server: RunningEstServer, tls_contexts: Callable[..., ClientTls],
) -> None:
    # The reference server's TLS certificate comes from its separate TLS CA.
    tls = tls_contexts(verify_server=False)
    root = load(est_server.manufacturer_ca)[0]
    client = EstClient(est_server.url("idevid"), make_session(tls), tls=tls, server_check="pin",
                       pin=_pin(root))
    with pytest.raises(VerificationError, match="does not validate for '127.0.0.1' against the "
                       "pinned root"):
        client.cacerts()


# --------------------------------------------------------------------------- proof of possession


@pytest.fixture
def pop_server(est_server_factory: Callable[..., RunningEstServer]) -> RunningEstServer:
    def edit(d: dict[str, Any]) -> None:
        d["labels"]["idevid"]["pop"] = True

    return est_server_factory(config=edit)


def test_pop_puts_tls_unique_of_the_same_connection_into_the_csr(
    pop_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    seen: list[bytes] = []

    def factory(tls_unique: bytes) -> x509.CertificateSigningRequest:
        seen.append(tls_unique)
        return software_csr("device-pop", key, base64.b64encode(tls_unique).decode())[0]

    client = client_for(pop_server, "idevid", secret=pop_server.secret, tls_version="1.2")
    resp = client.simpleenroll(factory)
    assert spki(resp.certificate) == spki(key)
    assert len(seen) == 1 and len(seen[0]) == 12  # TLS 1.2 Finished verify_data


def test_pop_refuses_tls_1_3_where_tls_unique_does_not_exist(
    pop_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    client = client_for(pop_server, "idevid", secret=pop_server.secret, tls_version="1.3")
    with pytest.raises(EstProtocolError, match="needs TLS 1.2, but TLSv1.3 was negotiated"):
        client.simpleenroll(lambda tu: software_csr(challenge="x")[0])
    assert pop_server.issued() == []


def test_a_pop_label_rejects_a_csr_without_the_link(
    pop_server: RunningEstServer, client_for: Callable[..., EstClient],
) -> None:
    client = client_for(pop_server, "idevid", secret=pop_server.secret, tls_version="1.2")
    with pytest.raises(EstServerError, match="proof-of-possession required") as info:
        client.simpleenroll(software_csr()[0])
    assert info.value.status == 400


# --------------------------------------------------------------------------- secrets


def test_the_secret_never_appears_in_logs_or_errors_at_debug(
    fresh_est_server: RunningEstServer, client_for: Callable[..., EstClient],
    canned: Callable[..., CannedServer], tls_ca: TestCa, tls_contexts: Callable[..., ClientTls],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, urllib3 and the server included
    secret = fresh_est_server.secret
    errors: list[str] = []
    # Success, with a 202 round first.
    fresh_est_server.configure("idevid", pending=1, retry_after=0)
    client_for(fresh_est_server, "idevid", secret=secret).simpleenroll(software_csr()[0])
    # A wrong secret (the right one's prefix) and a server that echoes what it got.
    with pytest.raises(EstAuthError) as e1:
        client_for(fresh_est_server, "idevid", secret=secret[:-1]).simpleenroll(
            software_csr()[0])
    errors.append(str(e1.value))
    echo = canned(lambda seen: (400, [("Content-Type", "text/plain")],
                                f"bad request, you sent {seen.headers}".encode()))
    basic_password = "hunter2-basic-password"
    with pytest.raises(EstServerError) as e2:
        _canned_client(echo, tls_ca, tls_contexts, headers={"Secret-Value": secret},
                       basic=("dev", basic_password)).simpleenroll(software_csr()[0])
    errors.append(str(e2.value) + e2.value.body)
    assert "<redacted>" in errors[1]
    token = base64.b64encode(f"dev:{basic_password}".encode()).decode()
    for text in [caplog.text, *errors]:
        for s in (secret, secret[:-1], basic_password, token):
            assert s not in text
    assert "Secret-Value" in caplog.text  # the header is logged, its value redacted


# --------------------------------------------------------------------------- URLs


URLS = {
    "label base": ("https://h:1/.well-known/est/idevid", "https://h:1/.well-known/est/idevid"),
    "trailing slash": ("https://h:1/.well-known/est/idevid/", "https://h:1/.well-known/est/idevid"),
    "with an operation": ("https://h:1/.well-known/est/idevid/cacerts",
                          "https://h:1/.well-known/est/idevid"),
    "bare host": ("https://h:1", "https://h:1/.well-known/est"),
    "IPv6 literal": ("https://[::1]:8443/.well-known/est/x/", "https://[::1]:8443/.well-known/est/x"),
}


@pytest.mark.parametrize(("url", "base"), URLS.values(), ids=URLS.keys())
def test_est_urls_are_normalised_to_the_label_base(url: str, base: str) -> None:
    assert est_base_url(url) == base


def test_a_url_that_is_not_http_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not an EST URL"):
        est_base_url("ftp://h/.well-known/est")
