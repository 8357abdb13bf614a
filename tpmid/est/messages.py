"""RFC 7030 wire formats: certs-only PKCS#7, CSR bodies, CSR attributes, multipart, Retry-After.

A pure model layer (STYLE.md §1): bytes in, objects out, no I/O. Both the EST
client and the reference server (:mod:`tpmid.server`) use it, so what one side
writes the other side reads.

Leniency follows RFC 8951 §3 and the servers found in the field: bodies are
base64 of DER, with or without line breaks and whatever the
``Content-Transfer-Encoding`` header says; PEM and raw DER are accepted too.
What we *write* is the conservative form: base64 in 64-column lines ending in a
newline, which ``openssl base64 -d`` and libest both read.

Every parse failure raises :class:`~tpmid.errors.EstProtocolError` with a
message that says what was expected and what arrived.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.parser
import email.utils
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from tpmid.der import (
    TAG_OID,
    TAG_SEQUENCE,
    TAG_SET,
    der_oid,
    der_tlv,
    oid_from_content,
    oid_of_der,
    read_tlv,
)
from tpmid.errors import EstProtocolError

PKCS7_MIME = "application/pkcs7-mime"
PKCS10 = "application/pkcs10"
CSRATTRS = "application/csrattrs"
PKCS8 = "application/pkcs8"
MULTIPART_MIXED = "multipart/mixed"
# RFC 7030 §4.1.3, §4.2.3: the full Content-Type of a certs-only response.
CERTS_ONLY_CONTENT_TYPE = "application/pkcs7-mime; smime-type=certs-only"

_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_WHITESPACE = frozenset(b" \t\r\n\v\f")
_PEM_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL
)
_PEM_HEADER_RE = re.compile(rb"^[A-Za-z-]+:.*$", re.MULTILINE)


# --------------------------------------------------------------------------- bodies


def _preview(body: bytes, limit: int = 40) -> str:
    """A short printable sample of a body for error messages (never secret material)."""
    text = body[:limit].decode("ascii", "replace")
    text = "".join(ch if ch.isprintable() else "." for ch in text)
    return repr(text + ("..." if len(body) > limit else ""))


def _is_base64_text(body: bytes) -> bool:
    return all(b in _B64_CHARS or b in _WHITESPACE for b in body)


def _b64decode(body: bytes, what: str) -> bytes:
    compact = bytes(b for b in body if b not in _WHITESPACE)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EstProtocolError(
            f"{what}: the body looks like base64 but does not decode ({e})"
        ) from e


def _pem_blocks(body: bytes) -> list[tuple[str, bytes]]:
    """``(label, der)`` for each PEM block in ``body``."""
    blocks = []
    for m in _PEM_RE.finditer(body):
        label = m.group(1).decode("ascii")
        inner = _PEM_HEADER_RE.sub(b"", m.group(2))  # RFC 1421 headers, if any
        blocks.append((label, _b64decode(inner, f"PEM block {label}")))
    return blocks


def _body_to_der(body: bytes, what: str) -> bytes:
    """Base64 (any line layout) or raw DER → DER. PEM is handled by the callers."""
    stripped = body.strip()
    if not stripped:
        raise EstProtocolError(f"{what}: the body is empty")
    if _is_base64_text(stripped):
        return _b64decode(stripped, what)
    if stripped[:1] == b"\x30":  # a DER SEQUENCE
        return bytes(body)
    raise EstProtocolError(
        f"{what}: expected base64-encoded DER, PEM or DER, got {_preview(stripped)}"
    )


def b64_lines(der: bytes, width: int = 64) -> bytes:
    """Base64 of ``der`` in ``width``-column lines, each ending in ``\\n``.

    64 columns is what ``openssl base64`` writes and what ``openssl base64 -d``
    (without ``-A``) and libest read back.
    """
    text = base64.b64encode(der)
    return b"".join(text[i:i + width] + b"\n" for i in range(0, len(text), width)) or b"\n"


# --------------------------------------------------------------------------- certs-only


def encode_certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """A certs-only CMC Simple PKI Response (RFC 7030 §4.1.3, §4.2.3; RFC 5272 §4.1).

    DER SignedData with no signers, base64 in 64-column lines. DER orders the
    certificate SET, so the order of ``certs`` is not preserved on the wire.
    """
    if not certs:
        raise ValueError("a certs-only response needs at least one certificate")
    return b64_lines(pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER))


_OID_SIGNED_DATA = "1.2.840.113549.1.7.2"  # RFC 5652 §5.1


def _signed_data_certificates(der: bytes) -> list[bytes]:
    """The DER of each certificate in a ContentInfo/SignedData, in the order sent.

    RFC 5652 §5.1. Walked by hand because RFC 7030 Appendix A and deployed
    servers list the certificate SET in issue order (BER, not DER sorting),
    which cryptography parses only with a deprecation warning, and because the
    order a server chose is worth keeping. Raises ValueError on anything else.
    """
    tag, start, end = read_tlv(der, 0)
    if tag != TAG_SEQUENCE or end != len(der):
        raise ValueError("ContentInfo is not one SEQUENCE")
    tag, s, e = read_tlv(der, start)
    if tag != TAG_OID or oid_from_content(der[s:e]) != _OID_SIGNED_DATA:
        raise ValueError("the content type is not signedData")
    tag, s, e = read_tlv(der, e)
    if tag != 0xA0:
        raise ValueError("missing [0] content")
    tag, pos, sd_end = read_tlv(der, s)
    if tag != TAG_SEQUENCE:
        raise ValueError("SignedData is not a SEQUENCE")
    for expected in (0x02, TAG_SET, TAG_SEQUENCE):  # version, digestAlgorithms, encapContent
        tag, _, pos = read_tlv(der, pos)
        if tag != expected:
            raise ValueError("unexpected SignedData layout")
    certs: list[bytes] = []
    if pos < sd_end and der[pos] == 0xA0:  # certificates [0] IMPLICIT CertificateSet
        _, c, c_end = read_tlv(der, pos)
        while c < c_end:
            tag, _, nxt = read_tlv(der, c)
            if tag == TAG_SEQUENCE:  # a plain Certificate; other CertificateChoices skipped
                certs.append(der[c:nxt])
            c = nxt
    return certs


def _load_pkcs7(der: bytes, what: str) -> list[x509.Certificate]:
    try:
        return [x509.load_der_x509_certificate(c) for c in _signed_data_certificates(der)]
    except ValueError:
        pass  # not the simple DER/BER shape: let cryptography judge (indefinite lengths etc.)
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as e:
        raise EstProtocolError(f"{what}: not a PKCS#7 certs-only structure ({e})") from e
    return list(certs)


def decode_certs_only(body: bytes) -> list[x509.Certificate]:
    """Certificates from a certs-only response body.

    Accepts base64 with or without line breaks, PEM (``PKCS7``/``CMS`` or
    ``CERTIFICATE`` blocks) and raw DER. Raises EstProtocolError when the body
    is none of these or holds no certificate.
    """
    what = "certs-only response"
    if b"-----BEGIN" in body:
        certs: list[x509.Certificate] = []
        for label, der in _pem_blocks(body):
            if label in ("PKCS7", "CMS"):
                certs.extend(_load_pkcs7(der, what))
            elif label in ("CERTIFICATE", "X509 CERTIFICATE"):
                try:
                    certs.append(x509.load_der_x509_certificate(der))
                except ValueError as e:
                    raise EstProtocolError(f"{what}: a PEM certificate does not parse ({e})") from e
        if not certs:
            raise EstProtocolError(f"{what}: PEM body without PKCS7 or CERTIFICATE blocks")
        return certs
    certs = _load_pkcs7(_body_to_der(body, what), what)
    if not certs:
        raise EstProtocolError(f"{what}: the PKCS#7 structure holds no certificate")
    return certs


# --------------------------------------------------------------------------- CSRs


def encode_csr(csr: x509.CertificateSigningRequest) -> bytes:
    """A PKCS#10 request body: base64 DER in 64-column lines with a trailing newline.

    libest refuses a single base64 line without a newline, so we always break.
    """
    return b64_lines(csr.public_bytes(serialization.Encoding.DER))


def decode_csr(body: bytes) -> x509.CertificateSigningRequest:
    """Parse a PKCS#10 body: base64 DER (any line layout), PEM or raw DER.

    Only the syntax is checked here; the signature is the server's business.
    """
    what = "PKCS#10 request"
    if b"-----BEGIN" in body:
        blocks = [der for label, der in _pem_blocks(body)
                  if label in ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")]
        if len(blocks) != 1:
            raise EstProtocolError(
                f"{what}: expected exactly one PEM 'CERTIFICATE REQUEST' block, found {len(blocks)}"
            )
        der = blocks[0]
    else:
        der = _body_to_der(body, what)
    try:
        return x509.load_der_x509_csr(der)
    except ValueError as e:
        raise EstProtocolError(f"{what}: the DER does not parse as a CSR ({e})") from e


# --------------------------------------------------------------------------- DER helpers

# CsrAttrs (RFC 7030 §4.5.2) is not modelled by cryptography: tpmid.der reads and
# writes it. der_tlv, der_oid and oid_of_der stay importable from here.


# --------------------------------------------------------------------------- CSR attributes


@dataclass(frozen=True)
class CsrAttr:
    """One ``AttrOrOID`` of RFC 7030 §4.5.2.

    A bare OID (``values is None``) names something the CSR should contain, for
    example challengePassword or a signature algorithm. An Attribute
    (``values`` set, DER of each AttributeValue) carries parameters, for example
    ``id-ecPublicKey`` with value ``secp384r1``.
    """

    oid: x509.ObjectIdentifier
    values: tuple[bytes, ...] | None = None

    @property
    def is_attribute(self) -> bool:
        """True for an Attribute, False for a bare OID."""
        return self.values is not None

    @property
    def value_oids(self) -> tuple[str, ...]:
        """The values that are OBJECT IDENTIFIERs, as dotted strings."""
        return tuple(o for o in (oid_of_der(v) for v in self.values or ()) if o is not None)

    @classmethod
    def of(cls, oid: str, *value_oids: str) -> CsrAttr:
        """A bare OID, or (with ``value_oids``) an Attribute whose values are OIDs."""
        if not value_oids:
            return cls(x509.ObjectIdentifier(oid))
        return cls(x509.ObjectIdentifier(oid), tuple(der_oid(v) for v in value_oids))


def encode_csrattrs(items: Sequence[CsrAttr]) -> bytes:
    """``CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID`` as base64 DER lines."""
    parts = []
    for item in items:
        oid = der_oid(item.oid.dotted_string)
        if item.values is None:
            parts.append(oid)
        else:
            # X.690 §11.6: DER sorts the components of a SET OF by their encoding.
            values = b"".join(sorted(item.values))
            parts.append(der_tlv(TAG_SEQUENCE, oid + der_tlv(TAG_SET, values)))
    return b64_lines(der_tlv(TAG_SEQUENCE, b"".join(parts)))


def decode_csrattrs(body: bytes) -> list[CsrAttr]:
    """Parse an ``application/csrattrs`` body (base64 or DER); an empty body means none."""
    what = "CSR attributes"
    if not body.strip():
        return []
    der = _body_to_der(body, what)
    try:
        tag, start, end = read_tlv(der, 0)
        if tag != TAG_SEQUENCE:
            raise ValueError("CsrAttrs is not a SEQUENCE")
        if end != len(der):
            raise ValueError("trailing bytes after CsrAttrs")
        items: list[CsrAttr] = []
        pos = start
        while pos < end:
            t, s, e = read_tlv(der, pos)
            if t == TAG_OID:
                items.append(CsrAttr(x509.ObjectIdentifier(oid_from_content(der[s:e]))))
            elif t == TAG_SEQUENCE:
                ot, os_, oe = read_tlv(der, s)
                if ot != TAG_OID:
                    raise ValueError("Attribute type is not an OID")
                st, ss, se = read_tlv(der, oe)
                if st != TAG_SET or se != e:
                    raise ValueError("Attribute values are not one SET")
                values = []
                vp = ss
                while vp < se:
                    _vt, _vs, ve = read_tlv(der, vp)
                    values.append(der[vp:ve])
                    vp = ve
                items.append(CsrAttr(x509.ObjectIdentifier(oid_from_content(der[os_:oe])),
                                     tuple(values)))
            else:
                raise ValueError(f"unexpected tag {t:#04x} in CsrAttrs")
            pos = e
    except ValueError as e:
        raise EstProtocolError(f"{what}: malformed DER ({e})") from e
    return items


# --------------------------------------------------------------------------- HTTP details


def media_type_matches(content_type: str | None, expected: str) -> bool:
    """True if the ``type/subtype`` of ``content_type`` is ``expected`` (case-insensitive).

    Parameters (``; smime-type=certs-only``, ``; charset=...``) are ignored, as
    servers differ in which they send and how they space them.
    """
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == expected.strip().lower()


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3).

    The header is either delay-seconds or an HTTP-date; a date in the past means
    0. Returns None when the header is absent or unreadable, so the caller
    applies its own default.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        # delay-seconds is 1*DIGIT with no upper bound: beyond any float it is "forever".
        return float(int(text)) if len(text) <= 15 else math.inf
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    # RFC 9110 §5.6.7: HTTP-dates are always GMT.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# --------------------------------------------------------------------------- serverkeygen


def _media_param(content_type: str, name: str) -> str | None:
    for param in content_type.split(";")[1:]:
        key, _, val = param.partition("=")
        if key.strip().lower() == name:
            return val.strip().strip('"')
    return None


def encode_serverkeygen(key_der: bytes, certs: Sequence[x509.Certificate]) -> tuple[bytes, str]:
    """A server-side key generation response (RFC 7030 §4.4.2).

    ``multipart/mixed`` with an ``application/pkcs8`` part (the unencrypted
    PrivateKeyInfo) and a certs-only part. Returns ``(body, content_type)``.
    The boundary is random and cannot occur in base64 text.
    """
    boundary = "est-" + secrets.token_hex(12)
    crlf = b"\r\n"

    def part(content_type: str, payload: bytes) -> bytes:
        return (b"--" + boundary.encode() + crlf
                + f"Content-Type: {content_type}".encode() + crlf
                + b"Content-Transfer-Encoding: base64" + crlf + crlf
                + payload.replace(b"\n", crlf))

    body = (part(PKCS8, b64_lines(key_der))
            + part(CERTS_ONLY_CONTENT_TYPE, encode_certs_only(certs))
            + b"--" + boundary.encode() + b"--" + crlf)
    return body, f"{MULTIPART_MIXED}; boundary={boundary}"


def parse_serverkeygen(body: bytes, content_type: str) -> tuple[bytes, list[x509.Certificate]]:
    """``(pkcs8_der, certificates)`` from a ``/serverkeygen`` response (RFC 7030 §4.4.2).

    Only the unencrypted ``application/pkcs8`` key form is supported; an
    encrypted key (``smime-type=server-generated-key``) raises EstProtocolError.
    """
    what = "serverkeygen response"
    if not media_type_matches(content_type, MULTIPART_MIXED):
        raise EstProtocolError(f"{what}: expected {MULTIPART_MIXED}, got {content_type!r}")
    if not _media_param(content_type, "boundary"):
        raise EstProtocolError(f"{what}: the multipart Content-Type has no boundary parameter")
    # The default policy is compat32 (email._policybase): email.policy would import
    # email.headerregistry, the costliest module of the email package.
    parser = email.parser.BytesParser()
    msg = parser.parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    parts = msg.get_payload() if msg.is_multipart() else []
    if not isinstance(parts, list) or not parts:
        raise EstProtocolError(f"{what}: no MIME parts found")
    key: bytes | None = None
    certs: list[x509.Certificate] | None = None
    for p in parts:
        if not isinstance(p, email.message.Message):
            continue
        ctype = p.get("Content-Type", "")
        raw = p.get_payload(decode=False)
        payload = raw.encode("latin-1", "replace") if isinstance(raw, str) else b""
        if media_type_matches(ctype, PKCS8):
            key = _body_to_der(payload, f"{what} key part")
            try:
                serialization.load_der_private_key(key, password=None)
            except (ValueError, TypeError) as e:
                raise EstProtocolError(f"{what}: the key part is not a PKCS#8 key ({e})") from e
        elif media_type_matches(ctype, PKCS7_MIME):
            smime = (_media_param(ctype, "smime-type") or "certs-only").lower()
            if smime == "server-generated-key":
                raise EstProtocolError(
                    f"{what}: the server sent an encrypted key (RFC 7030 §4.4.2), "
                    "which tpmid does not support"
                )
            certs = decode_certs_only(payload)
    if key is None:
        raise EstProtocolError(f"{what}: no {PKCS8} part")
    if certs is None:
        raise EstProtocolError(f"{what}: no certs-only part")
    return key, certs
