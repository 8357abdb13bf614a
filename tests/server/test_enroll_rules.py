"""Enrollment rules and behaviours: re-enrollment, forcing, pending, malformed CSRs, PoP,
libest quirks, fault knobs and concurrent clients."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.server.helpers import (
    DEVICE_SERIAL,
    Identity,
    Reply,
    csr_body,
    enroll,
    idevid,
    ldevid,
    make_csr,
    new_key,
    pem_csr,
    request,
    write_cert,
    write_key,
)
from tpmid.est import messages
from tpmid.render import name as render_name
from tpmid.testing.estserver import RunningEstServer

FIXTURES = Path(__file__).parent.parent / "est" / "fixtures"


def post(srv: RunningEstServer, label: str, body: bytes, *, client: Identity | None = None,
         operation: str = "simpleenroll", headers: dict[str, str] | None = None,
         tls: str | None = None) -> Reply:
    hdrs = {"Content-Type": messages.PKCS10, **(headers or {})}
    if label == "idevid":
        hdrs.setdefault("Secret-Value", srv.secret)
    return request(srv.url(label, operation), cafile=srv.tls_ca, method="POST", body=body,
                   headers=hdrs, cert=client.cert_path if client else None,
                   key=client.key_path if client else None, tls=tls)


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------- re-enrollment


@pytest.fixture
def device(est_server: RunningEstServer, tmp_path: Path) -> Identity:
    """An LDevID with a DNS SAN, enrolled with a fresh IDevID."""
    dev_id = idevid(est_server, tmp_path)
    key = new_key()
    reply = post(est_server, "ldevid",
                 csr_body(make_csr(key, "my-device-id", serial=DEVICE_SERIAL, dns=["dev.example"])),
                 client=dev_id)
    cert = reply.cert()
    return Identity(key, cert, write_key(tmp_path / "dev.key", key),
                    write_cert(tmp_path / "dev.pem", cert))


@pytest.mark.parametrize(
    ("cn", "dns", "status", "complaint"),
    [
        ("my-device-id", ["dev.example"], 200, ""),
        ("someone-else", ["dev.example"], 400, "CSR subject"),
        ("my-device-id", [], 400, "subjectAltName differs"),
        ("my-device-id", ["dev.example", "extra.example"], 400, "subjectAltName differs"),
    ],
    ids=["same-names-new-key", "other-subject", "san-dropped", "san-added"],
)
def test_simplereenroll_requires_subject_and_san_equal_to_the_client_certificate(
    est_server: RunningEstServer, device: Identity, cn: str, dns: list[str], status: int,
    complaint: str
) -> None:
    reply = post(est_server, "ldevid",
                 csr_body(make_csr(new_key(), cn, serial=DEVICE_SERIAL, dns=dns)),
                 client=device, operation="simplereenroll")
    assert reply.status == status, reply.text
    assert complaint in reply.text
    if status == 200:
        assert reply.cert().subject == device.cert.subject


@pytest.mark.parametrize(
    ("label", "complaint"),
    [("ldevid", "requires a TLS client certificate"),
     ("idevid", "needs the certificate being renewed")],
    ids=["mtls-label", "secret-label-with-right-secret"],
)
def test_simplereenroll_without_client_certificate_is_401(est_server: RunningEstServer,
                                                          label: str, complaint: str) -> None:
    # RFC 7030 §4.2.2: the certificate being renewed is the TLS client
    # certificate, even where the label's own policy is a secret.
    reply = post(est_server, label, csr_body(make_csr(new_key(), "my-device-id")),
                 operation="simplereenroll")
    assert reply.status == 401
    assert complaint in reply.text


def test_simplereenroll_of_a_certificate_from_another_ca_is_403(est_server: RunningEstServer,
                                                                tmp_path: Path) -> None:
    # An IDevID may authenticate at ldevid, but it is not an operator-CA
    # certificate, so it is not something this label can renew.
    dev = idevid(est_server, tmp_path)
    reply = post(est_server, "ldevid", csr_body(make_csr(new_key(), "IDevID")), client=dev,
                 operation="simplereenroll")
    assert reply.status == 403
    assert "cannot be renewed here" in reply.text


# --------------------------------------------------------------------------- forcing


@pytest.mark.parametrize(
    ("forcing", "expected_cn"),
    [(False, "requested-name"), (True, "my-device-id")],
    ids=["off-csr-respected", "on-subject-from-presented-cert"],
)
def test_reenrollment_forcing_copies_the_subject_of_a_certificate_from_the_same_ca(
    fresh_est_server: RunningEstServer, tmp_path: Path, forcing: bool, expected_cn: str
) -> None:
    dev = ldevid(fresh_est_server, tmp_path)
    fresh_est_server.configure("ldevid", reenroll_forcing=forcing)
    reply = post(fresh_est_server, "ldevid",
                 csr_body(make_csr(new_key(), "requested-name", serial=DEVICE_SERIAL)), client=dev)
    assert render_name(reply.cert().subject) == f"serialNumber={DEVICE_SERIAL},CN={expected_cn}"


def test_reenrollment_forcing_ignores_certificates_from_another_ca(
    fresh_est_server: RunningEstServer, tmp_path: Path
) -> None:
    # Why GlobalSign recommends separate CAs: an IDevID (manufacturer CA) does
    # not trigger the "upgrade" at the operator-CA label.
    fresh_est_server.configure("ldevid", reenroll_forcing=True)
    dev = idevid(fresh_est_server, tmp_path)
    reply = post(fresh_est_server, "ldevid",
                 csr_body(make_csr(new_key(), "my-device-id", serial=DEVICE_SERIAL)), client=dev)
    assert render_name(reply.cert().subject) == f"serialNumber={DEVICE_SERIAL},CN=my-device-id"


def test_reenrollment_forcing_at_edgeca_gives_the_edge_ca_the_ldevid_subject(
    fresh_est_server: RunningEstServer, tmp_path: Path
) -> None:
    # The surprise the IoT Edge walkthrough asks GlobalSign to switch off.
    fresh_est_server.configure("edgeca", reenroll_forcing=True)
    dev = ldevid(fresh_est_server, tmp_path)
    reply = post(fresh_est_server, "edgeca",
                 csr_body(make_csr(new_key(), "edge ca", serial=DEVICE_SERIAL)), client=dev)
    assert reply.cert().subject == dev.cert.subject


# --------------------------------------------------------------------------- pending


def test_pending_answers_202_with_retry_after_then_issues(fresh_est_server: RunningEstServer,
                                                          tmp_path: Path) -> None:
    fresh_est_server.configure("idevid", pending=2, retry_after="7s")
    key = new_key()
    body = csr_body(make_csr(key, "patient-device"))
    first, second, third = (post(fresh_est_server, "idevid", body) for _ in range(3))
    for reply in (first, second):
        assert reply.status == 202
        assert reply.headers["retry-after"] == "7"
        assert messages.parse_retry_after(reply.headers["retry-after"], datetime.now(UTC)) == 7
    assert third.status == 200
    assert spki(third.cert()) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_pending_counts_per_csr_key(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", pending=1)
    a, b = new_key(), new_key()
    assert post(fresh_est_server, "idevid", csr_body(make_csr(a))).status == 202
    assert post(fresh_est_server, "idevid", csr_body(make_csr(b))).status == 202
    assert post(fresh_est_server, "idevid", csr_body(make_csr(a))).status == 200
    assert post(fresh_est_server, "idevid", csr_body(make_csr(b))).status == 200


def test_pending_comes_after_authentication(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", pending=3)
    reply = post(fresh_est_server, "idevid", csr_body(make_csr(new_key())),
                 headers={"Secret-Value": "wrong"})
    assert reply.status == 401


# --------------------------------------------------------------------------- malformed CSRs


def _tampered_csr() -> bytes:
    der = bytearray(make_csr(new_key(), "tampered").public_bytes(serialization.Encoding.DER))
    i = der.index(b"tampered")
    der[i] ^= 0x01  # change the subject after signing
    return messages.b64_lines(bytes(der))


def _rsa1024_csr() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return csr_body(make_csr(key, "weak"))


MALFORMED = {
    "empty-body": (b"", "body is empty"),
    "not-base64": (b"%%% definitely not a CSR %%%", "malformed CSR"),
    "base64-of-garbage": (base64.b64encode(b"\x30\x05garbage") + b"\n", "malformed CSR"),
    "truncated": (messages.b64_lines(make_csr(new_key()).public_bytes(
        serialization.Encoding.DER)[:60]), "malformed CSR"),
    "certificate-pem-not-csr": (b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
                                "malformed CSR"),
    "bad-signature": (_tampered_csr(), "signature does not verify"),
    "sha1-signature": ((FIXTURES / "rfc7030-a3-simpleenroll-request.b64").read_bytes(), "SHA-1"),
    "rsa-1024": (_rsa1024_csr(), "too weak"),
    "no-subject-no-san": (csr_body(make_csr(new_key(), None)), "neither a subject nor"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=str)
def test_malformed_csrs_get_400_with_a_reason(est_server: RunningEstServer, case: str) -> None:
    body, reason = MALFORMED[case]
    reply = post(est_server, "idevid", body)
    assert reply.status == 400, reply.text
    assert reason in reply.text
    assert reply.headers["content-type"].startswith("text/plain")


def test_rfc7030_a3_example_request_is_refused_for_sha1_unless_the_label_allows_it(
    fresh_est_server: RunningEstServer,
) -> None:
    body = (FIXTURES / "rfc7030-a3-simpleenroll-request.b64").read_bytes()
    assert post(fresh_est_server, "idevid", body).status == 400
    fresh_est_server.configure("idevid", allow_sha1_csr=True)
    cert = post(fresh_est_server, "idevid", body).cert()
    example = messages.decode_csr(body)
    assert render_name(cert.subject) == "CN=demostep4 1368141352"
    assert spki(cert) == example.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    ("form", "headers"),
    [
        ("pem", {"Content-Transfer-Encoding": "base64"}),
        ("pem", {}),
        ("b64-lines", {}),
        ("b64-one-line", {"Content-Transfer-Encoding": "base64"}),
        ("der", {}),
    ],
    ids=["pem-with-cte-base64-like-the-walkthrough", "pem", "base64-lines",
         "base64-one-line", "raw-der"],
)
def test_request_bodies_are_accepted_in_every_encoding(est_server: RunningEstServer, form: str,
                                                       headers: dict[str, str]) -> None:
    csr = make_csr(new_key(), f"form-{form}")
    der = csr.public_bytes(serialization.Encoding.DER)
    body = {"pem": pem_csr(csr), "b64-lines": csr_body(csr),
            "b64-one-line": base64.b64encode(der), "der": der}[form]
    assert post(est_server, "idevid", body, headers=headers).cert().subject == csr.subject


# --------------------------------------------------------------------------- libest quirks


@pytest.mark.parametrize(
    ("quirks", "trailing_newline", "status"),
    [(True, False, 400), (True, True, 200), (False, False, 200)],
    ids=["quirks-one-line-no-newline-refused", "quirks-one-line-with-newline-ok",
         "no-quirks-one-line-ok"],
)
def test_libest_quirk_rejects_a_single_base64_line_without_newline(
    fresh_est_server: RunningEstServer, quirks: bool, trailing_newline: bool, status: int
) -> None:
    fresh_est_server.configure("idevid", libest_quirks=quirks)
    line = base64.b64encode(make_csr(new_key()).public_bytes(serialization.Encoding.DER))
    reply = post(fresh_est_server, "idevid", line + (b"\n" if trailing_newline else b""))
    assert reply.status == status
    if status == 400:
        assert "libest quirk" in reply.text


# --------------------------------------------------------------------------- PoP (RFC 7030 §3.5)


def _pop_body(challenge: str):
    key = new_key()

    def build(tls_unique: bytes | None) -> bytes:
        value = {"right": base64.b64encode(tls_unique or b""), "wrong": b"bm90IHRoZSB2YWx1ZQ=="}
        if challenge == "none":
            return csr_body(make_csr(key, "pop-device", serial=DEVICE_SERIAL))
        return csr_body(make_csr(key, "pop-device", serial=DEVICE_SERIAL,
                                 challenge=value[challenge]))

    return build


@pytest.mark.parametrize(
    ("tls", "challenge", "status", "complaint"),
    [
        ("1.2", "right", 200, ""),
        ("1.2", "wrong", 400, "not the tls-unique value"),
        ("1.2", "none", 400, "no challengePassword"),
        ("1.3", "right", 400, "only in TLS 1.2"),
    ],
    ids=["tls1.2-linked", "tls1.2-wrong-value", "tls1.2-missing", "tls1.3-has-no-tls-unique"],
)
def test_pop_linking_requires_tls_unique_in_challenge_password(
    fresh_est_server: RunningEstServer, tmp_path: Path, tls: str, challenge: str, status: int,
    complaint: str
) -> None:
    dev = idevid(fresh_est_server, tmp_path)
    fresh_est_server.configure("ldevid", pop=True)
    reply = request(fresh_est_server.url("ldevid", "simpleenroll"),
                    cafile=fresh_est_server.tls_ca, method="POST", body=_pop_body(challenge),
                    headers={"Content-Type": messages.PKCS10}, cert=dev.cert_path,
                    key=dev.key_path, tls=tls)
    assert reply.status == status, reply.text
    assert complaint in reply.text


def test_pop_is_not_checked_when_the_label_does_not_require_it(
    est_server: RunningEstServer, tmp_path: Path
) -> None:
    dev = idevid(est_server, tmp_path)
    reply = request(est_server.url("ldevid", "simpleenroll"), cafile=est_server.tls_ca,
                    method="POST", body=_pop_body("wrong"),
                    headers={"Content-Type": messages.PKCS10}, cert=dev.cert_path,
                    key=dev.key_path, tls="1.2")
    assert reply.status == 200


# --------------------------------------------------------------------------- fault knobs


def test_fault_status_answers_that_status_with_retry_after(
    fresh_est_server: RunningEstServer,
) -> None:
    fresh_est_server.configure("idevid", faults={"status": 503, "retry_after": "3s"})
    reply = post(fresh_est_server, "idevid", csr_body(make_csr(new_key())))
    assert (reply.status, reply.headers["retry-after"]) == (503, "3")


def test_fault_malformed_body_is_a_200_that_does_not_parse(
    fresh_est_server: RunningEstServer,
) -> None:
    fresh_est_server.configure("idevid", faults={"malformed_body": True})
    reply = post(fresh_est_server, "idevid", csr_body(make_csr(new_key())))
    assert reply.status == 200
    with pytest.raises(messages.EstProtocolError):
        messages.decode_certs_only(reply.body)


def test_fault_wrong_content_type_keeps_the_body(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", faults={"wrong_content_type": True})
    reply = post(fresh_est_server, "idevid", csr_body(make_csr(new_key(), "ct")))
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    assert messages.decode_certs_only(reply.body)[0].subject.rfc4514_string() == "CN=ct"


def test_fault_delay_holds_the_answer_back(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", faults={"delay": "0.6s"})
    start = time.monotonic()
    reply = post(fresh_est_server, "idevid", csr_body(make_csr(new_key())))
    assert reply.status == 200
    assert time.monotonic() - start >= 0.6


def test_fault_wrong_key_certifies_a_key_the_client_does_not_have(
    fresh_est_server: RunningEstServer,
) -> None:
    fresh_est_server.configure("idevid", faults={"wrong_key": True})
    key = new_key()
    cert = post(fresh_est_server, "idevid", csr_body(make_csr(key, "victim"))).cert()
    assert render_name(cert.subject) == "CN=victim"
    assert spki(cert) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_fault_times_and_operations_limit_which_requests_misbehave(
    fresh_est_server: RunningEstServer,
) -> None:
    fresh_est_server.configure("idevid", faults={"status": 500, "times": 1,
                                                 "operations": ["simpleenroll"]})
    assert request(fresh_est_server.url("idevid", "cacerts"),
                   cafile=fresh_est_server.tls_ca).status == 200
    body = csr_body(make_csr(new_key()))
    assert post(fresh_est_server, "idevid", body).status == 500
    assert post(fresh_est_server, "idevid", body).status == 200


def test_faults_are_off_until_configured_and_off_again_after_reload(
    fresh_est_server: RunningEstServer,
) -> None:
    body = csr_body(make_csr(new_key()))
    assert post(fresh_est_server, "idevid", body).status == 200
    fresh_est_server.configure("idevid", faults={"status": 502})
    assert post(fresh_est_server, "idevid", body).status == 502
    fresh_est_server.configure("idevid", faults={})
    assert post(fresh_est_server, "idevid", body).status == 200


# --------------------------------------------------------------------------- concurrency


def test_twenty_parallel_enrollments_all_succeed_with_distinct_certificates(
    fresh_est_server: RunningEstServer, tmp_path: Path
) -> None:
    dev = idevid(fresh_est_server, tmp_path)

    def one(i: int) -> x509.Certificate:
        return enroll(fresh_est_server, "ldevid", tmp_path, f"dev{i}", cn=f"device-{i:02d}",
                      serial=DEVICE_SERIAL, client=dev).cert

    with ThreadPoolExecutor(max_workers=20) as pool:
        certs = list(pool.map(one, range(20)))
    assert sorted(render_name(c.subject) for c in certs) == [
        f"serialNumber={DEVICE_SERIAL},CN=device-{i:02d}" for i in range(20)]
    assert len({c.serial_number for c in certs}) == 20
    assert len([r for r in fresh_est_server.issued() if r["label"] == "ldevid"]) == 20
