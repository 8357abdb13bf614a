"""PKCS#10 requests built by tpmid.csr, signed by real TPM keys (swtpm) and checked by OpenSSL."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AttributeOID, NameOID

from tpmid.config import SanConfig, SubjectConfig
from tpmid.csr import (
    OID_HARDWARE_MODULE_NAME,
    TCG_TPM_HW_TYPE,
    build_csr,
    encode_hardware_module_name,
    hardware_module_name,
    parse_hardware_module_name,
)
from tpmid.errors import ConfigError, TpmError
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm import idevid, keyfile, loaded
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.ek import primary_ek, read_eks

SUBJECT = SubjectConfig(cn="device-0001", o="Acme", ou="Edge", serial_number="SN-0001")
SAN = SanConfig(dns=("dev1.example", "dev1.local"), ip=("192.0.2.7", "2001:db8::7"),
                uri=("urn:acme:dev:0001",), hardware_module_name=True)


@pytest.fixture
def tpm(swtpm: Swtpm) -> Iterator[TpmConnection]:
    with TpmConnection(swtpm.tcti) as conn:
        yield conn


def _openssl_verify(csr: x509.CertificateSigningRequest, tmp_path: Path) -> str:
    path = tmp_path / "req.pem"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    proc = subprocess.run(["openssl", "req", "-in", str(path), "-verify", "-noout", "-text"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "verify OK" in proc.stdout + proc.stderr
    return proc.stdout


def _hw(tpm: TpmConnection) -> tuple[str, bytes]:
    ek = primary_ek(read_eks(tpm))
    return hardware_module_name(ek.cert_der, ek.public_key_der)


def _open(tpm: TpmConnection, source: str) -> loaded.LoadedKey:
    if source.startswith("H-"):
        return idevid.derive_idevid(tpm, source)
    return keyfile.load_key_file(tpm, keyfile.create_key_file(tpm, source))


@pytest.mark.parametrize("source", ["H-1", "H-2", "H-3", "ecc-p256", "ecc-p384", "rsa-2048"])
def test_csr_signed_in_the_tpm_verifies_with_openssl_and_cryptography(
        tpm: TpmConnection, tmp_path: Path, source: str) -> None:
    hw = _hw(tpm)
    with _open(tpm, source) as key:
        csr = build_csr(key.private_key(), SUBJECT, SAN, hash_name=key.hash_name, hw_module=hw)
        spki = key.public_key_der()
    assert tpm.transient_handles() == []
    assert csr.is_signature_valid
    assert csr.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) == spki
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == ("sha384" if source in ("H-3", "ecc-p384")
                                                 else "sha256")
    text = _openssl_verify(csr, tmp_path)
    assert "DNS:dev1.example" in text and "IP Address:2001:DB8:0:0:0:0:0:7" in text
    assert csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0001"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev1.example", "dev1.local"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7"),
                                                       ipaddress.ip_address("2001:db8::7")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:acme:dev:0001"]
    (other,) = san.get_values_for_type(x509.OtherName)
    assert other.type_id.dotted_string == OID_HARDWARE_MODULE_NAME
    assert parse_hardware_module_name(other.value) == hw


def test_csr_without_sans_has_no_san_extension(tpm: TpmConnection) -> None:
    with idevid.derive_idevid(tpm, "H-2") as key:
        csr = build_csr(key.private_key(), SubjectConfig(cn="bare"), SanConfig(),
                        hash_name="sha256")
    assert csr.is_signature_valid and list(csr.extensions) == []


def test_csr_with_the_wrong_hash_for_the_tpm_key_is_refused(tpm: TpmConnection) -> None:
    with idevid.derive_idevid(tpm, "H-3") as key, pytest.raises(TpmError, match="SHA384"):
        build_csr(key.private_key(), SUBJECT, SanConfig(), hash_name="sha256")


def test_challenge_password_becomes_a_pkcs9_attribute(tpm: TpmConnection) -> None:
    with idevid.derive_idevid(tpm, "H-2") as key:
        csr = build_csr(key.private_key(), SUBJECT, SanConfig(), hash_name="sha256",
                        challenge_password="dGxzLXVuaXF1ZQ==")
    assert csr.is_signature_valid
    attr = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
    assert attr.value == b"dGxzLXVuaXF1ZQ=="


def test_hardware_module_name_is_manufacturer_aki_and_serial_of_the_ek_certificate(
        tpm: TpmConnection) -> None:
    ek = primary_ek(read_eks(tpm))
    assert ek.cert_der is not None
    cert = x509.load_der_x509_certificate(ek.cert_der)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    hw_type, serial = hardware_module_name(ek.cert_der, ek.public_key_der)
    assert hw_type == TCG_TPM_HW_TYPE == "2.23.133.1.2"
    # swtpm's EK certificates name the manufacturer "id:00001014" (tcg-at-tpmManufacturer).
    assert serial.decode("ascii") == (
        f"00001014:{aki.key_identifier.hex()}:{cert.serial_number:x}")


def _software_ek_cert(*, manufacturer: str | None, aki: bool) -> bytes:
    """A certificate shaped like an EK certificate, issued by a throw-away CA."""
    ca = ec.generate_private_key(ec.SECP256R1())
    ek = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EK CA")]))
               .public_key(ek.public_key()).serial_number(0xABC123)
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    if manufacturer is not None:
        dirname = x509.Name([x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"),
                                                manufacturer)])
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DirectoryName(dirname)]), critical=True)
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
    return builder.sign(ca, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("manufacturer", "aki", "tpm_manufacturer", "prefix"),
    [("id:49465800", True, None, "49465800:"),
     (None, True, 0x53544D20, "53544D20:"),
     (None, True, None, None),
     ("id:49465800", False, None, None)],
    ids=["code-from-certificate", "code-from-tpm-property", "no-code-digest", "no-aki-digest"],
)
def test_hardware_module_name_falls_back_to_the_ek_digest_when_fields_are_missing(
        manufacturer: str | None, aki: bool, tpm_manufacturer: int | None,
        prefix: str | None) -> None:
    der = _software_ek_cert(manufacturer=manufacturer, aki=aki)
    spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    _, serial = hardware_module_name(der, spki, tpm_manufacturer=tpm_manufacturer)
    if prefix is None:
        assert serial == hashlib.sha256(spki).digest()
    else:
        assert serial.decode().startswith(prefix) and serial.decode().endswith(":abc123")


def test_hardware_module_name_without_ek_certificate_is_the_ek_public_key_digest() -> None:
    spki = b"an EK SubjectPublicKeyInfo"
    assert hardware_module_name(None, spki) == (TCG_TPM_HW_TYPE, hashlib.sha256(spki).digest())


@pytest.mark.parametrize(
    ("serial", "length_bytes"),
    [(b"\x02", "04 01"), (bytes(range(200)), "04 81 c8"), (bytes(300), "04 82 01 2c")],
    ids=["short-form", "long-form-1-byte", "long-form-2-bytes"],
)
def test_hardware_module_name_der_is_what_openssl_parses(tmp_path: Path, serial: bytes,
                                                         length_bytes: str) -> None:
    der = encode_hardware_module_name(TCG_TPM_HW_TYPE, serial)
    assert bytes.fromhex(length_bytes).hex() in der.hex()
    (tmp_path / "hw.der").write_bytes(der)
    out = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-in",
                          str(tmp_path / "hw.der")], capture_output=True, text=True, check=True)
    lines = [line.split() for line in out.stdout.splitlines()]
    assert lines[0][-1] == "SEQUENCE" and lines[1][-1] == ":2.23.133.1.2"
    octets = re.search(r"l=\s*(\d+) prim: OCTET STRING", out.stdout.splitlines()[2])
    assert octets is not None and int(octets.group(1)) == len(serial)
    assert parse_hardware_module_name(der) == (TCG_TPM_HW_TYPE, serial)


@pytest.mark.parametrize(
    "der",
    [b"", b"\x30\x03\x04\x01\x00", b"\x31\x00", b"\x30\x05\x06\x03\x2a\x03\x04\x04\x00\x00"],
    ids=["empty", "no-oid", "not-a-sequence", "trailing-garbage"],
)
def test_parse_hardware_module_name_rejects_malformed_der(der: bytes) -> None:
    with pytest.raises(ValueError):
        parse_hardware_module_name(der)


@pytest.mark.parametrize(
    ("key", "hash_name"),
    [(ec.generate_private_key(ec.SECP256R1()), "sha256"),
     (ec.generate_private_key(ec.SECP384R1()), "sha384"),
     (rsa.generate_private_key(65537, 2048), "sha256")],
    ids=["software-p256", "software-p384", "software-rsa"],
)
def test_build_csr_takes_any_cryptography_private_key(key: object, hash_name: str) -> None:
    csr = build_csr(key, SUBJECT, SanConfig(dns=("a.example",)), hash_name=hash_name)
    assert csr.is_signature_valid


def test_requesting_hardware_module_name_without_tpm_facts_is_a_config_error() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigError, match="hardware_module_name"):
        build_csr(key, SUBJECT, SAN, hash_name="sha256")


def test_invalid_ip_in_san_is_a_config_error() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigError, match="not an IP address"):
        build_csr(key, SUBJECT, SanConfig(ip=("300.1.1.1",)), hash_name="sha256")
