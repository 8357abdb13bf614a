"""The reference CAs: software keys, three certificate profiles, an issued-certificate log.

Three self-signed roots, one per trust domain (as GlobalSign recommends for
IoT Edge): the *manufacturer* CA issues IDevIDs, the *operator* CA issues
LDevIDs and Edge CA certificates, the *TLS* CA issues the server's own TLS
certificate. This is a lab CA: keys are files (0600 in a 0700 directory).

Profiles (the extensions follow RFC 5280 §4.2 and IEEE 802.1AR §8):

* ``idevid`` — long-lived device birth certificate: digitalSignature,
  clientAuth; SANs (hardwareModuleName, RFC 4108 §5) copied from the CSR.
* ``ldevid`` — short-lived operational device identity: digitalSignature,
  clientAuth; SANs copied from the CSR.
* ``edgeca`` — a device-local CA: basicConstraints CA:TRUE pathlen 0,
  keyCertSign | cRLSign.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tpmid.errors import ConfigError
from tpmid.store.fsio import append_line, open_append

# id-kp-cmcRA (RFC 6402 §2.10), the EKU of an authorized EST server (RFC 7030 §3.6.1).
OID_TCG_KP_AIK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.3")
OID_CMC_RA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")

SERIAL_BITS = 128


def generate_key(alg: str) -> CertificateIssuerPrivateKeyTypes:
    """A fresh software key: ``ecc-p256``, ``ecc-p384`` or ``rsa-2048``."""
    if alg == "ecc-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ecc-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ConfigError(f"unknown key algorithm {alg!r} (use ecc-p256, ecc-p384 or rsa-2048)")


def alg_of(key: CertificateIssuerPrivateKeyTypes) -> str:
    """The algorithm name of a key made by :func:`generate_key`."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ecc-p384" if isinstance(key.curve, ec.SECP384R1) else "ecc-p256"
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa-2048"
    raise ConfigError(f"unsupported CA key type {type(key).__name__}")


def signature_hash(
    key: CertificateIssuerPrivateKeyTypes,
) -> hashes.SHA256 | hashes.SHA384 | None:
    """The digest to sign with: SHA-384 for P-384 (RFC 5480 §4), SHA-256 otherwise."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def random_serial() -> int:
    """A positive 128-bit random serial number (RFC 5280 §4.1.2.2 allows up to 20 octets)."""
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial:
            return serial


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex without separators (tpmid.render).

    ``--pin`` and ``est.pin`` also accept the ``AB:CD:...`` form ``openssl x509
    -fingerprint -sha256`` prints.
    """
    return cert.fingerprint(hashes.SHA256()).hex()


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _key_usage(**kwargs: bool) -> x509.KeyUsage:
    flags = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=False, key_cert_sign=False,
                 crl_sign=False, encipher_only=False, decipher_only=False)
    flags.update(kwargs)
    return x509.KeyUsage(**flags)


@dataclass
class CertificateAuthority:
    """A CA: its name (manufacturer, operator, tls), key and self-signed certificate."""

    name: str
    key: CertificateIssuerPrivateKeyTypes
    cert: x509.Certificate
    # Tests of time-driven behaviour (renewal schedules) run the CA on an
    # injected clock; None means the real one.
    clock: Callable[[], datetime] | None = None
    # After a rollover (tpmid.server.rollover): the old root while its client
    # certificates are still accepted, and the RFC 7030 §4.1.3 key-update certificates
    # /cacerts serves next to the current root.
    previous: tuple[x509.Certificate, ...] = ()
    links: tuple[x509.Certificate, ...] = ()

    def now(self) -> datetime:
        """The CA's idea of the current time (aware UTC)."""
        return self.clock() if self.clock is not None else datetime.now(UTC)

    @property
    def alg(self) -> str:
        """The CA key's algorithm name."""
        return alg_of(self.key)

    def issued(self, cert: x509.Certificate, now: datetime | None = None) -> bool:
        """True if this CA signed ``cert`` directly and ``cert`` is valid at ``now``.

        During a rollover's overlap, a certificate of the previous root counts too.
        """
        now = now or self.now()
        for ca_cert in (self.cert, *self.previous):
            if cert.issuer != ca_cert.subject:
                continue
            try:
                cert.verify_directly_issued_by(ca_cert)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
        return False

    def issue(
        self,
        *,
        public_key: CertificatePublicKeyTypes,
        subject: x509.Name,
        profile: str,
        lifetime: float,
        san: x509.SubjectAlternativeName | None = None,
        now: datetime | None = None,
        policies: Sequence[str] = (),
    ) -> x509.Certificate:
        """Sign a certificate for ``public_key`` with the extensions of ``profile``.

        notBefore is ``now`` (whole seconds, no backdating, so a 30 s lifetime
        is 30 s); notAfter is capped by the CA's own notAfter (RFC 5280 §6.1.3
        would reject a longer child anyway).
        """
        now = (now or self.now()).replace(microsecond=0)
        not_after = min(now + timedelta(seconds=lifetime), self.cert.not_valid_after_utc)
        b = (x509.CertificateBuilder()
             .subject_name(subject)
             .issuer_name(self.cert.subject)
             .public_key(public_key)
             .serial_number(random_serial())
             .not_valid_before(now)
             .not_valid_after(not_after)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
             .add_extension(
                 x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                 critical=False))
        if policies:
            # A policy OID the label adds when the key was proven to live in a TPM.
            b = b.add_extension(x509.CertificatePolicies([
                x509.PolicyInformation(x509.ObjectIdentifier(p), None) for p in policies]),
                critical=False)
        if profile in ("idevid", "ldevid"):
            b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(_key_usage(digital_signature=True), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                critical=False))
        elif profile == "edgeca":
            b = (b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                 .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True))
        elif profile == "tls-server":
            b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(
                     _key_usage(digital_signature=True,
                                key_encipherment=isinstance(public_key, rsa.RSAPublicKey)),
                     critical=True)
                 # RFC 7030 §3.6.1: id-kp-cmcRA marks an authorized EST server, which
                 # clients may accept instead of a host-name match.
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                       OID_CMC_RA]),
                                critical=False))
        elif profile == "iak":
            # TCG DevID §8 / TCG EK Credential Profile: an attestation key certificate,
            # marked by tcg-kp-AIKCertificate (2.23.133.8.3).
            b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(_key_usage(digital_signature=True), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([OID_TCG_KP_AIK_CERTIFICATE]),
                                critical=False))
        else:
            raise ConfigError(f"unknown certificate profile {profile!r}")
        if san is not None and len(san) > 0:
            # RFC 5280 §4.2.1.6: the SAN is critical when the subject is empty.
            b = b.add_extension(san, critical=len(subject) == 0)
        return b.sign(self.key, signature_hash(self.key))


def create_root_ca(name: str, common_name: str, alg: str, lifetime: float,
                   path_length: int | None) -> CertificateAuthority:
    """A new self-signed root CA with a fresh key."""
    key = generate_key(alg)
    now = _now()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tpmid reference EST server"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    pub = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(pub)
            .serial_number(random_serial())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(seconds=lifetime))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .sign(key, signature_hash(key)))
    return CertificateAuthority(name=name, key=key, cert=cert)


def loopback_san() -> x509.SubjectAlternativeName:
    """The TLS server names: localhost, 127.0.0.1 and ::1."""
    return x509.SubjectAlternativeName([
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ])


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """Unencrypted PKCS#8 PEM (the file is protected by its 0600 mode)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM of one certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca(name: str, cert_path: Path, key_path: Path) -> CertificateAuthority:
    """Load a CA from its PEM certificate and PEM key files."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the {name} CA from {cert_path} and {key_path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"the {name} CA key in {key_path} is not an EC or RSA key")
    return CertificateAuthority(name=name, key=key, cert=cert)


class IssueLog:
    """The issued-certificate log: one JSON object per line, appended under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        """Append one record, on disk before this returns (the log is the CA's memory).

        Concurrent requests each write their line under the file's flock and then
        fsync without holding it, so they share the disk's flushes instead of
        queueing for one each (this lock dominated the server under load).
        """
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd, created = open_append(self.path, 0o644)
        try:
            append_line(fd, line, self.path, new_file=created)
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        """Every record so far (for tests and inspection)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]
