"""``enroll_identity``: whole enrollments with keys in a simulated TPM and the reference server.

Every test uses a factory-fresh swtpm and a reference EST server of its own
(in-process, real TLS on loopback). The IDevID is a persistent TPM key enrolled
with the Secret-Value header; the LDevID and Edge CA are TSS2 key files
enrolled over mutual TLS whose client key is the IDevID (resp. LDevID) in the TPM.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.est.test_client import FakeClock, load
from tests.est.test_client_support import (
    SECRET_ENV,
    identity_config,
    spki,
    tls_versions,
    transient_handles,
)
from tests.support.wiring import enroll
from tpmid.config import Config
from tpmid.errors import (
    ConfigError,
    EstAuthError,
    EstProtocolError,
    EstRetryLater,
    EstServerError,
    EstTransportError,
    StoreError,
    VerificationError,
)
from tpmid.lifecycle.enroll import EnrollResult
from tpmid.render import name as render_name
from tpmid.store import Store
from tpmid.testing.estserver import RunningEstServer, start_est_server
from tpmid.testing.swtpm import Swtpm
from tpmid.testing.tpmproxy import TpmProxy
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import create_persistent_idevid, open_persistent
from tpmid.tpm.keyfile import load_key_file


@dataclass
class Rig:
    """One device (TPM + store + config) and its EST server."""

    tpm: TpmConnection
    tcti: str
    server: RunningEstServer
    store_dir: Path
    config: Config
    proxy: TpmProxy | None = None

    def enroll(self, name: str, *, config: Config | None = None, **kw: Any) -> EnrollResult:
        kw.setdefault("secrets", {SECRET_ENV: self.server.secret})
        kw.setdefault("tpm", self.tpm)
        return enroll(config or self.config, name, **kw)

    def reconfigure(self, **kw: Any) -> Config:
        self.config = identity_config(self.server, self.store_dir, self.tcti, **kw)
        return self.config

    @property
    def store(self) -> Store:
        return Store(self.store_dir)


@pytest.fixture
def make_rig(swtpm: Swtpm, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """``make_rig(template="H-2", tls=None, server_edit=None, proxy=False, **config)``."""
    opened: list[tuple[TpmConnection, RunningEstServer, TpmProxy | None]] = []

    def make(*, template: str = "H-2", tls: str | None = None,
             server_edit: Callable[[dict[str, Any]], None] | None = None,
             proxy: bool = False, **config: Any) -> Rig:
        def edit(d: dict[str, Any]) -> None:
            if tls:
                tls_versions(tls)(d)
            if server_edit:
                server_edit(d)

        srv = start_est_server(tmp_path / "srv", config=edit)
        px = TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port).start() if proxy else None
        tcti = px.tcti if px else swtpm.tcti
        tpm = TpmConnection(tcti)
        opened.append((tpm, srv, px))
        create_persistent_idevid(tpm, template)
        store = tmp_path / "store"
        return Rig(tpm, tcti, srv, store,
                   identity_config(srv, store, tcti, template=template, **config), px)

    yield make
    for tpm, srv, px in opened:
        tpm.close()
        srv.stop()
        if px:
            px.stop()


def _label(d: dict[str, Any], label: str, **settings: Any) -> None:
    d["labels"][label].update(settings)


# identity_config's serialNumber (its IDevID's, bound by the server's client-serial labels)
# as RFC 4514 writes it: serialNumber has no short name there.
SN = "serialNumber=TPMID-TEST-0001"


# --------------------------------------------------------------------------- the main flows


FLOWS = {
    "ECC P-256 (H-2) over TLS 1.2": ("H-2", "1.2"),
    "ECC P-256 (H-2) over TLS 1.3": ("H-2", "1.3"),
    "ECC P-384 (H-3) over TLS 1.2": ("H-3", "1.2"),
    "ECC P-384 (H-3) over TLS 1.3": ("H-3", "1.3"),
    "RSA-2048 (H-1) over TLS 1.2": ("H-1", "1.2"),
}


@pytest.mark.parametrize(("template", "tls"), FLOWS.values(), ids=FLOWS.keys())
def test_idevid_by_secret_value_then_ldevid_over_mtls_with_the_tpm_idevid_key(
    template: str, tls: str, make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tpmid.server")
    rig = make_rig(template=template, tls=tls)
    idevid_key = open_persistent(rig.tpm, 0x81020000, expect_template=template)
    idevid_spki = idevid_key.public_key_der()
    idevid_key.close()

    idevid = rig.enroll("idevid")
    assert spki(idevid.certificate) == idevid_spki
    assert idevid.certificate.issuer == load(rig.server.manufacturer_ca)[0].subject
    assert idevid.key_path is None  # a persistent key has no file
    ldevid = rig.enroll("ldevid")

    assert ldevid.certificate.issuer == load(rig.server.operator_ca)[0].subject
    assert render_name(ldevid.certificate.subject) == f"{SN},CN=my-device-id"
    assert ldevid.key_path is not None
    stored_key = load_key_file(rig.tpm, ldevid.key_path.read_bytes())
    try:
        assert spki(ldevid.certificate) == stored_key.public_key_der()
    finally:
        stored_key.close()
    # The LDevID request was authenticated by the TPM-held IDevID over the pinned version.
    assert (f"POST /.well-known/est/ldevid/simpleenroll label=ldevid status=200 "
            f"client={SN},CN=IDevID TLSv{tls}") in caplog.text
    # Durable, private files: key 0600 in a 0700 directory, certificates 0644.
    assert stat.S_IMODE(os.stat(ldevid.key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ldevid.key_path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ldevid.cert_path).st_mode) == 0o644
    assert x509.load_pem_x509_certificates(ldevid.chain_path.read_bytes()) == list(ldevid.chain)
    assert transient_handles(rig.tcti) == []


def test_ldevid_reenrolls_over_mtls_with_its_own_key_file_and_rotates_it(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tpmid.server")
    rig = make_rig()
    rig.enroll("idevid")
    first = rig.enroll("ldevid")
    second = rig.enroll("ldevid", reenroll=True)

    assert second.operation == "simplereenroll"
    assert (second.version, first.version) == ("0002", "0001")
    assert second.key_path != first.key_path and second.key_path is not None
    assert spki(second.certificate) != spki(first.certificate)  # rotate_key (default)
    assert second.certificate.subject == first.certificate.subject
    assert ("POST /.well-known/est/ldevid/simplereenroll label=ldevid status=200 "
            f"client={SN},CN=my-device-id") in caplog.text
    current = rig.store.current("ldevid")
    assert current is not None and current.cert == second.certificate
    assert first.key_path is not None and first.key_path.exists()  # previous version kept
    assert transient_handles(rig.tcti) == []


def test_reenroll_without_rotation_keeps_the_key(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.enroll("idevid")
    first = rig.enroll("ldevid")
    cfg = rig.config
    ident = cfg.identities["ldevid"]
    no_rotate = dataclasses.replace(cfg, identities={
        **cfg.identities,
        "ldevid": dataclasses.replace(ident, renew=dataclasses.replace(ident.renew,
                                                                       rotate_key=False)),
    })
    second = rig.enroll("ldevid", config=no_rotate, reenroll=True)
    assert spki(second.certificate) == spki(first.certificate)
    assert second.certificate.serial_number != first.certificate.serial_number


def test_edge_ca_is_enrolled_at_the_edgeca_label_with_the_ldevid(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tpmid.server")
    rig = make_rig()
    rig.enroll("idevid")
    rig.enroll("ldevid")
    edge = rig.enroll("edgeca")
    bc = edge.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    assert edge.certificate.issuer == load(rig.server.operator_ca)[0].subject
    assert f"label=edgeca status=200 client={SN},CN=my-device-id" in caplog.text


def test_one_ldevid_enrollment_costs_the_documented_tpm_commands(
    make_rig: Callable[..., Rig],
) -> None:
    """docs/est-client.md, "TPM commands per enrollment": a new key file, created and
    loaded in one (CreatePrimary of the storage root key, CreateLoaded), the CSR (Sign),
    freeing it (FlushContext), opening the persistent IDevID (one ReadPublic: its Name
    proves it is the certificate's key from the template), one mTLS handshake for
    /cacerts and /simpleenroll on one connection (Sign), then the storage root key is
    flushed. No command to probe the TPM when connecting."""
    rig = make_rig(proxy=True)
    rig.enroll("idevid")
    proxy = rig.proxy
    assert proxy is not None
    proxy.reset()
    with TpmConnection(rig.tcti) as tpm:  # a command's own connection, as the CLI opens
        rig.enroll("ldevid", tpm=tpm)
    assert Counter(proxy.commands) == Counter({
        "TPM2_CreatePrimary": 1, "TPM2_CreateLoaded": 1, "TPM2_FlushContext": 2,
        "TPM2_ReadPublic": 1, "TPM2_Sign": 2,
    })
    # The handshake comes after the new key was flushed; the parent goes last.
    assert proxy.commands[-2:] == ["TPM2_Sign", "TPM2_FlushContext"]
    assert transient_handles(rig.tcti) == []


# --------------------------------------------------------------------------- 202 Accepted


def test_pending_enrollment_is_resent_until_issued(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(server_edit=lambda d: _label(d, "idevid", pending=2, retry_after=3))
    clock = FakeClock()
    result = rig.enroll("idevid", sleep=clock.sleep, now=clock.now)
    assert clock.sleeps == [3, 3]
    assert len(rig.server.issued()) == 1
    assert rig.store.journal_get("idevid") is None
    assert result.version == "0001"


def test_pending_beyond_max_wait_keeps_the_csr_and_the_next_run_resends_it(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(server_edit=lambda d: _label(d, "ldevid", pending=2, retry_after=60),
                   ldevid_est={"max_wait": 0})
    rig.enroll("idevid")
    with pytest.raises(EstRetryLater) as info:
        rig.enroll("ldevid")
    assert info.value.retry_after == 60
    assert "`tpmid renew ldevid` (or the daemon) resends it" in (info.value.hint or "")
    entry = rig.store.journal_get("ldevid")
    assert entry is not None and entry.phase == "pending" and entry.retry_after == 60
    assert entry.csr_pem and entry.version == "0001"
    staged = rig.store.key_path("ldevid", "0001")
    assert staged.exists() and rig.store.current("ldevid") is None

    with pytest.raises(EstRetryLater):
        rig.enroll("ldevid")  # still pending: the same CSR again
    result = rig.enroll("ldevid")
    assert result.resumed and result.key_path == staged
    assert x509.load_pem_x509_csr(entry.csr_pem.encode()).public_key() == \
        result.certificate.public_key()
    assert [r["label"] for r in rig.server.issued()] == ["idevid", "ldevid"]
    assert rig.store.journal_get("ldevid") is None
    assert transient_handles(rig.tcti) == []


# --------------------------------------------------------------------------- rejections


REJECTIONS: dict[str, tuple[str, dict[str, Any], type[Exception], str]] = {
    "certificate for another key": (
        "ldevid", {"faults": {"wrong_key": True}}, VerificationError,
        "issued a certificate for another key"),
    "rewritten subject (re-enrollment forcing)": (
        "edgeca", {"reenroll_forcing": True}, VerificationError,
        f"rewrote the subject: requested '{SN},CN=my-device-id Edge CA', "
        f"issued '{SN},CN=my-device-id'"),
    "malformed body": (
        "ldevid", {"faults": {"malformed_body": True, "operations": ["simpleenroll"]}},
        EstProtocolError, "/ldevid/simpleenroll: the body is not a certs-only PKCS#7"),
    "wrong content type": (
        "ldevid", {"faults": {"wrong_content_type": True, "operations": ["simpleenroll"]}},
        EstProtocolError, "wrong media type 'text/plain"),
    "5xx": (
        "ldevid", {"faults": {"status": 503, "operations": ["simpleenroll"]}},
        EstServerError, "answered 503"),
    "malformed /cacerts": (
        "ldevid", {"faults": {"malformed_body": True, "operations": ["cacerts"]}},
        EstProtocolError, "/ldevid/cacerts: the body is not a certs-only PKCS#7"),
}


@pytest.mark.parametrize(("identity", "settings", "error", "message"), REJECTIONS.values(),
                         ids=REJECTIONS.keys())
def test_bad_answers_are_rejected_precisely_and_leave_nothing_behind(
    identity: str, settings: dict[str, Any], error: type[Exception], message: str,
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    rig.enroll("idevid")
    if identity == "edgeca":
        rig.enroll("ldevid")
    rig.server.configure(identity, **settings)
    with pytest.raises(error) as info:
        rig.enroll(identity)
    assert message in str(info.value)
    assert rig.store.current(identity) is None
    assert rig.store.journal_get(identity) is None
    assert list((rig.store_dir / "keys" / identity).glob("*")) == []  # staged key rolled back
    assert transient_handles(rig.tcti) == []


def test_a_rewritten_subject_is_accepted_when_configured_and_reported(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    rig = make_rig(server_edit=lambda d: _label(d, "edgeca", reenroll_forcing=True),
                   edgeca_est={"accept_rewritten_subject": True})
    rig.enroll("idevid")
    rig.enroll("ldevid")
    edge = rig.enroll("edgeca")
    assert edge.subject_rewritten
    assert edge.summary()["requested_subject"] == f"{SN},CN=my-device-id Edge CA"
    assert edge.summary()["subject"] == f"{SN},CN=my-device-id"
    assert "rewrote the subject" in caplog.text


def test_wrong_secret_is_an_auth_error_and_nothing_is_stored(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    with pytest.raises(EstAuthError) as info:
        rig.enroll("idevid", secrets={SECRET_ENV: "wrong-" + rig.server.secret})
    assert info.value.status == 401
    assert rig.store.current("idevid") is None and rig.store.journal_get("idevid") is None


def test_a_missing_secret_names_where_it_was_expected(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    with pytest.raises(ConfigError, match=f"environment variable {SECRET_ENV}"):
        rig.enroll("idevid", secrets={})


def test_ldevid_before_idevid_is_refused_with_the_next_step(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    with pytest.raises(StoreError) as info:
        rig.enroll("ldevid")
    assert info.value.hint == "run `tpmid enroll idevid` first"
    assert list((rig.store_dir / "keys" / "ldevid").glob("*")) == []


def test_untrusted_server_is_rejected(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.reconfigure(trust={"est_anchors": [str(rig.server.operator_ca)]})
    with pytest.raises(EstTransportError, match="unable to get local issuer certificate"):
        rig.enroll("idevid")


def test_no_trust_anchor_at_all_is_a_config_error(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.reconfigure(trust={})
    with pytest.raises(ConfigError, match="no trust anchor for the EST server"):
        rig.enroll("idevid")


def test_issuer_anchors_from_the_config_replace_cacerts(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    # Anchoring the IDevID at the *operator* CA must fail: it is the wrong issuer.
    rig.reconfigure(idevid_est={"issuer_anchors": [str(rig.server.operator_ca)]})
    with pytest.raises(VerificationError, match="does not validate against the issuing CA"):
        rig.enroll("idevid")
    rig.reconfigure(idevid_est={"issuer_anchors": [str(rig.server.manufacturer_ca)]})
    assert rig.enroll("idevid").chain == tuple(load(rig.server.manufacturer_ca))


# --------------------------------------------------------------------------- pinned bootstrap


def _pin(path: Path) -> str:
    return load(path)[0].fingerprint(hashes.SHA256()).hex()


def _reissue_tls_cert_under(server_dir: Path, ca: str) -> None:
    """Replace the server's TLS certificate with one issued by its ``ca`` CA (same key)."""
    import datetime
    import ipaddress

    ca_cert = load(server_dir / f"{ca}-ca.pem")[0]
    ca_key = serialization.load_pem_private_key(
        (server_dir / "private" / f"{ca}-ca.key").read_bytes(), None)
    tls_key = serialization.load_pem_private_key(
        (server_dir / "private" / "server.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(tls_key.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (server_dir / "tls" / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_pinned_bootstrap_enrolls_without_a_configured_trust_anchor(
    swtpm: Swtpm, tmp_path: Path,
) -> None:
    from tpmid.server import EstServer, init_server_dir

    res = init_server_dir(tmp_path / "srv")
    _reissue_tls_cert_under(res.dir, "manufacturer")
    server = EstServer(res.dir, port=0).start()
    try:
        srv = RunningEstServer(dir=res.dir, host=server.host, port=server.port, secret=res.secret,
                               tls_ca=res.tls_ca_path, manufacturer_ca=res.manufacturer_ca_path,
                               operator_ca=res.operator_ca_path, server=server)
        cfg = identity_config(srv, tmp_path / "store", swtpm.tcti, trust={},
                              idevid_est={"pin": _pin(res.manufacturer_ca_path)})
        with TpmConnection(swtpm.tcti) as tpm:
            create_persistent_idevid(tpm, "H-2")
            result = enroll(cfg, "idevid", tpm=tpm, secrets={SECRET_ENV: res.secret})
        assert result.chain == tuple(load(res.manufacturer_ca_path))
    finally:
        server.stop()


PIN_FAILURES = {
    "pin mismatch": ("operator_ca", "no certificate from /cacerts matches the pinned"),
    "server TLS certificate not under the pinned root": (
        "manufacturer_ca", "does not validate for '127.0.0.1' against the pinned root"),
}


@pytest.mark.parametrize(("pinned", "message"), PIN_FAILURES.values(), ids=PIN_FAILURES.keys())
def test_pinned_bootstrap_refuses_what_the_pin_does_not_cover(
    pinned: str, message: str, make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    rig.reconfigure(trust={}, idevid_est={"pin": _pin(getattr(rig.server, pinned))})
    with pytest.raises(VerificationError, match=message):
        rig.enroll("idevid")
    assert rig.server.issued() == []


# --------------------------------------------------------------------------- secrets


def test_the_secret_never_appears_in_logs_at_debug(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    rig = make_rig(server_edit=lambda d: _label(d, "idevid", pending=1, retry_after=0))
    secret = rig.server.secret
    rig.enroll("idevid")
    with pytest.raises(EstAuthError) as info:
        rig.enroll("idevid", secrets={SECRET_ENV: secret[:-2]})
    for text in (caplog.text, str(info.value), info.value.body):
        assert secret not in text and secret[:-2] not in text
    assert any(r.name.startswith("urllib3") for r in caplog.records)  # urllib3 was listening
    assert "'Secret-Value': '<redacted>'" in caplog.text


# --------------------------------------------------------------------------- proof of possession


def test_pop_linked_enrollment_signs_tls_unique_into_the_csr_with_the_tpm(
    make_rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tpmid.server")
    def pop_labels(d: dict[str, Any]) -> None:
        _label(d, "idevid", pop=True)
        _label(d, "ldevid", pop=True)

    rig = make_rig(server_edit=pop_labels, idevid_est={"pop": True}, ldevid_est={"pop": True})
    rig.enroll("idevid")
    ldevid = rig.enroll("ldevid")
    assert ldevid.key_path is not None
    # RFC 7030 §3.5 needs tls-unique, so tpmid capped these connections at TLS 1.2.
    assert "POST /.well-known/est/idevid/simpleenroll label=idevid status=200 client=- " \
           "TLSv1.2" in caplog.text
    assert "label=ldevid status=200 client=serialNumber=TPMID-TEST-0001,CN=IDevID TLSv1.2" \
        in caplog.text
    assert transient_handles(rig.tcti) == []


def test_a_pop_label_refuses_an_unlinked_request_and_the_key_is_rolled_back(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(server_edit=lambda d: _label(d, "ldevid", pop=True))
    rig.enroll("idevid")
    with pytest.raises(EstServerError, match="proof-of-possession linking needs tls-unique") \
            as info:
        rig.enroll("ldevid")
    assert info.value.status == 400
    assert list((rig.store_dir / "keys" / "ldevid").glob("*")) == []


def test_hardware_module_name_names_this_tpm_in_the_issued_certificate(
    make_rig: Callable[..., Rig],
) -> None:
    from tpmid.csr import OID_HARDWARE_MODULE_NAME, parse_hardware_module_name

    rig = make_rig()
    ident = rig.config.identities["idevid"]
    cfg = dataclasses.replace(rig.config, identities={
        **rig.config.identities,
        "idevid": dataclasses.replace(ident, san=dataclasses.replace(
            ident.san, hardware_module_name=True)),
    })
    cert = rig.enroll("idevid", config=cfg).certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (other,) = [n for n in san if isinstance(n, x509.OtherName)]
    assert other.type_id.dotted_string == OID_HARDWARE_MODULE_NAME
    hw_type, serial = parse_hardware_module_name(other.value)
    assert hw_type == "2.23.133.1.2"  # TCG: TPM 2.0
    # swtpm's EK certificates carry an AKI, so hwSerialNum is "<mfr>:<aki>:<serial>".
    assert serial.count(b":") == 2


# --------------------------------------------------------------------------- other credentials


def test_http_basic_credentials_from_a_0600_file(
    make_rig: Callable[..., Rig], tmp_path: Path,
) -> None:
    from tpmid.server import hash_secret

    password = "basic-password-for-the-idevid-label"
    rig = make_rig(server_edit=lambda d: _label(d, "idevid", auth={
        "basic": {"username": "factory", "hash": hash_secret(password)}}))
    pw_file = tmp_path / "est-pass"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    rig.reconfigure(idevid_est={"auth": {"basic": {"username": "factory",
                                                   "password": {"file": str(pw_file)}}}})
    from tpmid.secrets import resolve_secret

    result = rig.enroll("idevid", secrets=lambda ref: resolve_secret(ref, {}, None))
    assert render_name(result.certificate.subject) == "serialNumber=TPMID-TEST-0001,CN=IDevID"
    pw_file.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        rig.enroll("idevid", secrets=lambda ref: resolve_secret(ref, {}, None))


def test_ldevid_over_mtls_with_a_software_key_file_for_bootstrap(
    make_rig: Callable[..., Rig], tmp_path: Path,
) -> None:
    """``auth.client: {cert, key}``: a software bootstrap credential, e.g. from a factory."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from tpmid.config import SanConfig, SubjectConfig
    from tpmid.csr import build_csr
    from tpmid.est.client import EstClient, make_session
    from tpmid.tls import client_tls

    rig = make_rig()
    key = ec.generate_private_key(ec.SECP256R1())
    with client_tls(trust_anchors=load(rig.server.tls_ca)) as tls:
        boot = EstClient(rig.server.url("idevid"), make_session(tls), tls=tls,
                         headers={"Secret-Value": rig.server.secret})
        # Like an IDevID, the factory credential names the device's serial, which the
        # ldevid label (subject_policy client-serial) binds the LDevID's subject to.
        boot_csr = build_csr(key, SubjectConfig(cn="bootstrap", serial_number="TPMID-TEST-0001"),
                             SanConfig(), hash_name="sha256")
        cert = boot.simpleenroll(boot_csr).certificate
    (tmp_path / "boot.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = tmp_path / "boot.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    rig.reconfigure(ldevid_est={"auth": {"client": {"cert": str(tmp_path / "boot.pem"),
                                                    "key": str(key_path)}}})
    ldevid = rig.enroll("ldevid")
    assert ldevid.certificate.issuer == load(rig.server.operator_ca)[0].subject


@pytest.mark.parametrize("accept_cmc_ra", [True, False], ids=["accept_cmc_ra", "hostname-only"])
def test_est_accept_cmc_ra_admits_an_ra_certificate_that_does_not_name_the_host(
        swtpm: Swtpm, tmp_path: Path, accept_cmc_ra: bool) -> None:
    """RFC 7030 §3.6.1 through the config: the reference server's TLS certificate carries
    id-kp-cmcRA and names only 127.0.0.1/::1/localhost; it is reached as 127.0.0.2."""
    from tpmid.config import parse_config
    from tpmid.server import EstServer, init_server_dir

    res = init_server_dir(tmp_path / "srv")
    srv = EstServer(res.dir, host="127.0.0.2", port=0).start()
    try:
        cfg = parse_config({
            "tpm": {"tcti": swtpm.tcti}, "store": {"dir": str(tmp_path / "store")},
            "trust": {"est_anchors": [str(res.tls_ca_path)]},
            "identities": {"idevid": {
                "key": {"kind": "persistent", "template": "H-2"},
                "subject": {"cn": "IDevID"},
                "est": {"url": srv.url("idevid"), "accept_cmc_ra": accept_cmc_ra,
                        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}}},
            }},
        }, "test")
        with TpmConnection(swtpm.tcti) as tpm:
            create_persistent_idevid(tpm, "H-2", 0x81020000)
            if accept_cmc_ra:
                result = enroll(cfg, "idevid", tpm=tpm, secrets={SECRET_ENV: res.secret})
                assert render_name(result.certificate.subject) == "CN=IDevID"
            else:
                with pytest.raises(EstTransportError, match="IP address mismatch"):
                    enroll(cfg, "idevid", tpm=tpm, secrets={SECRET_ENV: res.secret})
    finally:
        srv.stop()
