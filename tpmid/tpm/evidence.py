"""Checking a ``tcg-attest-tpm-certify`` statement in software (no TPM needed).

What the verifier of TPM2_Certify evidence establishes (TPM 2.0 Part 1 §18,
Part 2 §10.12 TPMS_ATTEST; draft-ietf-lamps-csr-attestation's TPM appendix,
"Verifier Processing"):

1. the TPMS_ATTEST was signed by the attestation key (``signature``);
2. it is TPM-generated (magic TPM_GENERATED_VALUE) and a certification
   (type TPM_ST_ATTEST_CERTIFY) — a restricted key signs such a structure only
   when the TPM made it (``attest-type``);
3. the certified Name equals nameAlg || H(tpmTPublic), so the public area
   carried alongside is the one of the certified object (``name``);
4. that public area holds the CSR's public key (``key``);
5. its attributes make it an identity key: fixedTPM, fixedParent,
   sensitiveDataOrigin, signing, never decrypt (``attributes``);
6. extraData equals what the verifier expects, here this enrollment's TLS
   channel binding (``freshness``).

The chain of the attestation key's certificate is the caller's business (the
reference server checks it against its manufacturer CAs). Every refusal is an
:class:`EvidenceRejected` naming the check that failed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE

from tpmid.errors import TpmError
from tpmid.evidence import TpmCertifyStatement
from tpmid.tpm.templates import public_key_from_tpm

_HASHES: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    int(TPM2_ALG.SHA256): ("sha256", hashes.SHA256),
    int(TPM2_ALG.SHA384): ("sha384", hashes.SHA384),
    int(TPM2_ALG.SHA512): ("sha512", hashes.SHA512),
}

REQUIRED_ATTRIBUTES = (("fixedTPM", TPMA_OBJECT.FIXEDTPM), ("fixedParent", TPMA_OBJECT.FIXEDPARENT),
                       ("sensitiveDataOrigin", TPMA_OBJECT.SENSITIVEDATAORIGIN),
                       ("sign", TPMA_OBJECT.SIGN_ENCRYPT))


class EvidenceRejected(TpmError):
    """Evidence that does not prove what it claims; ``check`` names the failed check."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class CertifiedKey:
    """What a verified statement proves about the certified key."""

    name: bytes
    attributes: int
    qualifying_data: bytes
    attributes_text: str


def object_name(public_area: bytes) -> bytes:
    """The TPM Name of an object: nameAlg (2 bytes) || H_nameAlg(TPMT_PUBLIC) (Part 1 §16)."""
    area, used = TPMT_PUBLIC.unmarshal(public_area)
    if used != len(public_area):
        raise ValueError("trailing bytes after the TPMT_PUBLIC")
    alg = int(area.nameAlg)
    if alg not in _HASHES:
        raise ValueError(f"unsupported nameAlg {alg:#06x}")
    digest = hashlib.new(_HASHES[alg][0], public_area).digest()
    return alg.to_bytes(2, "big") + digest


def attributes_text(attrs: int) -> str:
    """``fixedTPM|fixedParent|...`` for messages and the issuance log."""
    names = [name for name, bit in (*REQUIRED_ATTRIBUTES, ("decrypt", TPMA_OBJECT.DECRYPT),
                                    ("restricted", TPMA_OBJECT.RESTRICTED))
             if attrs & bit]
    return "|".join(names) or "none"


def verify_signature(public: PublicKeyTypes, attest: bytes, signature: bytes) -> None:
    """EvidenceRejected("signature") unless ``signature`` (TPMT_SIGNATURE) signs ``attest``."""
    try:
        sig, used = TPMT_SIGNATURE.unmarshal(signature)
        if used != len(signature):
            raise ValueError("trailing bytes")
    except Exception as e:
        raise EvidenceRejected("format", f"the signature is not a TPMT_SIGNATURE ({e})") from None
    alg = int(sig.sigAlg)
    try:
        if alg == TPM2_ALG.ECDSA and isinstance(public, ec.EllipticCurvePublicKey):
            h = _HASHES[int(sig.signature.ecdsa.hash)][1]
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            public.verify(encode_dss_signature(r, s), attest, ec.ECDSA(h()))
        elif alg in (TPM2_ALG.RSASSA, TPM2_ALG.RSAPSS) and isinstance(public, rsa.RSAPublicKey):
            h = _HASHES[int(sig.signature.rsassa.hash)][1]
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15() if alg == TPM2_ALG.RSASSA
                else padding.PSS(padding.MGF1(h()), padding.PSS.AUTO))
            public.verify(bytes(sig.signature.rsassa.sig), attest, pad, h())
        else:
            raise EvidenceRejected(
                "signature", f"the evidence signature (algorithm {alg:#06x}) does not match the "
                "attestation key's type")
    except (InvalidSignature, KeyError):
        raise EvidenceRejected(
            "signature", "the evidence signature does not verify with the attestation key's "
            "certificate (signed by another key)") from None


def verify_tpm_certify(stmt: TpmCertifyStatement, attestation_key: PublicKeyTypes, *,
                       csr_spki: bytes, qualifying_data: bytes) -> CertifiedKey:
    """Run checks 1-6 of the module docstring; EvidenceRejected naming the first that fails."""
    verify_signature(attestation_key, stmt.attest, stmt.signature)
    try:
        attest, used = TPMS_ATTEST.unmarshal(stmt.attest)
        if used != len(stmt.attest):
            raise ValueError("trailing bytes")
    except Exception as e:
        raise EvidenceRejected("format", f"tpmSAttest is not a TPMS_ATTEST ({e})") from None
    if int(attest.magic) != int(TPM2_GENERATED.VALUE) or attest.type != TPM2_ST.ATTEST_CERTIFY:
        raise EvidenceRejected("attest-type", "the signed structure is not a TPM-generated "
                               "TPM2_Certify attestation")
    if stmt.public is None:
        raise EvidenceRejected("format", "the statement carries no tpmTPublic of the certified key")
    try:
        name = object_name(stmt.public)
        area, _ = TPMT_PUBLIC.unmarshal(stmt.public)
        key = public_key_from_tpm(TPM2B_PUBLIC(publicArea=area))
    except Exception as e:
        raise EvidenceRejected("format", f"tpmTPublic is not a usable TPMT_PUBLIC ({e})") from None
    certified = bytes(attest.attested.certify.name)
    if certified != name:
        raise EvidenceRejected("name", "the certified key's Name is not the Name of the public "
                               "area carried with it")
    if key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != csr_spki:
        raise EvidenceRejected("key", "the evidence certifies another key than the CSR's public "
                               "key")
    attrs = int(area.objectAttributes)
    text = attributes_text(attrs)
    missing = [n for n, bit in REQUIRED_ATTRIBUTES if not attrs & bit]
    if missing:
        raise EvidenceRejected("attributes", f"the certified key lacks {', '.join(missing)} "
                               f"(it has {text})")
    if attrs & TPMA_OBJECT.DECRYPT:
        raise EvidenceRejected("attributes", f"the certified key has decrypt ({text}); an "
                               "identity key must only sign")
    if bytes(attest.extraData) != qualifying_data:
        raise EvidenceRejected("freshness", "the evidence's qualifying data is not this TLS "
                               "channel's binding (replayed from another enrollment?)")
    return CertifiedKey(name=name, attributes=attrs, qualifying_data=qualifying_data,
                        attributes_text=text)
