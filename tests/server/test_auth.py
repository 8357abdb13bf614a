"""Each label auth policy: the way in, and every way of being turned away."""

from __future__ import annotations

import base64
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tests.server.helpers import (
    DEVICE_SERIAL,
    csr_body,
    idevid,
    ldevid,
    make_csr,
    new_key,
    request,
    write_cert,
    write_key,
)
from tpmid.est import messages
from tpmid.server.auth import hash_secret
from tpmid.testing.estserver import RunningEstServer


def post(srv: RunningEstServer, label: str, headers: dict[str, str] | None = None,
         cert: Path | None = None, key: Path | None = None, cn: str = "dev",
         serial: str | None = DEVICE_SERIAL):
    return request(srv.url(label, "simpleenroll"), cafile=srv.tls_ca, method="POST",
                   body=csr_body(make_csr(new_key(), cn, serial=serial)),
                   headers={"Content-Type": messages.PKCS10, **(headers or {})},
                   cert=cert, key=key)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# --------------------------------------------------------------------------- Secret-Value


def test_secret_value_label_issues_with_the_right_secret(est_server: RunningEstServer) -> None:
    reply = post(est_server, "idevid", {"Secret-Value": est_server.secret})
    assert reply.status == 200


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing Secret-Value header"),
        ({"Secret-Value": "not-the-secret"}, "Secret-Value does not match"),
        ({"Secret-Value": ""}, "Secret-Value does not match"),
        ({"X-Secret-Value": "whatever"}, "missing Secret-Value header"),
    ],
    ids=["missing", "wrong", "empty", "wrong-header-name"],
)
def test_secret_value_label_refuses_missing_or_wrong_secrets_with_401(
    est_server: RunningEstServer, headers: dict[str, str], reason: str
) -> None:
    reply = post(est_server, "idevid", headers)
    assert reply.status == 401
    assert reason in reply.text
    assert reply.headers["www-authenticate"].startswith("Secret-Value")


def test_secret_value_header_name_is_case_insensitive(est_server: RunningEstServer) -> None:
    assert post(est_server, "idevid", {"secret-value": est_server.secret}).status == 200


# --------------------------------------------------------------------------- HTTP Basic


@pytest.fixture
def basic_server(fresh_est_server: RunningEstServer) -> RunningEstServer:
    fresh_est_server.configure("idevid", auth={"basic": {"username": "factory",
                                                         "hash": hash_secret("s3cret pw")}})
    return fresh_est_server


def test_basic_label_issues_with_the_right_username_and_password(
    basic_server: RunningEstServer,
) -> None:
    assert post(basic_server, "idevid", basic("factory", "s3cret pw")).status == 200


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing HTTP Basic credentials"),
        (basic("factory", "wrong"), "wrong HTTP Basic username or password"),
        (basic("intruder", "s3cret pw"), "wrong HTTP Basic username or password"),
        ({"Authorization": "Basic !!!"}, "missing HTTP Basic credentials"),
        ({"Authorization": "Bearer abc"}, "missing HTTP Basic credentials"),
    ],
    ids=["missing", "wrong-password", "wrong-user", "malformed", "other-scheme"],
)
def test_basic_label_refuses_bad_credentials_with_401_and_a_basic_challenge(
    basic_server: RunningEstServer, headers: dict[str, str], reason: str
) -> None:
    reply = post(basic_server, "idevid", headers)
    assert reply.status == 401
    assert reason in reply.text
    assert reply.headers["www-authenticate"].startswith('Basic realm="tpmid-est"')


def test_basic_label_ignores_a_secret_value_header(basic_server: RunningEstServer) -> None:
    assert post(basic_server, "idevid", {"Secret-Value": basic_server.secret}).status == 401


# --------------------------------------------------------------------------- client certificates


def test_ldevid_label_accepts_an_idevid_client_certificate(est_server: RunningEstServer,
                                                           tmp_path: Path) -> None:
    dev = idevid(est_server, tmp_path)
    assert post(est_server, "ldevid", cert=dev.cert_path, key=dev.key_path).status == 200


def test_ldevid_label_accepts_its_own_ldevid_as_client_certificate(est_server: RunningEstServer,
                                                                   tmp_path: Path) -> None:
    dev = ldevid(est_server, tmp_path)
    assert post(est_server, "ldevid", cert=dev.cert_path, key=dev.key_path).status == 200


def test_edgeca_label_accepts_the_ldevid(est_server: RunningEstServer, tmp_path: Path) -> None:
    dev = ldevid(est_server, tmp_path)
    assert post(est_server, "edgeca", cert=dev.cert_path, key=dev.key_path).status == 200


@pytest.mark.parametrize("label", ["ldevid", "edgeca"], ids=str)
def test_mtls_labels_refuse_a_request_without_client_certificate_with_401(
    est_server: RunningEstServer, label: str
) -> None:
    reply = post(est_server, label, {"Secret-Value": est_server.secret})
    assert reply.status == 401
    assert "requires a TLS client certificate" in reply.text


def test_edgeca_label_refuses_an_idevid_with_403(est_server: RunningEstServer,
                                                 tmp_path: Path) -> None:
    dev = idevid(est_server, tmp_path)
    reply = post(est_server, "edgeca", cert=dev.cert_path, key=dev.key_path)
    assert reply.status == 403
    assert "not issued by the operator CA" in reply.text


def _foreign_client_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A clientAuth certificate from a CA the server has never heard of."""
    ca_key, key = new_key(), new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other CA")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "IDevID")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return write_cert(tmp_path / "foreign.pem", cert), write_key(tmp_path / "foreign.key", key)


@pytest.mark.parametrize("label", ["idevid", "ldevid"], ids=str)
def test_client_certificate_from_an_unknown_ca_fails_the_tls_handshake(
    est_server: RunningEstServer, tmp_path: Path, label: str
) -> None:
    # CERT_OPTIONAL: a certificate may be absent, but one that is presented must
    # chain to the manufacturer or operator CA, on every label.
    cert, key = _foreign_client_cert(tmp_path)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        post(est_server, label, {"Secret-Value": est_server.secret}, cert=cert, key=key)


def test_anonymous_policy_needs_no_credentials(fresh_est_server: RunningEstServer) -> None:
    # Nobody is authenticated, so there is no client to bind the subject to.
    fresh_est_server.configure("edgeca", auth={"anonymous": True}, subject_policy="any")
    assert post(fresh_est_server, "edgeca", serial=None).status == 200


def test_a_verified_secret_is_recognised_without_scrypt_and_a_wrong_one_still_pays_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A spy on hashlib.scrypt (it runs for real): the only way to see that the second
    # check of the same secret skipped the expensive hash.
    import hashlib

    from tpmid.server import auth

    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*a: object, **kw: object) -> bytes:
        calls.append(1)
        return real(*a, **kw)  # type: ignore[arg-type]

    stored = auth.hash_secret("fleet secret")
    monkeypatch.setattr(auth.hashlib, "scrypt", counting)
    assert auth.verify_secret("fleet secret", stored)
    assert auth.verify_secret("fleet secret", stored)
    assert len(calls) == 1
    assert not auth.verify_secret("fleet secret!", stored)
    assert not auth.verify_secret("fleet secre", stored)
    assert len(calls) == 3
    # Another context (a Basic user name) is checked afresh: a right password with a
    # wrong user costs what a wrong password costs.
    assert auth.verify_secret("fleet secret", stored, context="someone-else")
    assert len(calls) == 4
    # What is remembered holds no secret: only keyed MACs.
    remembered = b"".join(auth._verified._tags.values())
    assert b"fleet secret" not in remembered
    assert all(len(t) == 32 for t in auth._verified._tags.values())
