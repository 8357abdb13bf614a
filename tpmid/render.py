"""How tpmid writes names, serials, fingerprints, times and durations for people.

One module so that every command, message and log line says it the same way
(documented in docs/cli.md, "How values are written"):

* **names**: RFC 4514 with the usual short names, ``serialNumber`` and
  ``emailAddress`` included (``serialNumber=SN001,CN=device-1``), never escaped a
  second time when quoted in a message (:func:`name`, :func:`quoted_name`);
* **serials**: every byte of the certificate serial as two lower-case hex digits,
  as ``openssl x509 -serial`` prints it (leading zero bytes kept) (:func:`serial`);
* **fingerprints**: SHA-256, lower-case hex without separators, always labelled
  which: of the DER certificate (``certificate SHA-256 …``) or of the
  SubjectPublicKeyInfo (``public key SHA-256 …``) (:func:`cert_fingerprint`,
  :func:`key_fingerprint`);
* **times**: ISO 8601 UTC, whole seconds (:func:`iso`); **durations**: ``1 min 30 s``,
  ``4 d 3 h``; relative times ``in 3 h`` / ``55 s ago`` (:func:`format_duration`,
  :func:`describe_age`).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from tpmid.clock import as_utc

if TYPE_CHECKING:
    from cryptography import x509

# RFC 4514 §3 names only a few attribute types; these are the others people expect
# to read (X.520 serialNumber, PKCS #9 emailAddress) instead of a dotted OID.
_SHORT_NAMES = {"2.5.4.5": "serialNumber", "1.2.840.113549.1.9.1": "emailAddress"}


def name(n: x509.Name) -> str:
    """``serialNumber=SN001,CN=device-1``: RFC 4514 with the usual short names."""
    from cryptography.x509 import ObjectIdentifier

    return n.rfc4514_string({ObjectIdentifier(oid): short for oid, short in _SHORT_NAMES.items()})


def quoted_name(n: x509.Name) -> str:
    """:func:`name` in single quotes, for a message (no second escaping, unlike ``repr``)."""
    return f"'{name(n)}'"


def serial(number: int) -> str:
    """Every byte of a certificate serial as two lower-case hex digits (``openssl x509 -serial``)."""
    text = f"{number:x}"
    return text if len(text) % 2 == 0 else "0" + text


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data``: lower-case hex, no separators."""
    return hashlib.sha256(data).hexdigest()


def cert_fingerprint(cert: x509.Certificate) -> str:
    """``certificate SHA-256 <hex>``: the fingerprint of the DER certificate, labelled."""
    from cryptography.hazmat.primitives import serialization

    return "certificate SHA-256 " + sha256_hex(cert.public_bytes(serialization.Encoding.DER))


def key_fingerprint(spki_der: bytes) -> str:
    """``public key SHA-256 <hex>``: the fingerprint of a SubjectPublicKeyInfo, labelled."""
    return "public key SHA-256 " + sha256_hex(spki_der)


class Decision(Protocol):
    """What is rendered of a renewal decision (:class:`tpmid.policy.Decision`)."""

    @property
    def action(self) -> str: ...

    @property
    def when(self) -> datetime: ...

    @property
    def reason(self) -> str: ...

    @property
    def jitter_s(self) -> float: ...


def iso(t: datetime) -> str:
    """``2026-11-27T04:42:13Z``: UTC, whole seconds."""
    return as_utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: float) -> str:
    """``90`` → ``1 min 30 s``, ``86400`` → ``1 d``, ``0.6`` → ``0.6 s`` (the config's units)."""
    s = abs(seconds)
    if s < 10:
        return f"{s:.1f}".rstrip("0").rstrip(".") + " s"
    whole = round(s)
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    counts = []
    for _, size in units:
        counts.append(whole // size)
        whole %= size
    first = next(i for i, c in enumerate(counts) if c)
    # The leading unit and the one below it are precise enough for a log line
    # ("4 d 3 h", not "4 d 3 h 12 min 7 s"; "3 h", not "3 h 5 s").
    return " ".join(f"{counts[i]} {units[i][0]}" for i in (first, first + 1)
                    if i < len(units) and counts[i])


def describe_age(t: datetime, now: datetime) -> str:
    """``in 3 d 4 h`` / ``5 min ago`` relative to ``now``."""
    delta = (t - now).total_seconds()
    if abs(delta) < 1:
        return "now"
    text = format_duration(abs(delta))
    return f"in {text}" if delta > 0 else f"{text} ago"


def describe_decision(decision: Decision, identity: str) -> str:
    """One log line for the daemon.

    ``ldevid: next renewal 2026-12-01T10:00:00Z (80% of lifetime), jitter -3 min``
    """
    d = decision
    if d.action == "renew-now":
        return f"{identity}: renew now ({d.reason})"
    if d.action == "retry-at":
        return f"{identity}: next retry {iso(d.when)} ({d.reason})"
    if d.action == "wait-for-clock":
        return (f"{identity}: clock looks wrong ({d.reason}); waiting for a plausible clock "
                f"(not before {iso(d.when)}), keeping the current certificate")
    line = f"{identity}: next renewal {iso(d.when)} ({d.reason})"
    if d.jitter_s:
        line += f", jitter -{format_duration(d.jitter_s)}"
    return line
