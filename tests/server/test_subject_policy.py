"""A device gets certificates for itself only: the labels' ``subject_policy``.

With ``client-serial`` (what ``init`` writes for ``ldevid`` and ``edgeca``) every
serialNumber in the subject about to be issued must be, exactly, the serialNumber
of the TLS client certificate that authenticated the request — for simpleenroll,
simplereenroll and serverkeygen alike, before anything is issued or logged.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tests.server.helpers import (
    Identity,
    Reply,
    csr_body,
    enroll,
    idevid,
    ldevid,
    new_key,
    request,
)
from tpmid.cli import main
from tpmid.errors import ConfigError
from tpmid.est import messages
from tpmid.server.config import load_server_config, parse_server_config
from tpmid.server.subject_policy import AnySubject, ClientSerialSubject
from tpmid.testing.estserver import RunningEstServer

MINE, OTHER = "DEV-A-0001", "DEV-B-9999"
CN, SERIAL = NameOID.COMMON_NAME, NameOID.SERIAL_NUMBER


def name(*rdns: list[tuple[x509.ObjectIdentifier, str]]) -> x509.Name:
    """A Name from RDNs, each a list of (type, value): several make a multi-valued RDN."""
    return x509.Name([x509.RelativeDistinguishedName(
        [x509.NameAttribute(oid, value) for oid, value in rdn]) for rdn in rdns])


def csr(subject: x509.Name) -> bytes:
    """A CSR body for ``subject`` exactly as given (order, repeats, multi-valued RDNs)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return csr_body(builder.sign(new_key(), hashes.SHA256()))


def post(srv: RunningEstServer, label: str, body: bytes, client: Identity | None,
         operation: str = "simpleenroll") -> Reply:
    headers = {"Content-Type": messages.PKCS10}
    if label == "idevid":
        headers["Secret-Value"] = srv.secret
    return request(srv.url(label, operation), cafile=srv.tls_ca, method="POST", body=body,
                   headers=headers, cert=client.cert_path if client else None,
                   key=client.key_path if client else None)


def refused(srv: RunningEstServer, label: str, body: bytes, client: Identity,
            operation: str = "simpleenroll") -> Reply:
    """Post, and check it was refused with 403 and that nothing was issued."""
    before = len(srv.issued())
    reply = post(srv, label, body, client, operation)
    assert reply.status == 403, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.text.count("\n") == 1 and "subject_policy client-serial" in reply.text
    assert len(srv.issued()) == before, "a refused request was issued anyway"
    return reply


# --------------------------------------------------------------------------- the class of request


# Subjects an LDevID request from device DEV-A-0001 may not carry.
FOREIGN_SUBJECTS: dict[str, tuple[x509.Name, str]] = {
    "another-serial": (name([(CN, "device-B")], [(SERIAL, OTHER)]),
                       f"subject serialNumber '{OTHER}' is not the requesting client's "
                       f"('{MINE}')"),
    "no-serial": (name([(CN, "device-B")]), "has no serialNumber"),
    "mine-then-another": (name([(CN, "x")], [(SERIAL, MINE)], [(SERIAL, OTHER)]),
                          f"'{OTHER}' is not"),
    "another-then-mine": (name([(CN, "x")], [(SERIAL, OTHER)], [(SERIAL, MINE)]),
                          f"'{OTHER}' is not"),
    "another-in-a-multivalued-rdn": (name([(SERIAL, MINE)], [(CN, "x"), (SERIAL, OTHER)]),
                                     f"'{OTHER}' is not"),
    "lower-case": (name([(CN, "x")], [(SERIAL, MINE.lower())]), "is not the requesting"),
    "leading-space": (name([(CN, "x")], [(SERIAL, " " + MINE)]), "is not the requesting"),
    "trailing-space": (name([(CN, "x")], [(SERIAL, MINE + " ")]), "is not the requesting"),
    "prefix-only": (name([(CN, "x")], [(SERIAL, MINE[:-1])]), "is not the requesting"),
    "empty-subject": (x509.Name([]), "has no serialNumber"),
}


@pytest.fixture
def device(est_server: RunningEstServer, tmp_path: Path) -> Identity:
    """Device DEV-A-0001's LDevID (its IDevID is ``device.idevid``)."""
    return ldevid(est_server, tmp_path, serial=MINE)


@pytest.mark.parametrize("case", list(FOREIGN_SUBJECTS), ids=str)
@pytest.mark.parametrize("operation", ["simpleenroll", "serverkeygen"], ids=str)
def test_an_ldevid_is_refused_for_any_subject_without_exactly_the_idevids_serial(
    est_server: RunningEstServer, tmp_path: Path, case: str, operation: str
) -> None:
    client = idevid(est_server, tmp_path, serial=MINE)
    subject, complaint = FOREIGN_SUBJECTS[case]
    reply = refused(est_server, "ldevid", csr(subject), client, operation)
    assert complaint in reply.text


@pytest.mark.parametrize("case", list(FOREIGN_SUBJECTS), ids=str)
def test_an_edge_ca_is_refused_for_any_subject_without_exactly_the_ldevids_serial(
    est_server: RunningEstServer, device: Identity, case: str
) -> None:
    subject, complaint = FOREIGN_SUBJECTS[case]
    assert complaint in refused(est_server, "edgeca", csr(subject), device).text


@pytest.mark.parametrize("operation", ["simpleenroll", "serverkeygen"], ids=str)
def test_the_devices_own_serial_is_issued_whatever_the_cn(
    est_server: RunningEstServer, tmp_path: Path, operation: str
) -> None:
    client = idevid(est_server, tmp_path, serial=MINE)
    subject = name([(CN, "any name the device likes")], [(SERIAL, MINE)], [(SERIAL, MINE)])
    reply = post(est_server, "ldevid", csr(subject), client, operation)
    assert reply.status == 200, reply.text
    if operation == "simpleenroll":
        assert reply.cert().subject == subject


def test_an_edge_ca_carries_the_serial_of_the_ldevid_that_asked(
    est_server: RunningEstServer, device: Identity, tmp_path: Path
) -> None:
    edge = enroll(est_server, "edgeca", tmp_path, "edge", cn="device A Edge CA", serial=MINE,
                  client=device).cert
    assert edge.subject.get_attributes_for_oid(SERIAL)[0].value == MINE
    assert edge.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_simplereenroll_of_another_devices_name_is_refused_and_not_issued(
    est_server: RunningEstServer, device: Identity
) -> None:
    # RFC 7030 §4.2.2 already ties a renewal to the certificate being renewed.
    before = len(est_server.issued())
    body = csr(name([(CN, "my-device-id")], [(SERIAL, OTHER)]))
    reply = post(est_server, "ldevid", body, device, "simplereenroll")
    assert reply.status == 400 and "differs from the certificate being renewed" in reply.text
    assert len(est_server.issued()) == before


def test_a_client_certificate_without_serial_gets_nothing(
    fresh_est_server: RunningEstServer, tmp_path: Path
) -> None:
    srv = fresh_est_server
    no_serial = idevid(srv, tmp_path, "plain-idevid", serial=None)
    for subject in (name([(CN, "x")], [(SERIAL, OTHER)]), name([(CN, "x")])):
        assert "client certificate 'CN=IDevID' has no serialNumber" in refused(
            srv, "ldevid", csr(subject), no_serial).text
    # An LDevID issued while the label allowed any subject cannot be renewed, nor
    # get an Edge CA, once it binds (not even under its own, serial-less, name).
    srv.configure("ldevid", subject_policy="any")
    old = enroll(srv, "ldevid", tmp_path, "old", cn="my-device-id", client=no_serial)
    srv.configure("ldevid", subject_policy="client-serial")
    refused(srv, "ldevid", csr(old.cert.subject), old, "simplereenroll")
    refused(srv, "edgeca", csr(old.cert.subject), old)


def test_reenrollment_forcing_does_not_bypass_the_policy(
    fresh_est_server: RunningEstServer, tmp_path: Path
) -> None:
    srv = fresh_est_server
    srv.configure("ldevid", subject_policy="any")
    no_serial = idevid(srv, tmp_path, "plain-idevid", serial=None)
    old = enroll(srv, "ldevid", tmp_path, "old", cn="my-device-id", client=no_serial)
    srv.configure("ldevid", subject_policy="client-serial", reenroll_forcing=True)
    refused(srv, "ldevid", csr(name([(CN, "x")], [(SERIAL, OTHER)])), old)


def test_a_refusal_comes_before_a_pending_answer(fresh_est_server: RunningEstServer,
                                                 tmp_path: Path) -> None:
    fresh_est_server.configure("ldevid", pending=3)
    client = idevid(fresh_est_server, tmp_path, serial=MINE)
    refused(fresh_est_server, "ldevid", csr(name([(CN, "x")], [(SERIAL, OTHER)])), client)


def test_a_refusal_is_logged_with_its_reason(fresh_est_server: RunningEstServer, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    client = idevid(fresh_est_server, tmp_path, serial=MINE)
    caplog.set_level(logging.INFO, logger="tpmid.server")
    caplog.clear()
    refused(fresh_est_server, "ldevid", csr(name([(CN, "x")], [(SERIAL, OTHER)])), client)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST ")]
    assert "label=ldevid status=403" in line
    assert f"serialNumber '{OTHER}' is not the requesting client's ('{MINE}')" in line


# --------------------------------------------------------------------------- any


def test_the_idevid_label_stays_any_the_factory_names_the_device(
    est_server: RunningEstServer,
) -> None:
    for subject in (name([(CN, "IDevID")], [(SERIAL, OTHER)]), name([(CN, "IDevID")])):
        assert post(est_server, "idevid", csr(subject), None).cert().subject == subject


def test_subject_policy_any_switches_the_binding_off(fresh_est_server: RunningEstServer,
                                                     tmp_path: Path) -> None:
    fresh_est_server.configure("ldevid", subject_policy="any")
    client = idevid(fresh_est_server, tmp_path, serial=MINE)
    subject = name([(CN, "device-B")], [(SERIAL, OTHER)])
    assert post(fresh_est_server, "ldevid", csr(subject), client).cert().subject == subject


# --------------------------------------------------------------------------- the policy itself


def _client(subject: x509.Name) -> x509.Certificate:
    """A self-signed stand-in for a TLS client certificate with ``subject``."""
    key = new_key()
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))


@pytest.mark.parametrize(
    ("client", "subject", "complaint"),
    [
        (None, name([(SERIAL, MINE)]), "no TLS client certificate was presented"),
        (name([(CN, "c")]), name([(SERIAL, MINE)]), "has no serialNumber, so no subject"),
        (name([(SERIAL, MINE)], [(SERIAL, OTHER)]), name([(SERIAL, MINE)]),
         "several different serialNumbers"),
        (name([(SERIAL, MINE)]), name([(CN, "x")]), "has no serialNumber; it must carry"),
        (name([(SERIAL, MINE)]), name([(SERIAL, "x" * 500)]), "'" + "x" * 64 + "'..."),
        (name([(SERIAL, MINE)]), name([(SERIAL, MINE)]), None),
        (name([(SERIAL, MINE)], [(SERIAL, MINE)]), name([(SERIAL, MINE)]), None),
    ],
    ids=["no-client-cert", "client-without-serial", "client-with-two-serials",
         "subject-without-serial", "long-value-is-cut", "same-serial",
         "client-with-the-same-serial-twice"],
)
def test_client_serial_policy_table(client: x509.Name | None, subject: x509.Name,
                                    complaint: str | None) -> None:
    cert = _client(client) if client is not None else None
    refusal = ClientSerialSubject().refusal(subject, cert)
    if complaint is None:
        assert refusal is None
    else:
        assert refusal is not None and complaint in refusal
        assert "\n" not in refusal and refusal.endswith("(subject_policy client-serial)")
    assert AnySubject().refusal(subject, cert) is None


# --------------------------------------------------------------------------- config


def test_init_writes_the_safe_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["est-server", "init", "--dir", str(tmp_path / "srv")]) == 0
    assert "subject serialNumber: the client's" in capsys.readouterr().out
    path = tmp_path / "srv" / "config.yaml"
    raw = yaml.safe_load(path.read_text())["labels"]
    assert {label: raw[label]["subject_policy"] for label in raw} == {
        "idevid": "any", "ldevid": "client-serial", "edgeca": "client-serial"}
    labels = load_server_config(path).labels
    assert isinstance(labels["ldevid"].subject_policy, ClientSerialSubject)
    assert isinstance(labels["edgeca"].subject_policy, ClientSerialSubject)
    assert isinstance(labels["idevid"].subject_policy, AnySubject)


def _label(**settings: object) -> dict[str, object]:
    label = {"ca": "operator", "profile": "ldevid", "lifetime": "7day",
             "auth": {"client_cert": {"issuers": ["manufacturer", "operator"]}}}
    return {"labels": {"dev": {**label, **settings}}}


@pytest.mark.parametrize(
    ("auth", "kind"),
    [({"client_cert": {"issuers": ["operator"]}}, "client-serial"),
     ({"secret_value": {"hash": "scrypt$1$1$1$AA==$AA=="}}, "any"),
     ({"basic": {"username": "u", "hash": "scrypt$1$1$1$AA==$AA=="}}, "any"),
     ({"anonymous": True}, "any")],
    ids=["client-cert-binds", "secret-value", "basic", "anonymous"],
)
def test_an_absent_subject_policy_binds_exactly_the_labels_that_authenticate_devices(
    auth: dict[str, object], kind: str
) -> None:
    label = parse_server_config(_label(auth=auth)).labels["dev"]
    assert label.subject_policy.kind == kind


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"subject_policy": "client_serial"}, r"labels\.dev\.subject_policy: 'client_serial' "
         r"is not one of any, client-serial"),
        ({"subject_policy": True}, r"labels\.dev\.subject_policy: expected a non-empty string"),
        ({"subject_policy": ""}, r"labels\.dev\.subject_policy: expected a non-empty string"),
        ({"subject_policy": "client-serial",
          "auth": {"secret_value": {"hash": "scrypt$1$1$1$AA==$AA=="}}},
         r"client-serial binds the subject to the TLS client certificate, so it needs auth "
         r"client_cert \(this label uses secret_value\)"),
        ({"subject_policy": "client-serial", "auth": {"anonymous": True}},
         r"needs auth client_cert \(this label uses anonymous\)"),
    ],
    ids=["typo", "not-a-string", "empty", "client-serial-with-a-secret",
         "client-serial-anonymous"],
)
def test_subject_policy_mistakes_are_config_errors_naming_the_key(
    settings: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_server_config(_label(**settings), "server.yaml")
