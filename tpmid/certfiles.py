"""Certificates from files the operator names in the config (trust anchors, issuer anchors)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from tpmid.errors import ConfigError


def load_pem_certificates(paths: Sequence[Path], what: str) -> list[x509.Certificate]:
    """Read every certificate from the PEM (or DER) files ``paths``; ConfigError if unusable."""
    out: list[x509.Certificate] = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {what} {p}: {e.strerror}") from e
        try:
            if b"-----BEGIN" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
        except ValueError as e:
            raise ConfigError(f"{what} {p} holds no readable certificate ({e})") from e
        out.extend(certs)
    return out


def spki_der(key: CertificatePublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo of ``key`` (the form compared for "same key")."""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def spki_sha256(key: CertificatePublicKeyTypes) -> str:
    """SHA-256 (lower-case hex) of the key's SubjectPublicKeyInfo: the public-key fingerprint."""
    return hashlib.sha256(spki_der(key)).hexdigest()
