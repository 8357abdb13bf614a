"""Keys loaded in the TPM and ready to sign: :class:`LoadedKey`.

A :class:`LoadedKey` is transient (flushed when closed) or persistent
(forgotten when closed, it stays in the TPM). It signs digests with exactly one
TPM2_Sign and hands ``cryptography`` a private-key object
(:mod:`tpmid.tpm.signer`) for CSRs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_DIGEST, TPM2B_PUBLIC, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK

from tpmid.errors import KeyMismatchError, TpmError
from tpmid.tpm.context import TpmContext
from tpmid.tpm.rc import tpm_call
from tpmid.tpm.signer import tpm_private_key
from tpmid.tpm.templates import (
    describe_public,
    identify_template,
    is_imported,
    key_spec_of,
    public_key_from_tpm,
    tpm_hash,
)

log = logging.getLogger(__name__)


def flush_transient(tpm: TpmContext, handle: ESYS_TR, what: str) -> None:
    """TPM2_FlushContext ``handle``; on an error path, log a failure instead of masking the error.

    Called from ``finally`` blocks: if an exception is already propagating, a
    second one from the flush (typically: the TPM went away) must not hide it.
    """
    failing = sys.exc_info()[1] is not None
    try:
        with tpm_call(f"flushing {what}", tpm):
            tpm.esapi.flush_context(handle)
        tpm.forget(handle)
    except TpmError as e:
        if not failing:
            raise
        log.warning("could not flush %s after an error: %s", what, e)


# --------------------------------------------------------------------------- loaded keys


class LoadedKey:
    """A key the TPM can sign with right now: transient (flushed on close) or persistent.

    A context manager. ``alg`` is "ecc-p256", "ecc-p384" or "rsa-2048";
    ``hash_name`` is the one hash the key signs with.
    """

    def __init__(self, tpm: TpmContext, handle: ESYS_TR, public: TPM2B_PUBLIC, *,
                 transient: bool, description: str, tpm_handle: int | None = None) -> None:
        self.tpm = tpm
        self.handle = handle
        self.public = public
        self.transient = transient
        self.description = description
        # For persistent keys: the TPM handle (0x81...) whose ESYS_TR the connection
        # reference-counts (TpmContext.open_handle).
        self.tpm_handle = tpm_handle
        self._closed = False
        spec = key_spec_of(public)
        attrs = public.publicArea.objectAttributes
        if spec is None:
            raise KeyMismatchError(
                f"{description} is {describe_public(public)}; tpmid uses RSA-2048, ECC P-256 "
                "or ECC P-384 keys"
            )
        if not attrs & TPMA_OBJECT.SIGN_ENCRYPT or attrs & TPMA_OBJECT.RESTRICTED:
            raise KeyMismatchError(
                f"{description} is {describe_public(public)}, not an unrestricted signing key"
            )
        self.alg = spec.alg
        self.hash_name = spec.hash_name
        area = public.publicArea
        if area.type == TPM2_ALG.ECC and area.parameters.eccDetail.scheme.scheme == TPM2_ALG.ECDSA:
            # The template fixes the scheme; the TPM refuses any other hash.
            fixed = area.parameters.eccDetail.scheme.details.anySig.hashAlg
            self.hash_name = {TPM2_ALG.SHA256: "sha256", TPM2_ALG.SHA384: "sha384",
                              TPM2_ALG.SHA512: "sha512"}.get(fixed, self.hash_name)

    def __repr__(self) -> str:
        return f"LoadedKey({self.description}, {self.alg})"

    def __enter__(self) -> LoadedKey:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except TpmError as e:  # do not hide the error that ended the block
            log.warning("could not close %s after an error: %s", self.description, e)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def close(self) -> None:
        """Flush a transient key from the TPM; forget a persistent one (it stays in the TPM)."""
        if self._closed:
            return
        self._closed = True
        with self.tpm.lock:
            if self.tpm._esapi is None:  # connection already gone, and the objects with it
                return
            if self.transient:
                flush_transient(self.tpm, self.handle, self.description)
            elif self.tpm_handle is not None:
                self.tpm.close_handle(self.tpm_handle, self.handle)
            else:
                self.tpm.esapi.tr_close(self.handle)

    def public_key(self) -> PublicKeyTypes:
        """The public key as a ``cryptography`` object."""
        return public_key_from_tpm(self.public)

    def public_key_der(self) -> bytes:
        """The public key as SubjectPublicKeyInfo DER."""
        return self.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign ``digest`` (of :attr:`hash_name`) with exactly one TPM2_Sign.

        ECDSA signatures come back DER-encoded (r, s) as X.509 and TLS expect;
        RSA signatures are PKCS#1 v1.5 (RSASSA) signature bytes.
        """
        if self._closed:
            raise TpmError(f"{self.description} was already closed")
        size = {"sha256": 32, "sha384": 48, "sha512": 64}[self.hash_name]
        if len(digest) != size:
            raise TpmError(f"{self.description} signs {self.hash_name.upper()} digests "
                           f"({size} bytes), got {len(digest)} bytes")
        ecc = self.alg.startswith("ecc-")
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA if ecc else TPM2_ALG.RSASSA)
        scheme.details.any.hashAlg = tpm_hash(self.hash_name)
        # A NULL ticket is allowed because the key is not restricted (TPM 2.0 Part 3 §20.3, TPM2_Sign).
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self.tpm.lock, tpm_call(f"signing with {self.description}", self.tpm,
                                     handles=(self.description,)):
            sig = self.tpm.esapi.sign(self.handle, TPM2B_DIGEST(digest), scheme, ticket)
        if ecc:
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            return bytes(encode_dss_signature(r, s))
        return bytes(sig.signature.rsassa.sig)

    def private_key(self) -> Any:
        """A ``cryptography`` private-key object whose ``sign()`` is :meth:`sign_digest`.

        Use it with ``x509.CertificateSigningRequestBuilder().sign(key, hash)``
        and the like; it refuses hashes and paddings this key cannot produce.
        """
        return tpm_private_key(self)

    @property
    def template(self) -> str | None:
        """The TCG IDevID template (H-1/H-2/H-3) this key was made from, or None."""
        return identify_template(self.public)

    @property
    def server_generated(self) -> bool:
        """True for a key imported into the TPM (RFC 7030 §4.4): not fixedTPM, not made there."""
        return is_imported(self.public)

    @property
    def can_decrypt(self) -> bool:
        """True when the key has the ``decrypt`` attribute (an identity key must not)."""
        return bool(self.public.publicArea.objectAttributes & TPMA_OBJECT.DECRYPT)

    def describe(self) -> str:
        """``a ECC NIST P-256 signing key (IDevID template H-2)`` and the like."""
        text = describe_public(self.public)
        return f"{text}, server-generated and imported" if self.server_generated else text



def key_matches_certificate(key: LoadedKey, cert: x509.Certificate) -> bool:
    """True when ``cert`` certifies exactly this key (SubjectPublicKeyInfo equal)."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return spki == key.public_key_der()
