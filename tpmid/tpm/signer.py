"""``cryptography`` private-key objects backed by a TPM key.

``cryptography``'s builders (CSR, certificate, CRL) call ``key.sign(data, ...)``
on whatever private-key object they are given. These thin adapters hash the data
in software and hand the digest to the key's ``sign_digest`` (for
:class:`tpmid.tpm.loaded.LoadedKey`: exactly one TPM2_Sign per signature). They
refuse any hash or padding the key cannot produce instead of silently using
another one, and they never expose private material (there is none outside the
TPM).
"""

from __future__ import annotations

from typing import Any, NoReturn, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed

from tpmid.errors import TpmError


class DigestSigner(Protocol):
    """What the adapters need from a TPM key (:class:`tpmid.tpm.loaded.LoadedKey` is one)."""

    alg: str
    hash_name: str
    description: str

    def public_key(self) -> PublicKeyTypes:
        """The public half."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """One TPM2_Sign over ``digest``."""
        ...

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}


def _digest(key: DigestSigner, data: bytes | bytearray | memoryview,
            algorithm: hashes.HashAlgorithm | Prehashed | NoDigestInfo) -> bytes:
    """Hash ``data`` with ``algorithm`` after checking it is the key's one hash."""
    if isinstance(algorithm, NoDigestInfo):
        raise TpmError(f"{key.description} does not make RSA signatures without DigestInfo")
    data = bytes(data)
    name = algorithm.name if not isinstance(algorithm, Prehashed) else algorithm._algorithm.name
    if name != key.hash_name:
        raise TpmError(
            f"{key.description} ({key.alg}) signs only with {key.hash_name.upper()}; "
            f"{name.upper()} was requested",
            hint=f"build the CSR/certificate with hashes.{key.hash_name.upper()}()",
        )
    if isinstance(algorithm, Prehashed):
        return data
    h = hashes.Hash(_HASHES[name]())
    h.update(data)
    return h.finalize()


def _no_private(key: DigestSigner) -> NoReturn:
    raise TpmError(f"the private part of {key.description} never leaves the TPM")


class TpmEcPrivateKey(ec.EllipticCurvePrivateKey):
    """An ECDSA key in the TPM, usable wherever ``cryptography`` wants an EC private key."""

    def __init__(self, key: DigestSigner) -> None:
        self._key = key
        self._public = key.public_key()
        assert isinstance(self._public, ec.EllipticCurvePublicKey)

    @property
    def tpm_key(self) -> DigestSigner:
        """The :class:`DigestSigner` behind this object."""
        return self._key

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA-sign ``data`` in the TPM; DER-encoded (r, s)."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TpmError(f"{self._key.description} only makes ECDSA signatures")
        return self._key.sign_digest(_digest(self._key, data, signature_algorithm.algorithm))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half."""
        return self._public  # type: ignore[return-value]

    @property
    def curve(self) -> ec.EllipticCurve:
        """The key's curve."""
        return self._public.curve  # type: ignore[union-attr]

    @property
    def key_size(self) -> int:
        """Bit length of the curve."""
        return int(self.curve.key_size)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        """Refused: identity keys have no decrypt attribute, so no ECDH."""
        raise TpmError(f"{self._key.description} is a signing-only key (no ECDH)")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        """Refused: the private key stays in the TPM."""
        _no_private(self._key)

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        """Refused: the private key stays in the TPM."""
        _no_private(self._key)

    def __copy__(self) -> TpmEcPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[Any, Any]) -> TpmEcPrivateKey:
        return self


class TpmRsaPrivateKey(rsa.RSAPrivateKey):
    """An RSA key in the TPM, signing PKCS#1 v1.5 with SHA-256."""

    def __init__(self, key: DigestSigner) -> None:
        self._key = key
        self._public = key.public_key()
        assert isinstance(self._public, rsa.RSAPublicKey)

    @property
    def tpm_key(self) -> DigestSigner:
        """The :class:`DigestSigner` behind this object."""
        return self._key

    def sign(self, data: bytes, padding: padding.AsymmetricPadding,
             algorithm: hashes.HashAlgorithm | Prehashed | NoDigestInfo) -> bytes:
        """RSASSA-PKCS1-v1_5-sign ``data`` in the TPM."""
        if not isinstance(padding, PKCS1v15):
            raise TpmError(f"{self._key.description} signs with PKCS#1 v1.5 padding only; "
                           f"{padding.name} was requested")
        return self._key.sign_digest(_digest(self._key, data, algorithm))

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half."""
        return self._public  # type: ignore[return-value]

    @property
    def key_size(self) -> int:
        """Modulus size in bits."""
        return int(self._public.key_size)  # type: ignore[union-attr]

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        """Refused: identity keys never have the decrypt attribute."""
        raise TpmError(f"{self._key.description} is a signing-only key (no decryption)")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        """Refused: the private key stays in the TPM."""
        _no_private(self._key)

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        """Refused: the private key stays in the TPM."""
        _no_private(self._key)

    def __copy__(self) -> TpmRsaPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[Any, Any]) -> TpmRsaPrivateKey:
        return self


def tpm_private_key(key: DigestSigner) -> TpmEcPrivateKey | TpmRsaPrivateKey:
    """The ``cryptography`` private-key adapter for ``key``."""
    if key.alg.startswith("ecc-"):
        return TpmEcPrivateKey(key)
    return TpmRsaPrivateKey(key)
