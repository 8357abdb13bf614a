"""The reference server's check of key-attestation evidence in a CSR (docs/attestation.md).

A label with ``attestation: verify`` checks evidence when a CSR carries it and
refuses bad evidence; ``attestation: require`` also refuses a CSR without it.
The checks, in order, each with its own refusal:

``missing``     the CSR has no id-aa-attestation attribute (draft-ietf-lamps-csr-attestation-29)
``format``      the attribute, AttestationBundle or tcg-attest-tpm-certify statement is malformed
``signature``   no certificate in the bundle holds the key that signed the TPMS_ATTEST
``chain``       the signer's certificate does not chain to the label's manufacturer CA
``attest-type`` the signed structure is not a TPM-made TPM2_Certify attestation
``name``        the certified Name is not the Name of the public area carried along
``key``         the certified key is not the CSR's public key
``attributes``  the certified key is not fixedTPM/fixedParent/sensitiveDataOrigin/sign, or decrypts
``freshness``   TPMS_ATTEST.extraData is not this TLS connection's channel binding
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tpmid.csr import ChannelBinding
from tpmid.evidence import (
    ID_AA_ATTESTATION,
    EvidenceFormatError,
    csr_attribute_values,
    decode_bundle,
)
from tpmid.render import name as render_name
from tpmid.tpm.evidence import EvidenceRejected, verify_signature, verify_tpm_certify

MAX_CHAIN = 4


@dataclass(frozen=True)
class AttestationVerdict:
    """What the issuance log records about a request's evidence."""

    result: str  # "proven" | "absent"
    iak: str | None = None  # subject of the attestation key's certificate
    attributes: str | None = None
    binding: str | None = None

    def log_entry(self) -> dict[str, str | None]:
        """The ``attestation`` member of an issuance-log line."""
        return {"result": self.result, "iak": self.iak, "attributes": self.attributes,
                "binding": self.binding}


def _chains_to(cert: x509.Certificate, pool: Sequence[x509.Certificate],
               anchors: Sequence[x509.Certificate], now: datetime) -> bool:
    """True when ``cert`` chains through ``pool`` to one of ``anchors``, all valid at ``now``."""
    current = cert
    for _ in range(MAX_CHAIN + 1):
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            return False
        for anchor in anchors:
            if current.issuer == anchor.subject and _signed_by(current, anchor):
                return anchor.not_valid_before_utc <= now <= anchor.not_valid_after_utc
        parent = next((p for p in pool if p is not current and current.issuer == p.subject
                       and _is_ca(p) and _signed_by(current, p)), None)
        if parent is None:
            return False
        current = parent
    return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_csr_evidence(csr_der: bytes, csr_spki: bytes, *,
                        anchors: Sequence[x509.Certificate], binding: ChannelBinding | None,
                        now: datetime) -> AttestationVerdict:
    """Check the evidence of a CSR; EvidenceRejected naming the failed check.

    Returns ``AttestationVerdict("absent")`` when the CSR has no evidence (the
    caller decides whether that is acceptable).
    """
    try:
        values = csr_attribute_values(csr_der, ID_AA_ATTESTATION)
        if not values:
            return AttestationVerdict("absent")
        if len(values) != 1:
            raise EvidenceRejected("format", "the id-aa-attestation attribute must hold exactly "
                                   "one AttestationBundle")
        bundle = decode_bundle(values[0])
        statements = bundle.tpm_certify()
        certs = [x509.load_der_x509_certificate(c) for c in bundle.certs]
    except EvidenceFormatError as e:
        raise EvidenceRejected("format", f"malformed attestation evidence: {e}") from None
    except ValueError as e:
        raise EvidenceRejected("format", f"a certificate in the AttestationBundle does not "
                               f"parse: {e}") from None
    if not statements:
        raise EvidenceRejected("format", "the AttestationBundle holds no tcg-attest-tpm-certify "
                               "statement")
    stmt = statements[0]
    signer = None
    for cert in certs:
        try:
            verify_signature(cert.public_key(), stmt.attest, stmt.signature)
        except EvidenceRejected as e:
            if e.check == "format":
                raise
            continue
        signer = cert
        break
    if signer is None:
        raise EvidenceRejected(
            "signature", "the evidence signature does not verify with any attestation-key "
            f"certificate in the request ({len(certs)} given)")
    if _is_ca(signer) or not _chains_to(signer, certs, anchors, now):
        raise EvidenceRejected(
            "chain", f"the attestation key's certificate ({render_name(signer.subject)}) does "
            "not chain to the manufacturer CA: the evidence is not signed by a TPM's IAK")
    if binding is None:
        raise EvidenceRejected("freshness", "this connection has no TLS channel binding to "
                               "check the evidence against")
    certified = verify_tpm_certify(stmt, signer.public_key(), csr_spki=csr_spki,
                                   qualifying_data=binding.value)
    return AttestationVerdict("proven", iak=render_name(signer.subject),
                              attributes=certified.attributes_text, binding=binding.kind)
