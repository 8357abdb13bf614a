"""PKCS#10 certification requests (RFC 2986) for device identities — model layer, no I/O.

``build_csr`` takes any ``cryptography`` private-key object; with a TPM key that
is :meth:`tpmid.tpm.loaded.LoadedKey.private_key`, so the one signature a CSR
needs is one TPM2_Sign. Nothing here imports the TPM layer.

The subjectAltName can carry a hardwareModuleName (RFC 4108 §5, used by
IEEE 802.1AR DevIDs and the TCG "TPM 2.0 Keys for Device Identity and
Attestation" spec §8) that ties the certificate to the TPM it was issued for.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AttributeOID, NameOID, ObjectIdentifier

from tpmid.config import SanConfig, SubjectConfig
from tpmid.der import (
    TAG_OCTET_STRING,
    TAG_OID,
    TAG_SEQUENCE,
    der_oid,
    der_tlv,
    oid_from_content,
    read_tlv,
)
from tpmid.errors import ConfigError
from tpmid.evidence import add_attribute, assemble_csr, csr_parts

# RFC 4108 §5: id-on-hardwareModuleName.
OID_HARDWARE_MODULE_NAME = "1.3.6.1.5.5.7.8.4"
# TCG OID for TPM 2.0 as hwType (TCG DevID spec §8, HardwareModuleName).
TCG_TPM_HW_TYPE = "2.23.133.1.2"
# tcg-at-tpmManufacturer, in the EK certificate's subjectAltName directoryName.
TCG_AT_TPM_MANUFACTURER = "2.23.133.2.1"

_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}


def encode_hardware_module_name(hw_type: str, hw_serial: bytes) -> bytes:
    """DER of ``HardwareModuleName ::= SEQUENCE { hwType OID, hwSerialNum OCTET STRING }``."""
    return der_tlv(TAG_SEQUENCE, der_oid(hw_type) + der_tlv(TAG_OCTET_STRING, hw_serial))


def parse_hardware_module_name(der: bytes) -> tuple[str, bytes]:
    """Inverse of :func:`encode_hardware_module_name`; raises ValueError on anything else."""
    tag, start, end = read_tlv(der, 0)
    if tag != TAG_SEQUENCE or end != len(der):
        raise ValueError("HardwareModuleName is not one SEQUENCE")
    tag, o_start, o_end = read_tlv(der, start)
    if tag != TAG_OID:
        raise ValueError("hwType is not an OBJECT IDENTIFIER")
    tag, s_start, s_end = read_tlv(der, o_end)
    if tag != TAG_OCTET_STRING or s_end != end:
        raise ValueError("hwSerialNum is not an OCTET STRING")
    return oid_from_content(der[o_start:o_end]), der[s_start:s_end]


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


# --------------------------------------------------------------------------- CSRs with evidence


class _DraftEcKey(ec.EllipticCurvePrivateKey):
    """Stands in for the real key while ``cryptography`` lays out the request.

    The request with the evidence attribute is signed once, by the real key,
    after the attribute was added: this stand-in's signature is thrown away.
    """

    def __init__(self, public: ec.EllipticCurvePublicKey) -> None:
        self._public = public

    def sign(self, data: Any, signature_algorithm: Any) -> bytes:
        return bytes(encode_dss_signature(1, 1))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return int(self._public.curve.key_size)

    def exchange(self, algorithm: Any, peer_public_key: Any) -> bytes:
        raise NotImplementedError

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise NotImplementedError

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        raise NotImplementedError

    def __copy__(self) -> _DraftEcKey:
        return self

    def __deepcopy__(self, memo: Any) -> _DraftEcKey:
        return self


class _DraftRsaKey(rsa.RSAPrivateKey):
    """The RSA counterpart of :class:`_DraftEcKey`."""

    def __init__(self, public: rsa.RSAPublicKey) -> None:
        self._public = public

    def sign(self, data: Any, padding: Any, algorithm: Any) -> bytes:
        return bytes(self._public.key_size // 8)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return int(self._public.key_size)

    def decrypt(self, ciphertext: bytes, padding: Any) -> bytes:
        raise NotImplementedError

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise NotImplementedError

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        raise NotImplementedError

    def __copy__(self) -> _DraftRsaKey:
        return self

    def __deepcopy__(self, memo: Any) -> _DraftRsaKey:
        return self


def build_csr_with_attribute(key: Any, subject: SubjectConfig, san: SanConfig, *,
                             hash_name: str, attribute_der: bytes,
                             hw_module: tuple[str, bytes] | None = None,
                             challenge_password: str | None = None,
                             ) -> x509.CertificateSigningRequest:
    """:func:`build_csr` plus one more Attribute (DER) ``cryptography`` cannot express.

    The request is laid out by ``cryptography`` (with a stand-in key, no
    signature), the Attribute is added to its CertificationRequestInfo in DER
    order, and ``key`` signs the result once (one TPM2_Sign for a TPM key).
    """
    public = key.public_key()
    draft_key: Any = (_DraftEcKey(public) if isinstance(public, ec.EllipticCurvePublicKey)
                      else _DraftRsaKey(public))
    draft = build_csr(draft_key, subject, san, hash_name=hash_name, hw_module=hw_module,
                      challenge_password=challenge_password)
    _, algorithm, _ = csr_parts(draft.public_bytes(Encoding.DER))
    tbs = add_attribute(draft.tbs_certrequest_bytes, attribute_der)
    hash_alg = _HASHES[hash_name]()
    if isinstance(public, ec.EllipticCurvePublicKey):
        signature = key.sign(tbs, ec.ECDSA(hash_alg))
    else:
        signature = key.sign(tbs, PKCS1v15(), hash_alg)
    csr = x509.load_der_x509_csr(assemble_csr(tbs, algorithm, signature))
    if not csr.is_signature_valid:
        raise ConfigError("the request with the evidence attribute does not verify")
    return csr


@dataclass(frozen=True)
class ChannelBinding:
    """One TLS channel binding (RFC 5056 type name and value); see :mod:`tpmid.tls.binding`."""

    kind: str  # "tls-unique" (RFC 5929) | "tls-exporter" (RFC 9266)
    value: bytes


@dataclass(frozen=True)
class ChannelBoundCsr:
    """A CSR made once the TLS connection is up, from that connection's channel binding.

    ``make`` receives the :class:`ChannelBinding` of the very connection the
    request goes over (tls-unique on TLS 1.2, tls-exporter on TLS 1.3):
    attestation evidence is bound to it (docs/attestation.md).
    """

    make: Callable[[ChannelBinding], x509.CertificateSigningRequest]
