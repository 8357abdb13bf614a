"""Key-attestation evidence in PKCS#10 requests — model layer, no I/O, no TPM stack.

The CSR attribute is the one of draft-ietf-lamps-csr-attestation-29
(2 September 2026), §4.1 and §4.3::

    id-aa-attestation OBJECT IDENTIFIER ::= { id-aa 59 }   -- 1.2.840.113549.1.9.16.2.59

    AttestationBundle ::= SEQUENCE {
       attestations SEQUENCE SIZE (1..MAX) OF AttestationStatement,
       certs SEQUENCE SIZE (1..MAX) OF LimitedCertChoices OPTIONAL }

    AttestationStatement ::= SEQUENCE { type OBJECT IDENTIFIER, stmt ANY }

The one statement tpmid produces is the TPM 2.0 key attestation the draft's
TPM appendix (up to revision 12) and the TCG OID arc define::

    tcg-attest-tpm-certify OBJECT IDENTIFIER ::= { 2 23 133 20 1 }

    TcgAttestCertify ::= SEQUENCE {
      tpmSAttest  OCTET STRING,          -- TPMS_ATTEST of TPM2_Certify (the signed bytes)
      signature   OCTET STRING,          -- TPMT_SIGNATURE by the attestation key
      tpmTPublic  OCTET STRING OPTIONAL  -- TPMT_PUBLIC of the certified key }

``certs`` carries the attestation key's certificate and its chain. Nothing
here trusts anything: :mod:`tpmid.tpm.evidence` checks the TPM structures and
the server checks the chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpmid.der import (
    TAG_OCTET_STRING,
    TAG_OID,
    TAG_SEQUENCE,
    TAG_SET,
    der_oid,
    der_tlv,
    oid_from_content,
    read_tlv,
)

ID_AA_ATTESTATION = "1.2.840.113549.1.9.16.2.59"
TCG_ATTEST_TPM_CERTIFY = "2.23.133.20.1"
# The draft revision whose attribute tpmid writes and the reference server reads.
CSR_ATTESTATION_DRAFT = "draft-ietf-lamps-csr-attestation-29"

_TAG_ATTRIBUTES = 0xA0  # [0] IMPLICIT SET OF Attribute (RFC 2986 §4.1)
_TAG_BIT_STRING = 0x03


class EvidenceFormatError(ValueError):
    """The attribute, bundle or statement is not what the draft defines."""


@dataclass(frozen=True)
class TpmCertifyStatement:
    """One ``TcgAttestCertify``: the raw TPM structures, unparsed."""

    attest: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    public: bytes | None  # TPMT_PUBLIC of the certified key

    def encode(self) -> bytes:
        """DER of ``TcgAttestCertify``."""
        body = der_tlv(TAG_OCTET_STRING, self.attest) + der_tlv(TAG_OCTET_STRING, self.signature)
        if self.public is not None:
            body += der_tlv(TAG_OCTET_STRING, self.public)
        return der_tlv(TAG_SEQUENCE, body)


@dataclass(frozen=True)
class AttestationBundle:
    """The attribute's value: statements (type OID, DER of stmt) and certificates (DER)."""

    statements: tuple[tuple[str, bytes], ...]
    certs: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        """DER of ``AttestationBundle``."""
        if not self.statements:
            raise EvidenceFormatError("an AttestationBundle holds at least one statement")
        stmts = b"".join(der_tlv(TAG_SEQUENCE, der_oid(oid) + stmt)
                         for oid, stmt in self.statements)
        body = der_tlv(TAG_SEQUENCE, stmts)
        if self.certs:
            body += der_tlv(TAG_SEQUENCE, b"".join(self.certs))
        return der_tlv(TAG_SEQUENCE, body)

    def tpm_certify(self) -> list[TpmCertifyStatement]:
        """Every ``tcg-attest-tpm-certify`` statement, decoded."""
        return [decode_tpm_certify(stmt) for oid, stmt in self.statements
                if oid == TCG_ATTEST_TPM_CERTIFY]


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, content start, content end) of each TLV in ``der[start:end]``."""
    out = []
    pos = start
    while pos < end:
        tag, c_start, c_end = read_tlv(der, pos)
        if c_end > end:
            raise EvidenceFormatError("an element runs past its container")
        out.append((tag, pos, c_start, c_end))
        pos = c_end
    return out


def _one(der: bytes, tag: int, what: str) -> tuple[int, int]:
    try:
        got, start, end = read_tlv(der, 0)
    except ValueError as e:
        raise EvidenceFormatError(f"{what}: {e}") from None
    if got != tag or end != len(der):
        raise EvidenceFormatError(f"{what} is not one DER element of the expected type")
    return start, end


def decode_tpm_certify(der: bytes) -> TpmCertifyStatement:
    """Parse a ``TcgAttestCertify``; EvidenceFormatError on anything else."""
    start, end = _one(der, TAG_SEQUENCE, "TcgAttestCertify")
    try:
        parts = _children(der, start, end)
    except ValueError as e:
        raise EvidenceFormatError(f"TcgAttestCertify: {e}") from None
    if len(parts) not in (2, 3) or any(p[0] != TAG_OCTET_STRING for p in parts):
        raise EvidenceFormatError("TcgAttestCertify is not 2 or 3 OCTET STRINGs")
    values = [der[s:e] for _, _, s, e in parts]
    return TpmCertifyStatement(values[0], values[1], values[2] if len(values) == 3 else None)


def decode_bundle(der: bytes) -> AttestationBundle:
    """Parse an ``AttestationBundle``; EvidenceFormatError on anything else."""
    start, end = _one(der, TAG_SEQUENCE, "AttestationBundle")
    try:
        top = _children(der, start, end)
        if not top or top[0][0] != TAG_SEQUENCE or len(top) > 2:
            raise EvidenceFormatError("AttestationBundle is not SEQUENCE { attestations, certs }")
        statements = []
        for tag, _, s, e in _children(der, top[0][2], top[0][3]):
            if tag != TAG_SEQUENCE:
                raise EvidenceFormatError("an AttestationStatement is not a SEQUENCE")
            fields = _children(der, s, e)
            if len(fields) != 2 or fields[0][0] != TAG_OID:
                raise EvidenceFormatError("an AttestationStatement is not { type, stmt }")
            oid = oid_from_content(der[fields[0][2]:fields[0][3]])
            statements.append((oid, der[fields[1][1]:e]))
        if not statements:
            raise EvidenceFormatError("the AttestationBundle holds no statement")
        certs: list[bytes] = []
        if len(top) == 2:
            if top[1][0] != TAG_SEQUENCE:
                raise EvidenceFormatError("certs is not a SEQUENCE")
            for _tag, elem, _s, e in _children(der, top[1][2], top[1][3]):
                certs.append(der[elem:e])
    except ValueError as e:
        if isinstance(e, EvidenceFormatError):
            raise
        raise EvidenceFormatError(f"AttestationBundle: {e}") from None
    return AttestationBundle(tuple(statements), tuple(certs))


def attribute(bundle: AttestationBundle) -> bytes:
    """DER of the PKCS#10 ``Attribute`` id-aa-attestation carrying ``bundle``."""
    return der_tlv(TAG_SEQUENCE, der_oid(ID_AA_ATTESTATION)
                   + der_tlv(TAG_SET, bundle.encode()))


def _set_of(elements: list[bytes]) -> bytes:
    # X.690 §11.6: the elements of a DER SET OF are sorted by their encodings.
    return b"".join(sorted(elements))


def add_attribute(tbs: bytes, attr: bytes) -> bytes:
    """``CertificationRequestInfo`` ``tbs`` with the Attribute ``attr`` added (RFC 2986 §4.1)."""
    start, end = _one(tbs, TAG_SEQUENCE, "CertificationRequestInfo")
    parts = _children(tbs, start, end)
    if len(parts) != 4 or parts[3][0] != _TAG_ATTRIBUTES:
        raise EvidenceFormatError("CertificationRequestInfo is not { version, subject, "
                                  "subjectPKInfo, [0] attributes }")
    head_end = parts[3][1]
    attrs = [tbs[elem:e] for _tag, elem, _s, e in _children(tbs, parts[3][2], parts[3][3])]
    new_attrs = der_tlv(_TAG_ATTRIBUTES, _set_of([*attrs, attr]))
    return der_tlv(TAG_SEQUENCE, tbs[start:head_end] + new_attrs)


def csr_parts(csr_der: bytes) -> tuple[bytes, bytes, bytes]:
    """(CertificationRequestInfo, signatureAlgorithm, signature bits) of a CSR, as DER/bytes."""
    start, end = _one(csr_der, TAG_SEQUENCE, "CertificationRequest")
    parts = _children(csr_der, start, end)
    if len(parts) != 3 or parts[2][0] != _TAG_BIT_STRING:
        raise EvidenceFormatError("CertificationRequest is not { info, algorithm, signature }")
    info = csr_der[parts[0][1]:parts[0][3]]
    alg = csr_der[parts[1][1]:parts[1][3]]
    bits = csr_der[parts[2][2] + 1:parts[2][3]]  # after the unused-bits octet
    return info, alg, bits


def assemble_csr(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """DER ``CertificationRequest`` from its three parts (signature: the raw signature octets)."""
    return der_tlv(TAG_SEQUENCE, tbs + algorithm
                   + der_tlv(_TAG_BIT_STRING, b"\x00" + signature))


def csr_attribute_values(csr_der: bytes, oid: str) -> list[bytes]:
    """The DER of each value of attribute ``oid`` in a CSR (empty when it has none)."""
    info, _, _ = csr_parts(csr_der)
    start, end = _one(info, TAG_SEQUENCE, "CertificationRequestInfo")
    parts = _children(info, start, end)
    if len(parts) != 4 or parts[3][0] != _TAG_ATTRIBUTES:
        return []
    values: list[bytes] = []
    for tag, _, s, e in _children(info, parts[3][2], parts[3][3]):
        if tag != TAG_SEQUENCE:
            raise EvidenceFormatError("a CSR attribute is not a SEQUENCE")
        fields = _children(info, s, e)
        if len(fields) != 2 or fields[0][0] != TAG_OID or fields[1][0] != TAG_SET:
            raise EvidenceFormatError("a CSR attribute is not { type, SET OF values }")
        if oid_from_content(info[fields[0][2]:fields[0][3]]) != oid:
            continue
        values.extend(info[elem:ve] for _t, elem, _vs, ve
                      in _children(info, fields[1][2], fields[1][3]))
    return values
