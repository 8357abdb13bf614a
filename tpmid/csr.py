"""PKCS#10 certification requests (RFC 2986) for device identities — model layer, no I/O.

``build_csr`` takes any ``cryptography`` private-key object; with a TPM key that
is :meth:`tpmid.tpm.keys.LoadedKey.private_key`, so the one signature a CSR
needs is one TPM2_Sign. Nothing here imports the TPM layer.

The subjectAltName can carry a hardwareModuleName (RFC 4108 §5, used by
IEEE 802.1AR DevIDs and the TCG "TPM 2.0 Keys for Device Identity and
Attestation" spec §8) that ties the certificate to the TPM it was issued for.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import AttributeOID, NameOID, ObjectIdentifier

from tpmid.config import SanConfig, SubjectConfig
from tpmid.errors import ConfigError

# RFC 4108 §5: id-on-hardwareModuleName.
OID_HARDWARE_MODULE_NAME = "1.3.6.1.5.5.7.8.4"
# TCG OID for TPM 2.0 as hwType (TCG DevID spec §8, HardwareModuleName).
TCG_TPM_HW_TYPE = "2.23.133.1.2"
# tcg-at-tpmManufacturer, in the EK certificate's subjectAltName directoryName.
TCG_AT_TPM_MANUFACTURER = "2.23.133.2.1"

_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}


# --------------------------------------------------------------------------- DER helpers


def _der_len(n: int) -> bytes:
    """X.690 §8.1.3 definite length: short form below 128, else long form."""
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(value)) + value


def _der_oid(dotted: str) -> bytes:
    """X.690 §8.19: first two arcs as 40*a+b, every arc base-128 with continuation bits."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"{dotted!r} is not an object identifier")
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der_tlv(0x06, bytes(body))


def encode_hardware_module_name(hw_type: str, hw_serial: bytes) -> bytes:
    """DER of ``HardwareModuleName ::= SEQUENCE { hwType OID, hwSerialNum OCTET STRING }``."""
    return _der_tlv(0x30, _der_oid(hw_type) + _der_tlv(0x04, hw_serial))


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos:pos + length], pos + length


def _oid_text(body: bytes) -> str:
    arcs: list[int] = []
    value = 0
    for b in body:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def parse_hardware_module_name(der: bytes) -> tuple[str, bytes]:
    """Inverse of :func:`encode_hardware_module_name`; raises ValueError on anything else."""
    tag, seq, end = _read_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("HardwareModuleName is not one SEQUENCE")
    tag, oid, pos = _read_tlv(seq, 0)
    if tag != 0x06:
        raise ValueError("hwType is not an OBJECT IDENTIFIER")
    tag, serial, pos = _read_tlv(seq, pos)
    if tag != 0x04 or pos != len(seq):
        raise ValueError("hwSerialNum is not an OCTET STRING")
    return _oid_text(oid), serial


def _tpm_manufacturer_code(cert: x509.Certificate) -> str | None:
    """The "TPM Manufacturer code" of an EK certificate: tcg-at-tpmManufacturer in its SAN.

    TCG EK Credential Profile: the subjectAltName holds a directoryName with
    2.23.133.2.1 = "id:XXXXXXXX"; the code is the part after "id:".
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in san.get_values_for_type(x509.DirectoryName):
        for attr in name.get_attributes_for_oid(ObjectIdentifier(TCG_AT_TPM_MANUFACTURER)):
            value = attr.value if isinstance(attr.value, str) else attr.value.decode("ascii")
            return value.removeprefix("id:").strip() or None
    return None


def hardware_module_name(ek_cert_der: bytes | None, ek_public_der: bytes, *,
                         tpm_manufacturer: int | None = None) -> tuple[str, bytes]:
    """``(hwType, hwSerialNum)`` naming this TPM, for a DevID's subjectAltName.

    TCG DevID v1.00 r12 §8 (HardwareModuleName): hwType is the TCG OID for
    TPM 2.0, 2.23.133.1.2. hwSerialNum is

    1. with an EK certificate: the ASCII string "<TPM manufacturer code>:<EK
       certificate authorityKeyIdentifier, hex>:<EK certificate serial number,
       hex>", e.g. ``00001014:e0413eb7...:2``. The manufacturer code comes from
       the certificate's tcg-at-tpmManufacturer ("id:00001014"), else from
       ``tpm_manufacturer`` (TPM_PT_MANUFACTURER) as 8 hex digits;
    2. without one (or when the certificate lacks those fields): a digest of
       the EK public key — SHA-256 of its SubjectPublicKeyInfo DER.
    """
    if ek_cert_der is not None:
        cert = x509.load_der_x509_certificate(ek_cert_der)
        code = _tpm_manufacturer_code(cert)
        if code is None and tpm_manufacturer is not None:
            code = f"{tpm_manufacturer:08X}"
        try:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
            key_id = aki.key_identifier
        except x509.ExtensionNotFound:
            key_id = None
        if code is not None and key_id:
            serial = f"{code}:{key_id.hex()}:{cert.serial_number:x}"
            return TCG_TPM_HW_TYPE, serial.encode("ascii")
    return TCG_TPM_HW_TYPE, hashlib.sha256(ek_public_der).digest()


# --------------------------------------------------------------------------- the CSR


def build_subject(subject: SubjectConfig) -> x509.Name:
    """The X.501 subject for ``subject`` (CN, then O, OU, serialNumber when set)."""
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, subject.cn)]
    if subject.o:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject.o))
    if subject.ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, subject.ou))
    if subject.serial_number:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, subject.serial_number))
    return x509.Name(attrs)


def build_san(san: SanConfig, hw_module: tuple[str, bytes] | None = None) -> list[x509.GeneralName]:
    """The subjectAltName entries: DNS names, IP addresses, URIs, hardwareModuleName."""
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in san.dns]
    for ip in san.ip:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as e:
            raise ConfigError(f"san.ip: {ip!r} is not an IP address") from e
    names.extend(x509.UniformResourceIdentifier(u) for u in san.uri)
    if hw_module is not None:
        names.append(x509.OtherName(ObjectIdentifier(OID_HARDWARE_MODULE_NAME),
                                    encode_hardware_module_name(*hw_module)))
    return names


def build_csr(key: Any, subject: SubjectConfig, san: SanConfig, *, hash_name: str,
              hw_module: tuple[str, bytes] | None = None,
              challenge_password: str | None = None) -> x509.CertificateSigningRequest:
    """A signed PKCS#10 request for ``key`` (any ``cryptography`` private-key object).

    ``hash_name`` must be the key's hash (a TPM key refuses others).
    ``hw_module`` is required when ``san.hardware_module_name`` is set (see
    :func:`hardware_module_name`). ``challenge_password`` goes into the PKCS#9
    challengePassword attribute (RFC 7030 §3.5 puts the tls-unique value there).
    """
    if hash_name not in _HASHES:
        raise ConfigError(f"unsupported CSR hash {hash_name!r}")
    if san.hardware_module_name and hw_module is None:
        raise ConfigError("san.hardware_module_name is set, but no TPM information was given "
                          "to build it from")
    builder = x509.CertificateSigningRequestBuilder().subject_name(build_subject(subject))
    names = build_san(san, hw_module)
    if names:
        # RFC 5280 §4.2.1.6: critical only when the subject is empty, which it never is here.
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if challenge_password is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD,
                                        challenge_password.encode("utf-8"))
    return builder.sign(key, _HASHES[hash_name]())
