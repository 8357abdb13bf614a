"""Every EST endpoint of the reference server, over real TLS on loopback (RFC 7030 §3.2.2, §4)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AttributeOID

from tests.server.helpers import (
    DEVICE_SERIAL,
    HARDWARE_MODULE_NAME,
    csr_body,
    enroll,
    hardware_module_name,
    idevid,
    ldevid,
    make_csr,
    new_key,
    request,
)
from tpmid.est import messages
from tpmid.render import name as render_name
from tpmid.render import serial as render_serial
from tpmid.testing.estserver import RunningEstServer

LABEL_CA = {"idevid": "manufacturer", "ldevid": "operator", "edgeca": "operator"}


def ca_cert(srv: RunningEstServer, name: str) -> x509.Certificate:
    path = srv.manufacturer_ca if name == "manufacturer" else srv.operator_ca
    return x509.load_pem_x509_certificate(path.read_bytes())


def spki(obj: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return obj.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------- /cacerts


@pytest.mark.parametrize(("label", "ca"), [*LABEL_CA.items(), (None, "operator")],
                         ids=["idevid", "ldevid", "edgeca", "label-less-default"])
def test_cacerts_serves_the_issuing_ca_of_each_label_without_credentials(
    est_server: RunningEstServer, label: str | None, ca: str
) -> None:
    reply = request(est_server.url(label, "cacerts"), cafile=est_server.tls_ca)
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    assert reply.certs() == [ca_cert(est_server, ca)]
    # RFC 7030 §4.1.3 / RFC 8951: base64, here in 64-column lines openssl can read.
    assert all(len(line) <= 64 for line in reply.body.splitlines())


# --------------------------------------------------------------------------- /csrattrs


def test_csrattrs_asks_for_the_ca_key_type_and_signature_algorithm(
    est_server: RunningEstServer,
) -> None:
    reply = request(est_server.url("ldevid", "csrattrs"), cafile=est_server.tls_ca)
    assert reply.status == 200
    assert messages.media_type_matches(reply.headers["content-type"], messages.CSRATTRS)
    items = messages.decode_csrattrs(reply.body)
    assert [(i.oid.dotted_string, i.value_oids) for i in items] == [
        ("1.2.840.10045.2.1", ("1.2.840.10045.3.1.7",)),  # id-ecPublicKey: prime256v1
        ("1.2.840.10045.4.3.2", ()),  # ecdsa-with-SHA256
    ]


def test_csrattrs_lists_challenge_password_when_pop_is_required(
    fresh_est_server: RunningEstServer,
) -> None:
    fresh_est_server.configure("ldevid", pop=True)
    reply = request(fresh_est_server.url("ldevid", "csrattrs"), cafile=fresh_est_server.tls_ca)
    assert messages.decode_csrattrs(reply.body)[0].oid == AttributeOID.CHALLENGE_PASSWORD


def test_csrattrs_configured_list_is_served_and_an_empty_one_is_204(
    fresh_est_server: RunningEstServer,
) -> None:
    srv = fresh_est_server
    srv.configure("ldevid", csrattrs=["1.2.840.113549.1.9.7",
                                      {"type": "2.999.1", "values": ["2.999.3"]}])
    items = messages.decode_csrattrs(
        request(srv.url("ldevid", "csrattrs"), cafile=srv.tls_ca).body)
    assert [(i.oid.dotted_string, i.value_oids) for i in items] == [
        ("1.2.840.113549.1.9.7", ()), ("2.999.1", ("2.999.3",))]
    srv.configure("ldevid", csrattrs=[])
    reply = request(srv.url("ldevid", "csrattrs"), cafile=srv.tls_ca)
    assert (reply.status, reply.body) == (204, b"")


# --------------------------------------------------------------------------- /simpleenroll


def test_simpleenroll_at_idevid_issues_an_idevid_from_the_manufacturer_ca(
    est_server: RunningEstServer, tmp_path: Path
) -> None:
    ident = idevid(est_server, tmp_path, serial=None)
    ident.cert.verify_directly_issued_by(ca_cert(est_server, "manufacturer"))
    assert render_name(ident.cert.subject) == "CN=IDevID"
    assert spki(ident.cert) == ident.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_idevid_keeps_the_hardware_module_name_from_the_csr(est_server: RunningEstServer) -> None:
    # IEEE 802.1AR / RFC 4108 §5: the TPM's identity travels as an otherName SAN.
    hmn = hardware_module_name("2.23.133.1.2", b"EK-SERIAL-0001")  # TCG hwType (illustrative)
    csr = make_csr(new_key(), "IDevID", hw_module=hmn)
    reply = request(est_server.url("idevid", "simpleenroll"), cafile=est_server.tls_ca,
                    method="POST", body=csr_body(csr),
                    headers={"Content-Type": messages.PKCS10, "Secret-Value": est_server.secret})
    san = reply.cert().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [(o.type_id, o.value) for o in san.get_values_for_type(x509.OtherName)] == [
        (HARDWARE_MODULE_NAME, hmn)]


def test_simpleenroll_at_ldevid_and_edgeca_issue_from_the_operator_ca(
    est_server: RunningEstServer, tmp_path: Path
) -> None:
    dev = ldevid(est_server, tmp_path)
    dev.cert.verify_directly_issued_by(ca_cert(est_server, "operator"))
    edge = enroll(est_server, "edgeca", tmp_path, "edgeca", cn="my-device-id edge CA",
                  serial=DEVICE_SERIAL, client=dev)
    edge.cert.verify_directly_issued_by(ca_cert(est_server, "operator"))
    bc = edge.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (bc.ca, bc.path_length) == (True, 0)


def test_label_less_enrollment_goes_to_the_default_label(est_server: RunningEstServer,
                                                         tmp_path: Path) -> None:
    dev = idevid(est_server, tmp_path)
    cert = enroll(est_server, "", tmp_path, "default", cn="via-default", serial=DEVICE_SERIAL,
                  client=dev).cert
    cert.verify_directly_issued_by(ca_cert(est_server, "operator"))  # default label: ldevid


def test_every_issued_certificate_is_in_the_issue_log(fresh_est_server: RunningEstServer,
                                                     tmp_path: Path) -> None:
    dev = ldevid(fresh_est_server, tmp_path)
    records = fresh_est_server.issued()
    serial = f"serialNumber={DEVICE_SERIAL}"  # as tpmid.render.name writes it
    assert [(r["label"], r["subject"]) for r in records] == [
        ("idevid", f"{serial},CN=IDevID"), ("ldevid", f"{serial},CN=my-device-id")]
    assert records[-1]["serial"] == render_serial(dev.cert.serial_number)
    assert records[-1]["authenticated_as"] == f"cert:{serial},CN=IDevID"


# --------------------------------------------------------------------------- /simplereenroll


def test_simplereenroll_renews_the_client_certificate_with_a_new_key(
    est_server: RunningEstServer, tmp_path: Path
) -> None:
    dev = ldevid(est_server, tmp_path)
    renewed = enroll(est_server, "ldevid", tmp_path, "renewed", cn="my-device-id",
                     serial=DEVICE_SERIAL, client=dev, operation="simplereenroll")
    assert renewed.cert.subject == dev.cert.subject
    assert spki(renewed.cert) != spki(dev.cert)
    assert renewed.cert.serial_number != dev.cert.serial_number


def test_simplereenroll_with_the_same_key_is_allowed(est_server: RunningEstServer,
                                                     tmp_path: Path) -> None:
    dev = ldevid(est_server, tmp_path)
    renewed = enroll(est_server, "ldevid", tmp_path, "renewed", cn="my-device-id",
                     serial=DEVICE_SERIAL, client=dev, operation="simplereenroll", key=dev.key)
    assert spki(renewed.cert) == spki(dev.cert)


# --------------------------------------------------------------------------- /serverkeygen


def test_serverkeygen_returns_a_new_private_key_and_its_certificate(
    est_server: RunningEstServer, tmp_path: Path
) -> None:
    dev = idevid(est_server, tmp_path)
    csr_key = new_key()
    reply = request(est_server.url("ldevid", "serverkeygen"), cafile=est_server.tls_ca,
                    method="POST", body=csr_body(make_csr(csr_key, "keygen-device", serial=DEVICE_SERIAL)),
                    headers={"Content-Type": messages.PKCS10},
                    cert=dev.cert_path, key=dev.key_path)
    assert reply.status == 200, reply.text
    key_der, certs = messages.parse_serverkeygen(reply.body, reply.headers["content-type"])
    key = serialization.load_der_private_key(key_der, password=None)
    (cert,) = certs
    assert render_name(cert.subject) == f"serialNumber={DEVICE_SERIAL},CN=keygen-device"
    assert spki(cert) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    # RFC 7030 §4.4.1: the CSR's own key is ignored.
    assert spki(cert) != csr_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_serverkeygen_can_be_switched_off_per_label(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.configure("idevid", serverkeygen=False)
    reply = request(fresh_est_server.url("idevid", "serverkeygen"),
                    cafile=fresh_est_server.tls_ca, method="POST",
                    body=csr_body(make_csr(new_key())),
                    headers={"Content-Type": messages.PKCS10,
                             "Secret-Value": fresh_est_server.secret})
    assert reply.status == 404


# --------------------------------------------------------------------------- HTTP errors


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        ("/.well-known/est/nolabel/cacerts", "GET", 404),
        ("/.well-known/est/ldevid/enroll", "GET", 404),
        ("/.well-known/est/a/b/cacerts", "GET", 404),
        ("/index.html", "GET", 404),
        ("/.well-known/est/ldevid/cacerts", "POST", 405),
        ("/.well-known/est/ldevid/simpleenroll", "GET", 405),
        ("/.well-known/est/ldevid/csrattrs", "DELETE", 405),
    ],
    ids=["unknown-label", "unknown-operation", "too-deep", "not-est", "post-cacerts",
         "get-simpleenroll", "delete-csrattrs"],
)
def test_wrong_paths_and_methods_get_404_or_405(est_server: RunningEstServer, path: str,
                                                method: str, status: int) -> None:
    reply = request(est_server.url().split("/.well-known")[0] + path, cafile=est_server.tls_ca,
                    method=method, body=b"" if method == "POST" else None)
    assert reply.status == status
    if status == 405:
        assert reply.headers["allow"] in ("GET", "POST")


def test_enrollment_with_the_wrong_content_type_is_415(est_server: RunningEstServer) -> None:
    reply = request(est_server.url("idevid", "simpleenroll"), cafile=est_server.tls_ca,
                    method="POST", body=csr_body(make_csr(new_key())),
                    headers={"Content-Type": "application/octet-stream",
                             "Secret-Value": est_server.secret})
    assert reply.status == 415
    assert "application/pkcs10" in reply.text


def test_label_less_path_without_a_default_label_is_404(fresh_est_server: RunningEstServer) -> None:
    fresh_est_server.edit_config(lambda d: d.pop("default_label"))
    reply = request(fresh_est_server.url(None, "cacerts"), cafile=fresh_est_server.tls_ca)
    assert reply.status == 404 and "no default label" in reply.text


def test_oversized_request_body_is_413(est_server: RunningEstServer) -> None:
    reply = request(est_server.url("idevid", "simpleenroll"), cafile=est_server.tls_ca,
                    method="POST", body=b"A" * 70000,
                    headers={"Content-Type": messages.PKCS10})
    assert reply.status == 413


# --------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("tls", ["1.2", "1.3"], ids=["tls1.2", "tls1.3"])
def test_mtls_enrollment_works_over_tls_1_2_and_1_3(est_server: RunningEstServer,
                                                    tmp_path: Path, tls: str) -> None:
    dev = enroll(est_server, "idevid", tmp_path, "idevid", cn="IDevID", serial=DEVICE_SERIAL,
                 tls=tls)
    reply = request(est_server.url("ldevid", "simpleenroll"), cafile=est_server.tls_ca,
                    method="POST",
                    body=csr_body(make_csr(new_key(), "tls-" + tls, serial=DEVICE_SERIAL)),
                    headers={"Content-Type": messages.PKCS10},
                    cert=dev.cert_path, key=dev.key_path, tls=tls)
    assert reply.tls_version == f"TLSv{tls}"
    assert render_name(reply.cert().subject) == f"serialNumber={DEVICE_SERIAL},CN=tls-{tls}"


def test_tls_minimum_version_from_config_refuses_older_clients(est_server_factory) -> None:
    srv = est_server_factory(config=lambda d: d["tls"].update(min_version="1.3"))
    with pytest.raises(ssl.SSLError):
        request(srv.url("idevid", "cacerts"), cafile=srv.tls_ca, tls="1.2")
    assert request(srv.url("idevid", "cacerts"), cafile=srv.tls_ca, tls="1.3").status == 200


def test_server_certificate_is_valid_for_ipv6_loopback(est_server_factory) -> None:
    from tpmid.server import EstServer

    srv = est_server_factory()
    with EstServer(srv.dir, host="::1", port=0) as v6:
        reply = request(v6.url("ldevid", "cacerts"), cafile=srv.tls_ca)
    assert reply.status == 200


def test_one_access_log_line_per_request_and_never_the_secret(
    fresh_est_server: RunningEstServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tpmid.server")
    idevid(fresh_est_server, tmp_path, serial=None)
    request(fresh_est_server.url("idevid", "simpleenroll"), cafile=fresh_est_server.tls_ca,
            method="POST", body=csr_body(make_csr(new_key())),
            headers={"Content-Type": messages.PKCS10, "Secret-Value": "wrong-" + "x" * 8})
    lines = [r.getMessage() for r in caplog.records if r.name == "tpmid.server"
             and r.getMessage().startswith("POST ")]
    assert len(lines) == 2
    assert "label=idevid status=200" in lines[0] and "subject=CN=IDevID" in lines[0]
    assert "status=401" in lines[1] and "does not match" in lines[1]
    full_log = "\n".join(r.getMessage() for r in caplog.records)
    assert fresh_est_server.secret not in full_log and "wrong-xxxxxxxx" not in full_log


def test_keep_alive_connection_serves_several_requests_and_stop_closes_it_promptly(
    est_server_factory,
) -> None:
    import http.client
    import time

    from tests.server.helpers import client_context

    srv = est_server_factory()
    conn = http.client.HTTPSConnection(srv.host, srv.port, context=client_context(srv.tls_ca))
    try:
        for label in ("idevid", "ldevid", "edgeca"):
            conn.request("GET", f"/.well-known/est/{label}/cacerts")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
        first_socket = conn.sock
        conn.request("GET", "/.well-known/est/idevid/csrattrs")
        conn.getresponse().read()
        assert conn.sock is first_socket  # still the same TLS connection
        start = time.monotonic()
        assert srv.server is not None
        srv.server.stop()
        assert time.monotonic() - start < 2  # the idle connection did not hold it up
    finally:
        conn.close()


def test_client_controlled_text_cannot_forge_extra_log_lines(
    fresh_est_server: RunningEstServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tpmid.server")
    reply = request(fresh_est_server.url("idevid", "simpleenroll"),
                    cafile=fresh_est_server.tls_ca, method="POST",
                    body=csr_body(make_csr(new_key(), "evil\nINFO forged line")),
                    headers={"Content-Type": messages.PKCS10,
                             "Secret-Value": fresh_est_server.secret})
    assert reply.status == 200
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST ")]
    assert "\n" not in line and "evil\\x0aINFO forged line" in line
