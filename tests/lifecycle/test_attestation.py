"""Key attestation in the CSR (docs/attestation.md), against swtpm and the reference server.

The device has a persistent H-2 IDevID and an IAK (TCG DevID template) whose
certificate the manufacturer CA issued. The LDevID is enrolled with
``est.attestation: include``: its CSR carries TPM2_Certify evidence by the IAK,
bound to the TLS channel, in the draft-ietf-lamps-csr-attestation attribute.
The ldevid label has ``attestation: require``.

The refusal tests play a dishonest device: they build requests with the same
public building blocks (tpmid.evidence, TpmConnection.certify) and tamper with
one thing each, sent over a real mTLS connection authenticated by the IDevID.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.est.test_client import load
from tests.est.test_client_support import SECRET_ENV, tls_versions, transient_handles
from tests.support.wiring import enroll
from tpmid.config import Config, SanConfig, SubjectConfig, parse_config
from tpmid.csr import ChannelBinding, ChannelBoundCsr, build_csr_with_attribute
from tpmid.errors import EstAuthError, EstServerError
from tpmid.est.client import EstClient, make_session
from tpmid.evidence import (
    ID_AA_ATTESTATION,
    TCG_ATTEST_TPM_CERTIFY,
    AttestationBundle,
    TpmCertifyStatement,
    attribute,
)
from tpmid.server.ca import load_ca
from tpmid.server.state import ServerPaths
from tpmid.store import Store
from tpmid.testing.estserver import RunningEstServer, start_est_server
from tpmid.testing.swtpm import Swtpm
from tpmid.tls import client_tls
from tpmid.tpm.attest import AttestationKey
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import create_persistent_idevid
from tpmid.tpm.loaded import LoadedKey

IAK_HANDLE = 0x81020001
PROVEN_POLICY = "1.3.6.1.4.1.55555.1.1"


@dataclass
class Device:
    """A TPM with IDevID and IAK, its store and config, and its EST server."""

    tpm: TpmConnection
    server: RunningEstServer
    config: Config
    store_dir: Path

    def enroll(self, name: str, **kw: Any) -> Any:
        return enroll(self.config, name, tpm=self.tpm,
                      secrets={SECRET_ENV: self.server.secret}, **kw)

    def reconfigure(self, **kw: Any) -> None:
        self.config = device_config(self.server, self.store_dir, self.tpm, **kw)

    @property
    def store(self) -> Store:
        return Store(self.store_dir)

    def iak(self) -> AttestationKey:
        return self.tpm.open_persistent_iak(IAK_HANDLE)


def device_config(srv: RunningEstServer, store: Path, tpm: TpmConnection, *,
                  attestation: str = "include", idevid_kind: str = "persistent") -> Config:
    """tests.est.test_client_support.identity_config's IDevID and LDevID, with an IAK."""
    subject = {"serial_number": "TPMID-TEST-0001"}
    return parse_config({
        "tpm": {"tcti": tpm.tcti}, "store": {"dir": str(store)},
        "trust": {"est_anchors": [str(srv.tls_ca)]},
        "identities": {
            "idevid": {
                "key": {"kind": idevid_kind, "template": "H-2", "handle": 0x81020000,
                        "iak": True, "iak_handle": IAK_HANDLE},
                "subject": {"cn": "IDevID", **subject},
                "est": {"url": srv.url("idevid"),
                        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}}},
            },
            "ldevid": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": "my-device-id", **subject},
                "est": {"url": srv.url("ldevid"), "auth": {"client": "idevid"},
                        "attestation": attestation},
            },
            "edgeca": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": "my-device-id Edge CA", **subject},
                "profile": "ca",
                "est": {"url": srv.url("edgeca"), "auth": {"client": "ldevid"},
                        "attestation": attestation},
            },
        },
    }, "test-config")


def issue_iak_certificate(srv: RunningEstServer, iak: AttestationKey) -> x509.Certificate:
    """The manufacturer CA certifies the IAK, as a factory station does at manufacturing
    (TCG DevID §6.2: the OEM creates the IAK certificate itself)."""
    paths = ServerPaths(srv.dir)
    ca = load_ca("manufacturer", paths.ca_cert("manufacturer"), paths.ca_key("manufacturer"))
    public = serialization.load_der_public_key(iak.public_key_der())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return ca.issue(public_key=public, subject=x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "IAK"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "TPMID-TEST-0001")]),
        profile="iak", lifetime=86400)


@pytest.fixture(params=["1.3", "1.2"], ids=["TLS 1.3 tls-exporter", "TLS 1.2 tls-unique"])
def device(request: pytest.FixtureRequest, swtpm: Swtpm, tmp_path: Path) -> Iterator[Device]:
    def edit(d: dict[str, Any]) -> None:
        tls_versions(request.param)(d)
        d["labels"]["ldevid"].update(attestation="require",
                                     attestation_policy_oid=PROVEN_POLICY)

    srv = start_est_server(tmp_path / "srv", config=edit)
    tpm = TpmConnection(swtpm.tcti)
    try:
        create_persistent_idevid(tpm, "H-2")
        assert tpm.persist_iak(IAK_HANDLE)
        store_dir = tmp_path / "store"
        dev = Device(tpm, srv, device_config(srv, store_dir, tpm), store_dir)
        with dev.iak() as iak:
            iak_cert = issue_iak_certificate(srv, iak)
        dev.store.save_attestation_certs("idevid", [iak_cert, load(srv.manufacturer_ca)[0]])
        dev.enroll("idevid")
        yield dev
    finally:
        tpm.close()
        srv.stop()


# --------------------------------------------------------------------------- honest device


def test_ldevid_with_evidence_is_issued_with_the_proven_policy_and_the_verdict_logged(
    device: Device,
) -> None:
    result = device.enroll("ldevid")

    policies = result.certificate.extensions.get_extension_for_class(x509.CertificatePolicies)
    assert [p.policy_identifier.dotted_string for p in policies.value] == [PROVEN_POLICY]
    entry = device.server.issued()[-1]
    assert entry["label"] == "ldevid"
    version = device.server.config()["tls"]["max_version"]
    assert entry["attestation"] == {
        "result": "proven", "iak": "serialNumber=TPMID-TEST-0001,CN=IAK",
        "attributes": "fixedTPM|fixedParent|sensitiveDataOrigin|sign",
        "binding": "tls-exporter" if version == "1.3" else "tls-unique"}


def test_no_transient_object_is_left_and_the_edge_ca_is_attested_the_same_way(
    device: Device,
) -> None:
    device.server.configure("edgeca", attestation="require")
    device.enroll("ldevid")
    edgeca = device.enroll("edgeca")
    assert edgeca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert device.server.issued()[-1]["label"] == "edgeca"
    assert device.server.issued()[-1]["attestation"]["result"] == "proven"
    assert transient_handles(device.tpm.tcti) == []


def test_an_ek_derived_iak_is_re_created_for_the_evidence_within_the_tpm_s_three_slots(
    swtpm: Swtpm, tmp_path: Path,
) -> None:
    """swtpm holds three transient objects: the storage parent, the new key and the
    re-derived IAK fit, and all are flushed again."""
    srv = start_est_server(tmp_path / "srv", config=lambda d: d["labels"]["ldevid"].update(
        attestation="require"))
    tpm = TpmConnection(swtpm.tcti)
    try:
        store_dir = tmp_path / "store"
        dev = Device(tpm, srv, device_config(srv, store_dir, tpm, idevid_kind="ek-derived"),
                     store_dir)
        with tpm.derive_iak() as iak:
            iak_cert = issue_iak_certificate(srv, iak)
        dev.store.save_attestation_certs("idevid", [iak_cert])
        dev.enroll("idevid")
        dev.enroll("ldevid")
        assert srv.issued()[-1]["attestation"]["result"] == "proven"
        assert transient_handles(swtpm.tcti) == []
        assert IAK_HANDLE not in tpm.persistent_handles()
    finally:
        tpm.close()
        srv.stop()


def test_a_label_that_only_verifies_issues_without_evidence_and_logs_it_absent(
    device: Device,
) -> None:
    device.server.configure("ldevid", attestation="verify")
    device.reconfigure(attestation="off")
    result = device.enroll("ldevid")
    with pytest.raises(x509.ExtensionNotFound):
        result.certificate.extensions.get_extension_for_class(x509.CertificatePolicies)
    assert device.server.issued()[-1]["attestation"]["result"] == "absent"


def test_required_by_server_includes_evidence_because_the_label_asks_in_csrattrs(
    device: Device,
) -> None:
    device.reconfigure(attestation="required-by-server")
    device.enroll("ldevid")
    assert device.server.issued()[-1]["attestation"]["result"] == "proven"


# --------------------------------------------------------------------------- dishonest device


@contextlib.contextmanager
def _idevid_client(device: Device) -> Iterator[EstClient]:
    """An EST client of the ldevid label, authenticated over TLS with the IDevID in the TPM."""
    idevid = device.store.current("idevid")
    assert idevid is not None
    key = device.tpm.open_persistent(0x81020000)
    try:
        with client_tls(key=key, cert_chain=[idevid.cert],
                        trust_anchors=load(device.server.tls_ca)) as tls:
            yield EstClient(device.server.url("ldevid"), make_session(tls), tls=tls)
    finally:
        key.close()


def _refusal(device: Device, make: Callable[[ChannelBinding], x509.CertificateSigningRequest]
             ) -> str:
    """Send the CSR ``make`` builds over an IDevID-authenticated connection; the refusal text."""
    with _idevid_client(device) as client, \
            pytest.raises((EstAuthError, EstServerError)) as e:
        client.simpleenroll(ChannelBoundCsr(make))
    assert all(r["label"] != "ldevid" for r in device.server.issued())
    return str(e.value)


def _evidence_csr(device: Device, csr_key: LoadedKey, certified: LoadedKey, qualifying: bytes,
                  *, certs: list[x509.Certificate] | None = None,
                  resign: Callable[[bytes], bytes] | None = None
                  ) -> x509.CertificateSigningRequest:
    with device.iak() as iak:
        attest, signature, public = device.tpm.certify(certified, iak, qualifying)
    if resign is not None:
        signature = resign(attest)
    chain = certs if certs is not None else device.store.attestation_certs("idevid")
    bundle = AttestationBundle(
        ((TCG_ATTEST_TPM_CERTIFY, TpmCertifyStatement(attest, signature, public).encode()),),
        tuple(c.public_bytes(serialization.Encoding.DER) for c in chain))
    return build_csr_with_attribute(
        csr_key.private_key(), SubjectConfig(cn="my-device-id", serial_number="TPMID-TEST-0001"),
        SanConfig(), hash_name=csr_key.hash_name, attribute_der=attribute(bundle))


def test_require_refuses_a_csr_without_evidence(device: Device) -> None:
    device.reconfigure(attestation="off")
    with pytest.raises(EstAuthError) as e:
        device.enroll("ldevid")
    assert "attestation refused (missing)" in str(e.value)
    assert ID_AA_ATTESTATION in str(e.value)


def test_require_refuses_evidence_that_certifies_another_key(device: Device) -> None:
    def make(binding: ChannelBinding) -> x509.CertificateSigningRequest:
        _, other = device.tpm.create_key_file("ecc-p256")
        _, mine = device.tpm.create_key_file("ecc-p256")
        with other, mine:
            return _evidence_csr(device, mine, other, binding.value)

    message = _refusal(device, make)
    assert "attestation refused (key)" in message
    assert "certifies another key than the CSR's public key" in message


def _software_ecdsa_tpmt_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.types import TPMT_SIGNATURE

    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA)
    sig.signature.ecdsa.hash = TPM2_ALG.SHA256
    sig.signature.ecdsa.signatureR = r.to_bytes(32, "big")
    sig.signature.ecdsa.signatureS = s.to_bytes(32, "big")
    return bytes(sig.marshal())


def _self_made_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "IAK")])
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))


def test_require_refuses_evidence_signed_by_a_software_key_with_its_own_certificate(
    device: Device,
) -> None:
    software = ec.generate_private_key(ec.SECP256R1())

    def make(binding: ChannelBinding) -> x509.CertificateSigningRequest:
        _, mine = device.tpm.create_key_file("ecc-p256")
        with mine:
            return _evidence_csr(
                device, mine, mine, binding.value, certs=[_self_made_certificate(software)],
                resign=lambda attest: _software_ecdsa_tpmt_signature(software, attest))

    message = _refusal(device, make)
    assert "attestation refused (chain)" in message
    assert "does not chain to the manufacturer CA" in message


def test_require_refuses_evidence_signed_by_a_software_key_under_the_real_iak_certificate(
    device: Device,
) -> None:
    software = ec.generate_private_key(ec.SECP256R1())

    def make(binding: ChannelBinding) -> x509.CertificateSigningRequest:
        _, mine = device.tpm.create_key_file("ecc-p256")
        with mine:
            return _evidence_csr(device, mine, mine, binding.value,
                                 resign=lambda a: _software_ecdsa_tpmt_signature(software, a))

    message = _refusal(device, make)
    assert "attestation refused (signature)" in message


def _decrypting_key(tpm: TpmConnection) -> LoadedKey:
    """An ECC key that may sign and decrypt (no identity key is made like this)."""
    from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    from tpmid.tpm.templates import file_key_template

    template = file_key_template("ecc-p256")
    template.publicArea.objectAttributes |= TPMA_OBJECT.DECRYPT
    template.publicArea.parameters.eccDetail.scheme.scheme = 0x0010  # TPM_ALG_NULL
    handle, public, _, _, _ = tpm.esapi.create_primary(
        TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
    tpm.track(handle, "a decrypting key")
    return LoadedKey(tpm, handle, public, transient=True, description="a decrypting key")


def test_require_refuses_a_key_that_can_decrypt(device: Device) -> None:
    def make(binding: ChannelBinding) -> x509.CertificateSigningRequest:
        with _decrypting_key(device.tpm) as key:
            return _evidence_csr(device, key, key, binding.value)

    message = _refusal(device, make)
    assert "attestation refused (attributes)" in message
    assert "has decrypt" in message


def test_require_refuses_evidence_replayed_from_an_earlier_enrollment(device: Device) -> None:
    earlier: list[x509.CertificateSigningRequest] = []

    def first(binding: ChannelBinding) -> x509.CertificateSigningRequest:
        _, mine = device.tpm.create_key_file("ecc-p256")
        with mine:
            earlier.append(_evidence_csr(device, mine, mine, binding.value))
        return earlier[0]

    with _idevid_client(device) as client:
        client.simpleenroll(ChannelBoundCsr(first))  # accepted on its own connection
    assert device.server.issued()[-1]["attestation"]["result"] == "proven"

    message = _replay(device, earlier[0])
    assert "attestation refused (freshness)" in message
    assert "not this TLS channel's binding" in message


def _replay(device: Device, csr: x509.CertificateSigningRequest) -> str:
    before = len(device.server.issued())
    with _idevid_client(device) as client, \
            pytest.raises((EstAuthError, EstServerError)) as e:
        client.simpleenroll(ChannelBoundCsr(lambda binding: csr))
    assert len(device.server.issued()) == before
    return str(e.value)


# --------------------------------------------------------------------------- independent parse


def test_evidence_parses_with_pyasn1_modules_tpm2_pytss_and_tpm2_print(
    device: Device, tmp_path: Path,
) -> None:
    """The structure checked by parsers that share no code with tpmid's, and the
    signature by the IAK checked separately (cryptography on the raw pieces)."""
    from pyasn1.codec.der.decoder import decode
    from pyasn1.type import namedtype, univ
    from pyasn1_modules import rfc2986, rfc5280
    from tpm2_pytss.constants import TPM2_ST
    from tpm2_pytss.types import TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE

    class TcgAttestCertify(univ.Sequence):
        componentType = namedtype.NamedTypes(
            namedtype.NamedType("tpmSAttest", univ.OctetString()),
            namedtype.NamedType("signature", univ.OctetString()),
            namedtype.OptionalNamedType("tpmTPublic", univ.OctetString()))

    class AttestationStatement(univ.Sequence):
        componentType = namedtype.NamedTypes(
            namedtype.NamedType("type", univ.ObjectIdentifier()),
            namedtype.NamedType("stmt", univ.Any()))

    class AttestationBundleAsn(univ.Sequence):
        componentType = namedtype.NamedTypes(
            namedtype.NamedType("attestations", univ.SequenceOf(AttestationStatement())),
            namedtype.OptionalNamedType("certs", univ.SequenceOf(rfc5280.Certificate())))

    sent: list[x509.CertificateSigningRequest] = []

    def make(binding: ChannelBinding) -> x509.CertificateSigningRequest:
        _, mine = device.tpm.create_key_file("ecc-p256")
        with mine:
            sent.append(_evidence_csr(device, mine, mine, binding.value))
        return sent[0]

    with _idevid_client(device) as client:
        client.simpleenroll(ChannelBoundCsr(make))
    assert device.server.issued()[-1]["attestation"]["result"] == "proven"

    der = sent[0].public_bytes(serialization.Encoding.DER)
    request, rest = decode(der, asn1Spec=rfc2986.CertificationRequest())
    assert rest == b""
    attrs = {str(a["type"]): a["values"] for a in request["certificationRequestInfo"]["attributes"]}
    assert ID_AA_ATTESTATION == "1.2.840.113549.1.9.16.2.59"
    (value,) = attrs[ID_AA_ATTESTATION]
    bundle, rest = decode(bytes(value), asn1Spec=AttestationBundleAsn())
    assert rest == b""
    (statement,) = bundle["attestations"]
    assert str(statement["type"]) == "2.23.133.20.1"
    stmt, rest = decode(bytes(statement["stmt"]), asn1Spec=TcgAttestCertify())
    assert rest == b""
    attest = bytes(stmt["tpmSAttest"])
    parsed, used = TPMS_ATTEST.unmarshal(attest)
    assert used == len(attest) and parsed.type == TPM2_ST.ATTEST_CERTIFY
    public_area = bytes(stmt["tpmTPublic"])
    area, _ = TPMT_PUBLIC.unmarshal(public_area)
    name = int(area.nameAlg).to_bytes(2, "big") + hashes_sha256(public_area)
    assert bytes(parsed.attested.certify.name) == name

    attest_file = tmp_path / "attest.bin"
    attest_file.write_bytes(attest)
    tool = shutil.which("tpm2_print")
    assert tool is not None, "tpm2-tools' tpm2_print is part of the test environment"
    done = subprocess.run([tool, "-t", "TPMS_ATTEST", str(attest_file)],
                          capture_output=True, text=True)
    # tpm2-tools 5.x decodes the whole TPMS_ATTEST but prints the header only: for
    # the TPMS_CERTIFY_INFO union member it reports "unsupported type 0x8017".
    assert done.returncode == 0 or "unsupported type 0x8017" in done.stderr, done.stderr
    printed = dict(line.split(": ", 1) for line in done.stdout.splitlines()
                   if ": " in line and not line.startswith(" "))
    assert printed["magic"] == "ff544347"  # TPM_GENERATED_VALUE
    assert printed["type"] == "8017"  # TPM_ST_ATTEST_CERTIFY
    assert printed["extraData"] == bytes(parsed.extraData).hex()
    assert printed["qualifiedSigner"] == bytes(parsed.qualifiedSigner).hex()

    # The separate signature check: the IAK certificate from the bundle (pyasn1's
    # decoding, re-encoded), the TPMT_SIGNATURE's r and s, ECDSA-SHA256 over TPMS_ATTEST.
    from pyasn1.codec.der.encoder import encode
    iak_cert = x509.load_der_x509_certificate(encode(bundle["certs"][0]))
    signature, _ = TPMT_SIGNATURE.unmarshal(bytes(stmt["signature"]))
    r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    iak_public = iak_cert.public_key()
    assert isinstance(iak_public, ec.EllipticCurvePublicKey)
    iak_public.verify(encode_dss_signature(r, s), attest, ec.ECDSA(hashes.SHA256()))


def hashes_sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


# --------------------------------------------------------------------------- provisioning


@pytest.mark.slow
def test_provision_creates_the_iak_with_the_idevid_and_a_second_tpm_has_another(
    swtpm: Swtpm, tmp_path: Path,
) -> None:
    """`tpmid provision` with key.iak persists the IAK next to the IDevID; its template
    is the TCG one (restricted signing, never decrypt) and another TPM derives another key.
    (Its certificate comes from the manufacturer CA: see docs/attestation.md for what is
    not done yet.)"""
    from tpm2_pytss.constants import TPMA_OBJECT

    from tests.lifecycle.test_provision import SECRET_ENV as STATION_SECRET_ENV
    from tests.lifecycle.test_provision import Device as StationDevice
    from tests.lifecycle.test_provision import run_provision
    from tpmid.testing.swtpm import manufacture

    srv = start_est_server(tmp_path / "srv")
    try:
        config = tmp_path / "device" / "config.yaml"
        config.parent.mkdir()
        import yaml
        config.write_text(yaml.safe_dump({
            "tpm": {"tcti": swtpm.tcti}, "store": {"dir": str(tmp_path / "device" / "store")},
            "trust": {"est_anchors": [str(srv.tls_ca)]},
            "identities": {"idevid": {
                "key": {"kind": "persistent", "handle": 0x81020000, "template": "H-2",
                        "iak": True, "iak_handle": IAK_HANDLE},
                "subject": {"cn": "sensor-{serial}"},
                "est": {"url": srv.url("idevid"),
                        "auth": {"headers": {"Secret-Value": {"env": STATION_SECRET_ENV}}}},
            }},
        }))
        device = StationDevice(sim=swtpm, dir=config.parent, config=config)
        proc = run_provision(device, tmp_path / "manifest.jsonl", srv.secret, "--serial", "SN-1",
                             json_out=False)
        assert proc.returncode == 0, proc.stderr
        assert f"created IAK at {IAK_HANDLE:#010x}" in proc.stdout + proc.stderr
    finally:
        srv.stop()
    with TpmConnection(swtpm.tcti) as tpm, tpm.open_persistent_iak(IAK_HANDLE) as iak:
        attrs = iak.public.publicArea.objectAttributes
        assert attrs & TPMA_OBJECT.RESTRICTED and attrs & TPMA_OBJECT.SIGN_ENCRYPT
        assert not attrs & TPMA_OBJECT.DECRYPT
        with tpm.derive_iak() as again:
            assert again.public_key_der() == iak.public_key_der()  # re-derivable
        first = iak.public_key_der()
    # A TPM manufactured on its own (not a copy of the template state): its own seeds.
    other = Swtpm(manufacture(tmp_path / "other-tpm", ca_dir=swtpm.ca_dir)).start()
    try:
        with TpmConnection(other.tcti) as tpm, tpm.derive_iak() as iak:
            assert iak.public_key_der() != first
    finally:
        other.stop()


def test_attestation_off_runs_the_same_tpm_commands_as_a_device_without_an_iak(
    swtpm: Swtpm, tmp_path: Path,
) -> None:
    """With est.attestation: off nothing new reaches the TPM (the benchmark configuration);
    with include exactly one TPM2_Certify is added. Counted outside tpmid by a proxy."""
    from tpmid.testing.tpmproxy import TpmProxy

    srv = start_est_server(tmp_path / "srv", config=lambda d: d["labels"]["ldevid"].update(
        attestation="verify"))
    try:
        with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port).start() as proxy:
            tpm = TpmConnection(proxy.tcti)
            try:
                create_persistent_idevid(tpm, "H-2")
                assert tpm.persist_iak(IAK_HANDLE)
                runs: dict[str, list[str]] = {}
                for mode in ("no IAK", "off", "include"):
                    store_dir = tmp_path / mode.replace(" ", "-")
                    config = (parse_config(_without_iak(srv, store_dir, tpm), "test-config")
                              if mode == "no IAK"
                              else device_config(srv, store_dir, tpm, attestation=mode))
                    dev = Device(tpm, srv, config, store_dir)
                    with dev.iak() as iak:
                        dev.store.save_attestation_certs(
                            "idevid", [issue_iak_certificate(srv, iak)])
                    dev.enroll("idevid")
                    proxy.reset()
                    dev.enroll("ldevid")
                    runs[mode] = proxy.commands
            finally:
                tpm.close()
    finally:
        srv.stop()
    assert runs["off"] == runs["no IAK"]
    assert "TPM2_Certify" not in runs["off"]
    assert runs["include"].count("TPM2_Certify") == 1


def _without_iak(srv: RunningEstServer, store: Path, tpm: TpmConnection) -> dict[str, Any]:
    """device_config's IDevID and LDevID as before attestation existed."""
    subject = {"serial_number": "TPMID-TEST-0001"}
    return {
        "tpm": {"tcti": tpm.tcti}, "store": {"dir": str(store)},
        "trust": {"est_anchors": [str(srv.tls_ca)]},
        "identities": {
            "idevid": {
                "key": {"kind": "persistent", "template": "H-2", "handle": 0x81020000},
                "subject": {"cn": "IDevID", **subject},
                "est": {"url": srv.url("idevid"),
                        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}}},
            },
            "ldevid": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": "my-device-id", **subject},
                "est": {"url": srv.url("ldevid"), "auth": {"client": "idevid"}},
            },
        },
    }
