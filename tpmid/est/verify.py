"""Verification of EST enrollment results before anyone uses them.

Pure functions over ``cryptography`` objects: no I/O, no clock of their own (the
caller passes ``now``). :func:`verify_enrollment` runs every check an issued
certificate must pass before tpmid stores it:

1. **Key**: the certificate's SubjectPublicKeyInfo is byte-for-byte the one of
   the key the CSR was made with (the TPM key). A server that returns a
   certificate for another key (a stale one, another device's) is refused.
2. **Chain**: the certificate chains to the issuing CA certificates of the label
   (from ``/cacerts`` over the authenticated channel, RFC 7030 §4.1.3, or the
   identity's configured ``issuer_anchors``) under the RFC 5280 rules implemented
   by ``cryptography.x509.verification`` (signatures, validity of every
   certificate at ``now``, basicConstraints/pathLen, keyUsage of CAs, name
   chaining, unknown critical extensions, weak algorithms).
3. **Profile**: a ``device`` certificate (IDevID, LDevID) is an end entity whose
   extendedKeyUsage, if present, includes id-kp-clientAuth (RFC 5280 §4.2.1.12:
   no EKU means no restriction); a ``ca`` certificate (the Edge CA) must assert
   basicConstraints cA and keyUsage keyCertSign. cryptography's verifier refuses
   a CA:TRUE end entity under its default (Web PKI) policy, so the CA profile
   swaps the end-entity extension policy for one that *requires* those two
   extensions; all other checks (signatures, validity, chain, pathLen of the
   issuing CAs) are the verifier's own.
4. **Subject**: the subject is the one requested. GlobalSign's "re-enrollment
   forcing" rewrites the subject of a request authenticated with an earlier
   certificate to that certificate's subject; tpmid reports both names and
   refuses, unless the identity sets ``accept_rewritten_subject``.

Subject alternative names are not required: device certificates from real EST
services often carry only a CN (the Web PKI rule "SAN required" is relaxed).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.verification import (
    Criticality,
    DNSName,
    ExtensionPolicy,
    IPAddress,
    Policy,
    PolicyBuilder,
    Store,
    Subject,
)
from cryptography.x509.verification import VerificationError as _X509VerificationError

from tpmid.certfiles import spki_der
from tpmid.errors import VerificationError
from tpmid.render import name as render_name
from tpmid.render import quoted_name
from tpmid.render import serial as render_serial

log = logging.getLogger(__name__)

Profile = Literal["device", "ca"]

# Chains longer than this are refused (root + 3 intermediates + leaf is plenty
# for any EST deployment; the default of the verifier is 8).
MAX_CHAIN_DEPTH = 5


@dataclass(frozen=True)
class VerifiedEnrollment:
    """An issued certificate that passed every check.

    ``chain`` is the validated path from the issuer of ``certificate`` up to and
    including the trust anchor it chained to (what tpmid stores as the chain).
    ``requested_subject`` differs from ``certificate.subject`` only when
    ``subject_rewritten`` is true (and the caller accepted that).
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    requested_subject: x509.Name
    subject_rewritten: bool


def _short_fp(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def check_public_key(cert: x509.Certificate, expected_spki_der: bytes) -> None:
    """Raise VerificationError unless ``cert`` certifies exactly the key ``expected_spki_der``."""
    got = spki_der(cert.public_key())
    if got != expected_spki_der:
        raise VerificationError(
            "the EST server issued a certificate for another key: certificate key "
            f"SHA-256 {_short_fp(got)}…, our key SHA-256 {_short_fp(expected_spki_der)}… "
            f"(certificate {quoted_name(cert.subject)}, serial {render_serial(cert.serial_number)})",
            hint="the server may have answered with a stale certificate; do not use it, "
            "and report the serial number to the CA operator",
        )


def check_subject(cert: x509.Certificate, requested: x509.Name, *, accept_rewritten: bool) -> bool:
    """Compare the issued subject with the requested one; return True if rewritten.

    Names compare attribute by attribute, in order (RFC 5280 §7.1: string types
    such as PrintableString vs UTF8String do not matter). A rewritten subject
    raises VerificationError naming both, unless ``accept_rewritten``.
    """
    if cert.subject == requested:
        return False
    issued_s, requested_s = render_name(cert.subject), render_name(requested)
    if not accept_rewritten:
        raise VerificationError(
            f"the EST server rewrote the subject: requested '{requested_s}', "
            f"issued '{issued_s}'",
            hint="some services (GlobalSign 're-enrollment forcing') replace the subject "
            "when the request is authenticated with an earlier certificate; ask the "
            "operator to turn that off, or set est.accept_rewritten_subject: true",
        )
    log.warning("EST server rewrote the subject: requested %r, issued %r (accepted by config)",
                requested_s, issued_s)
    return True


def check_validity(cert: x509.Certificate, now: datetime) -> None:
    """Raise VerificationError unless notBefore <= now <= notAfter (RFC 5280 §4.1.2.5)."""
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < nb:
        raise VerificationError(
            f"the issued certificate is not valid yet: notBefore {nb.isoformat()}, "
            f"now {now.isoformat()}",
            hint="check the device clock (NTP) and the CA's clock",
        )
    if now > na:
        raise VerificationError(
            f"the issued certificate has already expired: notAfter {na.isoformat()}, "
            f"now {now.isoformat()}",
            hint="check the device clock (NTP) and the CA's certificate profile",
        )


# ----------------------------------------------------------------- extension policies


def _require_ca(_policy: Policy, _cert: x509.Certificate, bc: x509.BasicConstraints) -> None:
    if not bc.ca:
        raise ValueError("the CA profile needs basicConstraints cA=TRUE")


def _require_cert_sign(_policy: Policy, _cert: x509.Certificate, ku: x509.KeyUsage) -> None:
    if not ku.key_cert_sign:
        raise ValueError("the CA profile needs keyUsage keyCertSign")


def _ee_policy(profile: Profile) -> ExtensionPolicy:
    # Start from the verifier's end-entity defaults (which also reject unknown
    # critical extensions) and relax only what EST device profiles need.
    pol = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    if profile == "ca":
        pol = (
            pol.require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _require_ca)
            .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _require_cert_sign)
            # An Edge CA issues server and client certificates; its own EKU (rarely
            # present) is not about client authentication.
            .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
        )
    return pol


_EXTENSION_NAMES = {
    "2.5.29.15": "keyUsage",
    "2.5.29.17": "subjectAltName",
    "2.5.29.19": "basicConstraints",
    "2.5.29.35": "authorityKeyIdentifier",
    "2.5.29.37": "extendedKeyUsage",
}


def _explain(e: Exception) -> str:
    # cryptography's messages look like "validation failed: <reason> (encountered
    # processing <Certificate(...)>)"; keep the reason, drop the repr, name OIDs.
    text = str(e)
    text = text.split(" (encountered processing", 1)[0]
    text = text.removeprefix("validation failed: ")
    text = text.replace("Python extension validator failed: ValueError: ", "")
    for oid, ext in _EXTENSION_NAMES.items():
        text = text.replace(f"invalid extension: {oid}:", f"extension {ext} ({oid}):")
    if "candidates exhausted" in text and "interior errors" in text:
        # No certificate in the store issued it: the verifier found no path at all.
        text = "it was not issued by any of them (no chain to those CA certificates)"
    return text


def verify_chain(
    cert: x509.Certificate,
    *,
    issuers: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    profile: Profile = "device",
    now: datetime,
) -> tuple[x509.Certificate, ...]:
    """Validate ``cert`` up to one of ``issuers``; return the chain above ``cert``.

    ``issuers`` are the trust anchors of this label (every certificate in them is
    an anchor, so a chain may end at an issuing intermediate delivered by
    ``/cacerts``); ``intermediates`` are untrusted helpers (extra certificates of
    the enrollment response). Raises VerificationError with the verifier's reason.
    """
    if not issuers:
        raise VerificationError(
            "no issuing CA certificates to verify the issued certificate against",
            hint="configure est.issuer_anchors or let tpmid fetch /cacerts from the server",
        )
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    builder = (
        PolicyBuilder()
        .store(Store(list(issuers)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                            ee_policy=_ee_policy(profile))
    )
    try:
        verified = builder.build_client_verifier().verify(cert, list(intermediates))
    except _X509VerificationError as e:
        names = ", ".join(quoted_name(c.subject) for c in issuers)
        reason = _explain(e)
        if "required EKU not found" in reason:
            reason = "its extendedKeyUsage does not include id-kp-clientAuth"
        raise VerificationError(
            f"the issued certificate {quoted_name(cert.subject)} does not validate "
            f"against the issuing CA certificates ({names}) for the {profile} profile: {reason}",
            hint="check that the identity enrolls at the right EST label and that "
            "est.issuer_anchors (if set) names the CA of that label",
        ) from e
    return tuple(verified.chain[1:])


def verify_enrollment(
    cert: x509.Certificate,
    *,
    key_spki_der: bytes,
    requested_subject: x509.Name,
    issuers: Sequence[x509.Certificate],
    extra_certs: Sequence[x509.Certificate] = (),
    profile: Profile = "device",
    now: datetime,
    accept_rewritten_subject: bool = False,
) -> VerifiedEnrollment:
    """Run every check on an issued certificate (see the module docstring).

    Order matters for the message an operator sees: the key first (a certificate
    for another key is the most dangerous answer), then validity, chain, profile
    and subject.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    check_public_key(cert, key_spki_der)
    check_validity(cert, now)
    chain = verify_chain(cert, issuers=issuers, intermediates=extra_certs, profile=profile,
                         now=now)
    rewritten = check_subject(cert, requested_subject, accept_rewritten=accept_rewritten_subject)
    return VerifiedEnrollment(certificate=cert, chain=chain, requested_subject=requested_subject,
                              subject_rewritten=rewritten)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate: lower-case hex without separators (tpmid.render)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def normalize_pin(pin: str) -> str:
    """A SHA-256 pin as 64 lower-case hex digits (colons and spaces removed)."""
    return pin.replace(":", "").replace(" ", "").lower()


def check_pinned_root(certs: Sequence[x509.Certificate], pin: str) -> x509.Certificate:
    """Return the certificate among ``certs`` whose SHA-256 fingerprint equals ``pin``.

    Used for the ``/cacerts`` bootstrap without a trust anchor (RFC 7030 §4.1.1):
    the pinned certificate must be self-signed (a root), otherwise the pin does
    not anchor anything. Raises VerificationError naming what the server offered.
    """
    want = normalize_pin(pin)
    if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
        raise VerificationError(f"{pin!r} is not a SHA-256 fingerprint (64 hex digits)")
    for c in certs:
        if c.fingerprint(hashes.SHA256()).hex() == want:
            if c.issuer != c.subject:
                raise VerificationError(
                    f"the pinned certificate {quoted_name(c.subject)} is not a root "
                    f"(issued by {quoted_name(c.issuer)})",
                    hint="pin the SHA-256 fingerprint of the self-signed root CA certificate",
                )
            try:
                c.verify_directly_issued_by(c)
            except Exception as e:  # InvalidSignature, ValueError, TypeError
                raise VerificationError(
                    f"the pinned root {quoted_name(c.subject)} has a bad self-signature"
                ) from e
            return c
    offered = "; ".join(
        f"{quoted_name(c.subject)} {c.fingerprint(hashes.SHA256()).hex()}" for c in certs
    ) or "no certificates"
    raise VerificationError(
        f"no certificate from /cacerts matches the pinned SHA-256 fingerprint {want}; "
        f"the server offered: {offered}",
        hint="check the pin against the CA operator's published fingerprint; "
        "do not trust this server until they match",
    )


def verify_server_certificate(
    leaf: x509.Certificate,
    *,
    root: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    host: str,
    now: datetime,
) -> None:
    """Check that a TLS server certificate chains to ``root`` and names ``host``.

    The second half of the pinned ``/cacerts`` bootstrap: the connection was
    made without verification, so the server's certificate must chain to the
    pinned root (with the returned CA certificates as intermediates) and pass
    the RFC 6125 host or IP check, or the answer is refused.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    subject: Subject
    try:
        subject = IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        subject = DNSName(host)
    builder = PolicyBuilder().store(Store([root])).time(now).max_chain_depth(MAX_CHAIN_DEPTH)
    try:
        builder.build_server_verifier(subject).verify(leaf, list(intermediates))
    except _X509VerificationError as e:
        raise VerificationError(
            f"the EST server's TLS certificate {quoted_name(leaf.subject)} does not "
            f"validate for {host!r} against the pinned root "
            f"{quoted_name(root.subject)}: {_explain(e)}",
            hint="the server's TLS certificate is not from the pinned CA; trust the CA that "
            "issued it instead (--trusted-certs, trust.est_anchors or est.trust_anchors)",
        ) from e
