"""``tpmid est-server rollover LABEL``: RFC 7030 §4.1.3 Root CA Key Update on the reference server.

Real servers (in-process, real TLS on loopback) and software client identities: what
/cacerts serves, which client certificates the TLS layer accepts before, during and
after the overlap, and a TLS server certificate of a rolled CA that keeps chaining to
the old root.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.server.helpers import DEVICE_SERIAL, enroll, idevid, ldevid, request
from tpmid.cli import main
from tpmid.errors import ConfigError
from tpmid.server.rollover import rollover_ca
from tpmid.server.state import init_server_dir
from tpmid.testing.estserver import RunningEstServer
from tpmid.wiring.est import fetch_cacerts


def _root(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_rollover_serves_the_new_root_with_the_three_key_update_certificates(
    fresh_est_server: RunningEstServer,
) -> None:
    srv = fresh_est_server
    old = _root(srv.operator_ca)
    result = rollover_ca(srv.dir, "ldevid")
    srv.reload()
    new = _root(srv.operator_ca)
    assert (result.ca, result.generation, result.labels) == ("operator", 2, ("edgeca", "ldevid"))
    assert new.subject.rfc4514_string().startswith("CN=tpmid Operator CA (LDevID\\, Edge CA) G2,")
    served = request(srv.url("ldevid", "cacerts"), cafile=srv.tls_ca).certs()
    assert len(served) == 4 and new in served and old in served  # NewWithNew, OldWithOld
    (new_with_old,) = [c for c in served if c.subject == new.subject and c.issuer == old.subject]
    (old_with_new,) = [c for c in served if c.subject == old.subject and c.issuer == new.subject]
    # NewWithOld: the new name and key, signed by the old key; OldWithNew the reverse.
    new_with_old.verify_directly_issued_by(old)
    assert new_with_old.public_key() == new.public_key()
    old_with_new.verify_directly_issued_by(new)
    assert old_with_new.public_key() == old.public_key()
    # The manufacturer CA did not change.
    assert request(srv.url("idevid", "cacerts"), cafile=srv.tls_ca).certs() == [
        _root(srv.manufacturer_ca)]


def test_the_old_cas_client_certificates_are_accepted_until_the_overlap_ends(
    fresh_est_server: RunningEstServer, tmp_path: Path,
) -> None:
    srv = fresh_est_server
    before = ldevid(srv, tmp_path)  # issued by the old operator CA
    rollover_ca(srv.dir, "ldevid")
    srv.reload()
    # During the overlap: the old LDevID renews, and gets a certificate of the new CA.
    renewed = enroll(srv, "ldevid", tmp_path, "renewed", cn="my-device-id",
                     serial=DEVICE_SERIAL, client=before, operation="simplereenroll")
    assert renewed.cert.issuer == _root(srv.operator_ca).subject
    assert main(["est-server", "rollover", "ldevid", "--dir", str(srv.dir), "--finish"]) == 0
    srv.reload()
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA|unknown ca"):
        enroll(srv, "ldevid", tmp_path, "late", cn="my-device-id", serial=DEVICE_SERIAL,
               client=before, operation="simplereenroll")
    # The new CA's certificates go on working; the key-update certificates are still served.
    enroll(srv, "ldevid", tmp_path, "again", cn="my-device-id", serial=DEVICE_SERIAL,
           client=renewed, operation="simplereenroll")
    assert len(request(srv.url("ldevid", "cacerts"), cafile=srv.tls_ca).certs()) == 4


def test_replace_makes_an_unrelated_ca_without_key_update_certificates_or_overlap(
    fresh_est_server: RunningEstServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    srv = fresh_est_server
    before = ldevid(srv, tmp_path)
    assert main(["est-server", "rollover", "ldevid", "--dir", str(srv.dir), "--replace",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["key_update_certificates"], out["overlap"]) == (0, False)
    srv.reload()
    assert request(srv.url("ldevid", "cacerts"), cafile=srv.tls_ca).certs() == [
        _root(srv.operator_ca)]
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA|unknown ca"):
        enroll(srv, "ldevid", tmp_path, "late", cn="my-device-id", serial=DEVICE_SERIAL,
               client=before, operation="simplereenroll")
    # Devices enroll again through their IDevID, from the new CA.
    fresh = enroll(srv, "ldevid", tmp_path, "fresh", cn="my-device-id", serial=DEVICE_SERIAL,
                   client=idevid(srv, tmp_path, "idevid-2"))
    assert fresh.cert.issuer == _root(srv.operator_ca).subject


def test_a_tls_certificate_of_the_rolled_ca_keeps_chaining_to_the_old_root(
    fresh_est_server: RunningEstServer,
) -> None:
    srv = fresh_est_server
    old_tls_root = srv.dir / "old-tls-ca.pem"
    old_tls_root.write_bytes(srv.tls_ca.read_bytes())
    result = rollover_ca(srv.dir, "tls")
    srv.reload()
    assert result.tls_reissued
    # A tpmid client that still trusts the old TLS root: server -> NewWithOld -> old root.
    # (The old root says pathLenConstraint 0, which RFC 5280 does not apply to a trust
    # anchor; a validator that does would refuse the NewWithOld below it.)
    certs = fetch_cacerts(srv.url("idevid"), trusted_certs=[old_tls_root]).certificates
    assert list(certs) == [_root(srv.manufacturer_ca)]
    # A client given the new root: found by name and key.
    assert request(srv.url("idevid", "cacerts"), cafile=srv.tls_ca).status == 200
    leaf = x509.load_pem_x509_certificates((srv.dir / "tls" / "server.pem").read_bytes())[0]
    assert leaf.issuer == _root(srv.tls_ca).subject


def test_rollover_names_what_it_does_not_know(fresh_est_server: RunningEstServer) -> None:
    with pytest.raises(ConfigError, match="neither a label of this server"):
        rollover_ca(fresh_est_server.dir, "nonsense")
    with pytest.raises(ConfigError, match="never rolled over"):
        from tpmid.server.rollover import finish_overlap

        finish_overlap(fresh_est_server.dir, "idevid")


def test_a_tls_certificate_from_a_labels_ca_follows_that_ca_through_its_rollover(
    est_server_factory: Callable[..., RunningEstServer],
) -> None:
    # init --tls-from ldevid: the operator CA issues the TLS certificate too, and
    # devices bootstrap /cacerts by pinning that root (RFC 7030 §4.1.1).
    srv = est_server_factory(init_args={"tls_from": "ldevid"})
    old_root = srv.dir / "old-operator-ca.pem"
    old_root.write_bytes(srv.operator_ca.read_bytes())
    old_pin = _root(old_root).fingerprint(hashes.SHA256()).hex()
    result = rollover_ca(srv.dir, "ldevid")
    srv.reload()
    assert result.tls_reissued
    new = _root(srv.operator_ca)
    # tls-ca.pem, the copy of the operator root, follows it: new devices get the new root.
    assert _root(srv.tls_ca) == new
    served = x509.load_pem_x509_certificates((srv.dir / "tls" / "server.pem").read_bytes())
    assert served[0].issuer == new.subject and served[1].issuer == _root(old_root).subject
    # Devices holding the old root (as a file or as a pin) still authenticate the server.
    for fetched in (fetch_cacerts(srv.url("ldevid"), trusted_certs=[old_root]),
                    fetch_cacerts(srv.url("ldevid"), pin=old_pin),
                    fetch_cacerts(srv.url("ldevid"), trusted_certs=[srv.tls_ca])):
        assert new in fetched.certificates and len(fetched.certificates) == 4
    # There is no TLS CA of its own to roll over: the command says which one to roll.
    with pytest.raises(ConfigError, match="comes from the CA of label edgeca") as info:
        rollover_ca(srv.dir, "tls")
    assert f"tpmid est-server rollover edgeca --dir {srv.dir}" in (info.value.hint or "")


def test_rollover_without_a_running_server_says_it_applies_at_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    init_server_dir(tmp_path / "srv")
    assert main(["est-server", "rollover", "edgeca", "--dir", str(tmp_path / "srv")]) == 0
    out = capsys.readouterr().out
    assert "rolled the operator CA over (generation 2; labels edgeca, ldevid)" in out
    assert "no server runs for this directory: it applies when the server starts" in out
    assert main(["est-server", "rollover", "ldevid", "--dir", str(tmp_path / "srv"),
                 "--finish", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ca": "operator", "overlap": False,
                                                   "server": None}
