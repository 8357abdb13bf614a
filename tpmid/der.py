"""A minimal DER reader and writer (ITU-T X.690) for the few structures
``cryptography`` does not model: RFC 7030 CsrAttrs and the RFC 4108
HardwareModuleName. Definite lengths and single-byte tags only. Pure: no I/O.
"""

from __future__ import annotations

TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_SEQUENCE = 0x30
TAG_SET = 0x31


def der_len(n: int) -> bytes:
    """X.690 §8.1.3 definite length: short form below 128, else long form."""
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def der_tlv(tag: int, content: bytes) -> bytes:
    """One DER TLV (single-byte tag)."""
    return bytes([tag]) + der_len(len(content)) + content


def read_tlv(buf: bytes, pos: int) -> tuple[int, int, int]:
    """``(tag, content_start, content_end)`` of the TLV at ``pos``; raise ValueError."""
    if pos + 2 > len(buf):
        raise ValueError("truncated TLV header")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte tags are not supported")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        nbytes = first & 0x7F
        if nbytes == 0:
            raise ValueError("indefinite length is not DER")
        if nbytes > 4 or pos + nbytes > len(buf):
            raise ValueError("bad length")
        length = int.from_bytes(buf[pos:pos + nbytes], "big")
        if length < 0x80 or buf[pos] == 0:
            raise ValueError("non-minimal length encoding is not DER")
        pos += nbytes
    end = pos + length
    if end > len(buf):
        raise ValueError("truncated TLV content")
    return tag, pos, end


def der_oid(dotted: str) -> bytes:
    """DER OBJECT IDENTIFIER for a dotted string (X.690 §8.19: 40*a+b, base-128 arcs)."""
    try:
        arcs = [int(a) for a in dotted.split(".")]
    except ValueError:
        raise ValueError(f"{dotted!r} is not a dotted OID") from None
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40) or min(arcs) < 0:
        raise ValueError(f"{dotted!r} is not a valid OID")
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return der_tlv(TAG_OID, bytes(out))


def oid_from_content(content: bytes) -> str:
    """The dotted string of an OBJECT IDENTIFIER's content octets; raise ValueError."""
    if not content or content[-1] & 0x80:
        raise ValueError("bad OBJECT IDENTIFIER encoding")
    arcs: list[int] = []
    value = 0
    for i, b in enumerate(content):
        if value == 0 and b == 0x80 and (i == 0 or content[i - 1] & 0x80 == 0):
            raise ValueError("non-minimal OBJECT IDENTIFIER arc")
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def oid_of_der(der: bytes) -> str | None:
    """The dotted OID if ``der`` is exactly one OBJECT IDENTIFIER TLV, else None."""
    try:
        tag, start, end = read_tlv(der, 0)
        if tag != TAG_OID or end != len(der):
            return None
        return oid_from_content(der[start:end])
    except ValueError:
        return None


def der_prefix(data: bytes) -> bytes:
    """The DER SEQUENCE at the start of ``data`` (NV indices may be padded beyond it)."""
    if len(data) < 2 or data[0] != 0x30:
        return data
    first = data[1]
    if first < 0x80:
        return data[:2 + first]
    n = first & 0x7F
    if n == 0 or n > 4 or len(data) < 2 + n:
        return data
    return data[:2 + n + int.from_bytes(data[2:2 + n], "big")]
