"""What the TLS shim needs from a key, and a software key that provides it.

The shim signs TLS CertificateVerify digests through :class:`TlsSigningKey`.
``tpmid.tpm.loaded.LoadedKey`` satisfies it structurally (one TPM2_Sign per
call); :class:`SoftwareSigningKey` wraps a ``cryptography`` private key so the
start-up self-test and the benchmarks can drive exactly the same callback path
without a TPM.

The supported combinations are the TCG IDevID profiles (TPM 2.0 Keys for Device
Identity and Attestation, §7.3.4: H-1 RSA-2048/SHA-256, H-2 P-256/SHA-256,
H-3 P-384/SHA-384).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from tpmid.errors import TlsShimError


@runtime_checkable
class TlsSigningKey(Protocol):
    """A private key the TLS shim can sign handshake digests with.

    ``alg`` is ``"ecc-p256"``, ``"ecc-p384"`` or ``"rsa-2048"``; ``hash_name``
    is the key's fixed scheme hash (``"sha256"`` or ``"sha384"``).
    ``sign_digest`` gets a digest of that hash and returns, for ECDSA, the
    DER ``Ecdsa-Sig-Value`` (r, s) and, for RSA, a PKCS#1 v1.5 signature.
    It raises a :class:`~tpmid.errors.TpmidError` (normally ``TpmError``) when
    signing fails.

    Optionally the key may expose the lock of its TPM connection as
    ``key.tpm.lock`` (``LoadedKey``), ``key.connection.lock`` or ``key.lock``;
    the shim then holds it around
    every signature so that a handshake never interleaves with other commands
    on the same ESAPI context.
    """

    alg: str
    hash_name: str

    def public_key_der(self) -> bytes:
        """The SubjectPublicKeyInfo of the key, DER."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a precomputed digest (see the class docstring for formats)."""
        ...


@dataclass(frozen=True)
class KeyProfile:
    """How the shim drives one kind of key."""

    alg: str
    hash_name: str
    digest_size: int
    #: OpenSSL signature-algorithm list for ``SSL_CTX_set1_client_sigalgs_list``
    #: (RFC 8446 §4.2.3 names: ecdsa_secp256r1_sha256 = "ECDSA+SHA256").
    sigalgs: str
    #: NID of the curve for EC keys (obj_mac.h), 0 for RSA.
    curve_nid: int


# The combinations the shim accepts. A TLS 1.3 ECDSA signature ties the hash to
# the curve (RFC 8446 §4.2.3), so P-256 only ever signs SHA-256 and P-384 only
# SHA-384; RSA identity keys sign RSASSA-PKCS1-v1_5 with SHA-256 (TCG H-1).
PROFILES: dict[tuple[str, str], KeyProfile] = {
    ("ecc-p256", "sha256"): KeyProfile("ecc-p256", "sha256", 32, "ECDSA+SHA256", 415),
    ("ecc-p384", "sha384"): KeyProfile("ecc-p384", "sha384", 48, "ECDSA+SHA384", 715),
    ("rsa-2048", "sha256"): KeyProfile("rsa-2048", "sha256", 32, "RSA+SHA256", 0),
}


def profile_for(key: TlsSigningKey) -> KeyProfile:
    """Return the :class:`KeyProfile` of ``key`` or raise :class:`TlsShimError`."""
    alg = getattr(key, "alg", None)
    hash_name = getattr(key, "hash_name", None)
    prof = PROFILES.get((str(alg), str(hash_name)))
    if prof is None:
        supported = ", ".join(f"{a}/{h}" for a, h in PROFILES)
        raise TlsShimError(
            f"the TLS shim cannot use a {alg}/{hash_name} key; supported: {supported}",
            hint="use an IDevID/LDevID key created with one of the TCG H-1/H-2/H-3 templates",
        )
    return prof


def _hash(name: str) -> hashes.HashAlgorithm:
    return hashes.SHA256() if name == "sha256" else hashes.SHA384()


class SoftwareSigningKey:
    """A :class:`TlsSigningKey` over a ``cryptography`` private key.

    Used by the shim's self-test and by benchmarks to compare against the TPM;
    ``calls`` counts signatures (thread-safe) so a caller can prove the
    callback path was taken.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        """Wrap ``private_key`` (EC P-256/P-384 or RSA-2048)."""
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            curve = private_key.curve.name
            if curve == "secp256r1":
                self.alg, self.hash_name = "ecc-p256", "sha256"
            elif curve == "secp384r1":
                self.alg, self.hash_name = "ecc-p384", "sha384"
            else:
                raise TlsShimError(f"unsupported curve {curve} for a TLS signing key")
        elif isinstance(private_key, rsa.RSAPrivateKey):
            if private_key.key_size != 2048:
                raise TlsShimError(f"unsupported RSA size {private_key.key_size}; use RSA-2048")
            self.alg, self.hash_name = "rsa-2048", "sha256"
        else:
            raise TlsShimError(f"unsupported private key type {type(private_key).__name__}")
        self._key = private_key
        self._lock = threading.Lock()
        self.calls = 0

    @classmethod
    def generate(cls, alg: str) -> SoftwareSigningKey:
        """A fresh key of ``alg`` (``ecc-p256``, ``ecc-p384``, ``rsa-2048``)."""
        if alg == "ecc-p256":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if alg == "ecc-p384":
            return cls(ec.generate_private_key(ec.SECP384R1()))
        if alg == "rsa-2048":
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        raise TlsShimError(f"unknown key algorithm {alg!r}")

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
        """The wrapped private key (software keys only; a TPM key has no such thing)."""
        return self._key

    def public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo, DER."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign ``digest`` like the TPM would (DER ECDSA / PKCS#1 v1.5)."""
        with self._lock:
            self.calls += 1
        pre = utils.Prehashed(_hash(self.hash_name))
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(digest, ec.ECDSA(pre))
        return self._key.sign(digest, padding.PKCS1v15(), pre)
