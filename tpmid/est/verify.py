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

   Which rules apply is ``trust.profile``. ``rfc5280`` (the default) treats each
   configured or fetched CA certificate as an RFC 5280 trust anchor (§6.1.1(d):
   a name and a key): its own extensions do not disqualify it, except an explicit
   ``cA=FALSE``, which is refused. cryptography's verifier applies one CA policy
   to anchors and intermediates and has no notion of a bare name + key, so tpmid
   hands it, for each anchor, a certificate that carries exactly that: the
   anchor's name, key, validity and key identifier, marked as a CA
   (:func:`trust_anchor`); its signature is never checked (a trust anchor's is
   not, RFC 5280 §6.1), and the chain tpmid stores keeps the original anchor.
   Certificates below the anchor are checked per RFC 5280 §6.1.3/§6.1.4
   (basicConstraints cA=TRUE and pathLenConstraint, keyUsage keyCertSign when
   present, validity, name chaining, critical extensions), whatever the
   criticality of basicConstraints or the presence of keyUsage or
   authorityKeyIdentifier, which the CA/Browser Forum profile demands and RFC 5280
   path validation does not. ``webpki`` keeps the verifier's CA/Browser Forum
   policy for anchors and intermediates alike (what tpmid did before).

   A refusal names the certificate, the rule (:func:`diagnose_path` walks the
   path itself to find it) and the fix; the verifier's own wording is logged at
   DEBUG only.

   After an identity's first certificate, its anchor is the root stored with the
   current certificate, and :func:`follow_root_key_update` decides which of a later
   ``/cacerts`` it trusts: a new root only through a NewWithOld signed by that anchor
   (RFC 7030 §4.1.3 Root CA Key Update), the rest as links of a path.
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

import functools
import hashlib
import ipaddress
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509 import ExtensionType
from cryptography.x509.oid import ExtendedKeyUsageOID
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
from tpmid.config import TrustProfile
from tpmid.errors import VerificationError
from tpmid.render import name as render_name
from tpmid.render import quoted_name
from tpmid.render import serial as render_serial

log = logging.getLogger(__name__)

ExtensionT = TypeVar("ExtensionT", bound=ExtensionType)

Profile = Literal["device", "ca"]
# A TLS server certificate (the pinned bootstrap): only the path is diagnosed.
PathProfile = Literal["device", "ca", "server"]
# trust.profile: how anchors and intermediates are judged (see the module docstring).

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


# ----------------------------------------------------------------- trust anchors


def describe_cert(cert: x509.Certificate) -> str:
    """``'CN=x' (SHA-256 0123456789abcdef…)``: how messages name a certificate."""
    return (f"{quoted_name(cert.subject)} "
            f"(SHA-256 {cert.fingerprint(hashes.SHA256()).hex()[:16]}…)")


def _extension(cert: x509.Certificate, kind: type[ExtensionT]) -> x509.Extension[ExtensionT] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def check_trust_anchor(cert: x509.Certificate, where: str = "") -> None:
    """Refuse a trust anchor that says it is not a CA (``basicConstraints cA=FALSE``).

    RFC 5280 §6.1.1(d) takes a trust anchor's name and key and nothing else; an
    anchor's other extensions (a non-critical basicConstraints, no keyUsage) do not
    disqualify it. An explicit cA=FALSE is different: the certificate is an end
    entity's, configured by mistake where its CA's belongs. ``where`` names its
    source (``" in /etc/tpmid/est-root.pem"``).
    """
    bc = _extension(cert, x509.BasicConstraints)
    if bc is not None and not bc.value.ca:
        raise VerificationError(
            f"the trust anchor {describe_cert(cert)}{where} is not a CA certificate: its "
            "basicConstraints says cA=FALSE (an end entity's certificate; RFC 5280 §6.1.1(d) "
            "trusts a CA's name and key)",
            hint="configure the certificate of the CA that issues the certificates (its root or "
            "issuing CA), not a device or server certificate")


_SIGNERS: dict[str, CertificateIssuerPrivateKeyTypes] = {}
_SIGNERS_LOCK = threading.Lock()


def _throwaway_signer(key: CertificatePublicKeyTypes) -> CertificateIssuerPrivateKeyTypes | None:
    """A process-local key of the anchor key's family (OpenSSL wants the signature
    algorithm of a self-issued anchor to match its key type)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        family = "ec"
    elif isinstance(key, rsa.RSAPublicKey):
        family = "rsa"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        family = "ed25519"
    else:
        return None
    with _SIGNERS_LOCK:
        if family not in _SIGNERS:
            _SIGNERS[family] = (ec.generate_private_key(ec.SECP256R1()) if family == "ec"
                                else rsa.generate_private_key(65537, 2048) if family == "rsa"
                                else ed25519.Ed25519PrivateKey.generate())
        return _SIGNERS[family]


@functools.lru_cache(maxsize=128)
def _trust_anchor_der(der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(der)
    key = cert.public_key()
    signer = _throwaway_signer(key)
    if signer is None:
        return der  # a key type tpmid cannot restate: the anchor is used as it is
    serial = cert.serial_number if 0 < cert.serial_number < 1 << 159 else 1
    b = (x509.CertificateBuilder()
         .subject_name(cert.subject).issuer_name(cert.subject)
         .public_key(key).serial_number(serial)
         .not_valid_before(cert.not_valid_before_utc)
         .not_valid_after(cert.not_valid_after_utc)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=True, crl_sign=True,
                                      encipher_only=False, decipher_only=False), critical=True))
    ski = _extension(cert, x509.SubjectKeyIdentifier)
    if ski is not None:
        # Chain builders match the issued certificates' authorityKeyIdentifier against it.
        b = b.add_extension(ski.value, critical=False)
    digest = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(signer, digest).public_bytes(serialization.Encoding.DER)


def trust_anchor(cert: x509.Certificate, where: str = "") -> x509.Certificate:
    """``cert`` as an RFC 5280 trust anchor: its name and key, marked as a CA.

    Path validators (``cryptography``'s and OpenSSL's) take trust anchors only as
    certificates and judge their extensions like any CA's. The certificate returned
    carries the anchor's subject (as subject and issuer), public key, validity and
    subjectKeyIdentifier, with basicConstraints cA=TRUE and keyUsage keyCertSign;
    it is signed by a throwaway key, which no validator checks (the signature of a
    trust anchor is not part of RFC 5280 §6.1; OpenSSL does not check it either).
    Refuses an anchor with an explicit cA=FALSE (:func:`check_trust_anchor`).
    """
    check_trust_anchor(cert, where)
    return x509.load_der_x509_certificate(
        _trust_anchor_der(cert.public_bytes(serialization.Encoding.DER)))


def trust_anchors(certs: Sequence[x509.Certificate], trust: TrustProfile,
                  where: str = "") -> list[x509.Certificate]:
    """The anchors a validator gets under ``trust`` (rfc5280: :func:`trust_anchor` of each)."""
    if trust == "webpki":
        return list(certs)
    return [trust_anchor(c, where) for c in certs]


# ----------------------------------------------------------------- extension policies


def _require_ca(_policy: Policy, _cert: x509.Certificate, bc: x509.BasicConstraints) -> None:
    if not bc.ca:
        raise ValueError("the CA profile needs basicConstraints cA=TRUE")


def _require_cert_sign(_policy: Policy, _cert: x509.Certificate, ku: x509.KeyUsage) -> None:
    if not ku.key_cert_sign:
        raise ValueError("the CA profile needs keyUsage keyCertSign")


def _cert_sign_if_present(_policy: Policy, _cert: x509.Certificate,
                          ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError("keyUsage without keyCertSign")


def _not_ca_if_present(_policy: Policy, _cert: x509.Certificate,
                       bc: x509.BasicConstraints | None) -> None:
    if bc is not None and bc.ca:
        raise ValueError("a device certificate must not be a CA")


def _ca_policy(trust: TrustProfile) -> ExtensionPolicy:
    if trust == "webpki":
        return ExtensionPolicy.webpki_defaults_ca()
    # RFC 5280 §6.1.4 (k), (n): cA=TRUE, keyCertSign when keyUsage is present; whatever
    # their criticality. Unknown critical extensions are still refused (§6.1.4 (o)).
    return (ExtensionPolicy.permit_all()
            .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _require_ca)
            .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _cert_sign_if_present))


def _ee_policy(profile: Profile, trust: TrustProfile = "webpki") -> ExtensionPolicy:
    if trust == "webpki":
        # Start from the verifier's end-entity defaults (which also reject unknown
        # critical extensions) and relax only what EST device profiles need.
        pol = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )
    else:
        # RFC 5280: every extension the CA chose, unknown critical ones refused; the
        # EKU rule tpmid needs is checked by tpmid (check_device_eku).
        pol = ExtensionPolicy.permit_all()
        if profile == "device":
            pol = pol.may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC,
                                     _not_ca_if_present)
    if profile == "ca":
        pol = (
            pol.require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _require_ca)
            .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _require_cert_sign)
            # An Edge CA issues server and client certificates; its own EKU (rarely
            # present) is not about client authentication.
            .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
        )
    return pol


def check_device_eku(cert: x509.Certificate) -> str | None:
    """Why a device certificate's EKU forbids TLS client authentication, or None.

    RFC 5280 §4.2.1.12: no extendedKeyUsage means no restriction; anyExtendedKeyUsage
    allows every purpose.
    """
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is None:
        return None
    if ExtendedKeyUsageOID.CLIENT_AUTH in eku.value \
            or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku.value:
        return None
    return ("its extendedKeyUsage does not include id-kp-clientAuth (RFC 5280 §4.2.1.12), so it "
            "cannot authenticate the device")


# ----------------------------------------------------------------- path diagnosis

# Extensions RFC 5280 path validation (and tpmid) processes; any other critical one
# makes a certificate unusable (§6.1.4 (o)).
_KNOWN_EXTENSIONS = frozenset({
    "2.5.29.14", "2.5.29.15", "2.5.29.17", "2.5.29.18", "2.5.29.19", "2.5.29.30", "2.5.29.31",
    "2.5.29.32", "2.5.29.33", "2.5.29.35", "2.5.29.36", "2.5.29.37", "2.5.29.54",
    "1.3.6.1.5.5.7.1.1",
})
_NO_PATH_HINT = ("check that the identity enrolls at the right EST label and that "
                 "est.issuer_anchors (if set) names the CA of that label")
_BROKEN_CA_HINT = ("the CA operator must reissue {name} as a CA certificate (basicConstraints "
                   "cA=TRUE; keyUsage, if present, with keyCertSign); until then the EST server's "
                   "chain cannot be trusted")


@dataclass(frozen=True)
class PathProblem:
    """Why a certification path does not validate: the certificate, the rule, the fix."""

    message: str
    hint: str


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError (name), TypeError (key type)
        return False
    return True


def _paths(cert: x509.Certificate, anchors: Sequence[x509.Certificate],
           pool: Sequence[x509.Certificate]) -> tuple[list[list[x509.Certificate]],
                                                      list[x509.Certificate]]:
    """Complete paths ``[cert, ..., anchor]`` and the tops of incomplete ones."""
    anchor_ders = {a.public_bytes(serialization.Encoding.DER) for a in anchors}
    complete: list[list[x509.Certificate]] = []
    dead_ends: list[x509.Certificate] = []
    candidates = list(pool) + list(anchors)

    def walk(path: list[x509.Certificate]) -> None:
        top = path[-1]
        if len(complete) >= 8 or len(path) > MAX_CHAIN_DEPTH + 1:
            return
        nxt = [c for c in candidates if c.subject == top.issuer and c not in path
               and _signed_by(top, c)]
        if not nxt:
            dead_ends.append(top)
        for c in nxt:
            if c.public_bytes(serialization.Encoding.DER) in anchor_ders:
                complete.append([*path, c])
            else:
                walk([*path, c])

    walk([cert])
    return complete, dead_ends


def _check_ca(c: x509.Certificate, below: int, now: datetime, trust: TrustProfile,
              anchor: bool) -> PathProblem | None:
    """RFC 5280 §6.1.3-§6.1.4 for a CA certificate ``below`` CAs above the end entity."""
    name = describe_cert(c)
    role = "trust anchor" if anchor else "intermediate CA certificate"
    hint = _BROKEN_CA_HINT.format(name=name)
    bc = _extension(c, x509.BasicConstraints)
    ku = _extension(c, x509.KeyUsage)
    if anchor and not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
        return PathProblem(
            f"the {role} {name} is not valid now (notBefore {c.not_valid_before_utc.isoformat()}, "
            f"notAfter {c.not_valid_after_utc.isoformat()})",
            "check the device clock (NTP); if it is right, the CA's certificate has expired: "
            "configure its successor (after a CA rollover, /cacerts serves it)")
    if not anchor:
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            return PathProblem(
                f"the {role} {name} is not valid now (notBefore "
                f"{c.not_valid_before_utc.isoformat()}, notAfter "
                f"{c.not_valid_after_utc.isoformat()}; RFC 5280 §6.1.3 (a)(2))",
                "check the device clock (NTP); if it is right, the CA operator must renew "
                "that CA certificate")
        if bc is None or not bc.value.ca:
            what = ("it has no basicConstraints" if bc is None
                    else "its basicConstraints says cA=FALSE")
            return PathProblem(
                f"the {role} {name} is not a CA certificate: {what} (RFC 5280 §6.1.4 (k))", hint)
        if ku is not None and not ku.value.key_cert_sign:
            return PathProblem(
                f"the {role} {name} may not sign certificates: its keyUsage lacks "
                "keyCertSign (RFC 5280 §6.1.4 (n))", hint)
        if bc.value.path_length is not None and below - 1 > bc.value.path_length:
            return PathProblem(
                f"the {role} {name} allows {bc.value.path_length} CA certificate(s) below it "
                f"(pathLenConstraint), the chain has {below - 1} (RFC 5280 §6.1.4 (m))", hint)
    if trust == "webpki":
        relax = ("; tpmid's default trust.profile rfc5280 accepts it, trust.profile: webpki "
                 "(the CA/Browser Forum profile) does not")
        if bc is None or not bc.critical:
            return PathProblem(
                f"the {role} {name} does not mark basicConstraints critical{relax}",
                "set trust.profile: rfc5280, or have the CA reissue the certificate")
        if ku is None:
            return PathProblem(f"the {role} {name} has no keyUsage{relax}",
                               "set trust.profile: rfc5280, or have the CA reissue the "
                               "certificate")
        if ku.value is not None and not ku.value.key_cert_sign:
            return PathProblem(f"the {role} {name} may not sign certificates: its keyUsage "
                               "lacks keyCertSign", hint)
    return None


def ca_problem(cert: x509.Certificate) -> str | None:
    """Why ``cert`` cannot be a CA certificate under RFC 5280 §6.1.4 (k), (n), or None."""
    bc = _extension(cert, x509.BasicConstraints)
    if bc is None:
        return "it is not a CA certificate: it has no basicConstraints (RFC 5280 §6.1.4 (k))"
    if not bc.value.ca:
        return ("it is not a CA certificate: its basicConstraints says cA=FALSE "
                "(RFC 5280 §6.1.4 (k))")
    ku = _extension(cert, x509.KeyUsage)
    if ku is not None and not ku.value.key_cert_sign:
        return "it may not sign certificates: its keyUsage lacks keyCertSign (RFC 5280 §6.1.4 (n))"
    return None


def _check_critical(c: x509.Certificate, what: str) -> PathProblem | None:
    for ext in c.extensions:
        oid = ext.oid.dotted_string
        if ext.critical and oid not in _KNOWN_EXTENSIONS:
            return PathProblem(
                f"the {what} {describe_cert(c)} carries the critical extension {oid}, which "
                "tpmid does not process (RFC 5280 §6.1.4 (o): such a certificate must be "
                "refused)", "the CA operator must reissue it without that extension, or "
                "with the extension not marked critical")
    return None


def _check_leaf(cert: x509.Certificate, profile: PathProfile, trust: TrustProfile
                ) -> PathProblem | None:
    if profile == "server":
        return None
    bc = _extension(cert, x509.BasicConstraints)
    ku = _extension(cert, x509.KeyUsage)
    if profile == "device":
        if bc is not None and bc.value.ca:
            return PathProblem(
                "it is a CA certificate (basicConstraints cA=TRUE) where a device certificate "
                "was asked for", "check that the identity enrolls at the right EST label "
                "(an Edge CA identity needs profile: ca)")
        reason = check_device_eku(cert)
        if reason is not None:
            return PathProblem(reason, "ask the CA operator for a certificate profile with "
                               "id-kp-clientAuth, or without extendedKeyUsage")
    else:
        if bc is None or not bc.value.ca:
            return PathProblem("the CA profile needs basicConstraints cA=TRUE, and it is not a "
                               "CA certificate", "check that the identity enrolls at the Edge "
                               "CA label of the EST server")
        if ku is None or not ku.value.key_cert_sign:
            return PathProblem("the CA profile needs keyUsage keyCertSign, and "
                               + ("it has no keyUsage" if ku is None else "its keyUsage lacks it"),
                               "ask the CA operator for an Edge CA profile with keyUsage "
                               "keyCertSign")
    if trust == "webpki" and _extension(cert, x509.AuthorityKeyIdentifier) is None:
        return PathProblem("it has no authorityKeyIdentifier; tpmid's default trust.profile "
                           "rfc5280 accepts that, trust.profile: webpki does not",
                           "set trust.profile: rfc5280, or have the CA add the extension")
    return None


def diagnose_path(cert: x509.Certificate, *, anchors: Sequence[x509.Certificate],
                  intermediates: Sequence[x509.Certificate] = (),
                  profile: PathProfile = "device", trust: TrustProfile = "rfc5280",
                  now: datetime) -> PathProblem | None:
    """The first RFC 5280 rule a path from ``cert`` to ``anchors`` breaks, or None.

    Builds the paths itself (issuer name and signature) and checks, for each
    certificate on them, what RFC 5280 §6.1 checks (and, under ``webpki``, what the
    CA/Browser Forum profile adds), so that a refusal can name the certificate, the
    rule and the fix. None means no rule tpmid knows is broken.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    leaf_problem = _check_critical(cert, "certificate") or _check_leaf(cert, profile, trust)
    if leaf_problem is not None:
        return leaf_problem
    complete, dead_ends = _paths(cert, anchors, intermediates)
    if not complete:
        top = dead_ends[0] if dead_ends else cert
        if top is cert:
            return PathProblem("it was not issued by any of them (no chain to those CA "
                               "certificates)", _NO_PATH_HINT)
        return PathProblem(
            f"its chain ends at {describe_cert(top)}, issued by "
            f"{quoted_name(top.issuer)}, which is neither one of those CA certificates "
            "nor in the answer", _NO_PATH_HINT)
    first: PathProblem | None = None
    for path in complete:
        problem = None
        for i, c in enumerate(path[1:], start=1):
            anchor = i == len(path) - 1
            problem = (_check_critical(c, "trust anchor" if anchor else "CA certificate")
                       if not anchor else None) or _check_ca(c, i, now, trust, anchor)
            if problem is not None:
                break
        if problem is None:
            return None  # a path tpmid finds sound: the verifier objected to something else
        first = first or problem
    return first


def _explain(e: Exception) -> str:
    # What remains when tpmid's own diagnosis found nothing: the verifier's reason in
    # tpmid's words where tpmid knows it; its own wording goes to the DEBUG log only.
    text = str(e)
    if "candidates exhausted" in text and "interior errors" in text:
        return "it was not issued by any of them (no chain to those CA certificates)"
    if "signature" in text.lower() and "algorithm" in text.lower():
        return "a certificate on the path is signed with an algorithm tpmid does not accept " \
               "(RSA keys below 2048 bits, SHA-1 and other weak algorithms are refused)"
    if "validity" in text.lower() or "expired" in text.lower():
        return "a certificate on the path is not valid now"
    return "the certification path does not validate (RFC 5280 §6.1)"


def verify_chain(
    cert: x509.Certificate,
    *,
    issuers: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    profile: Profile = "device",
    now: datetime,
    trust: TrustProfile = "rfc5280",
) -> tuple[x509.Certificate, ...]:
    """Validate ``cert`` up to one of ``issuers``; return the chain above ``cert``.

    ``issuers`` are the trust anchors of this label (every certificate in them is
    an anchor, so a chain may end at an issuing intermediate delivered by
    ``/cacerts``); ``intermediates`` are untrusted helpers (extra certificates of
    the enrollment response). ``trust`` is ``trust.profile`` (see the module
    docstring). The returned chain ends with the original anchor certificate.
    Raises VerificationError naming the certificate and the rule that failed.
    """
    if not issuers:
        raise VerificationError(
            "no issuing CA certificates to verify the issued certificate against",
            hint="configure est.issuer_anchors or let tpmid fetch /cacerts from the server",
        )
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    names = ", ".join(quoted_name(c.subject) for c in issuers)
    where = (f"the issued certificate {quoted_name(cert.subject)} does not validate "
             f"against the issuing CA certificates ({names}) for the {profile} profile")
    try:
        anchors = trust_anchors(issuers, trust)
    except VerificationError as e:
        e.message = f"{where}: {e.message}"
        raise
    # Anchors with the same name and key (a root and its NewWithOld) are one trust anchor;
    # the chain keeps the root.
    pairs = sorted(zip(anchors, issuers, strict=True), key=lambda p: p[1].issuer == p[1].subject)
    originals = {(a.subject.public_bytes(), spki_der(a.public_key())): o for a, o in pairs}
    builder = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=_ca_policy(trust), ee_policy=_ee_policy(profile, trust))
    )
    try:
        verified = builder.build_client_verifier().verify(cert, list(intermediates))
    except _X509VerificationError as e:
        log.debug("%s: the path validator says: %s", where, e)
        problem = diagnose_path(cert, anchors=issuers, intermediates=intermediates,
                                profile=profile, trust=trust, now=now)
        if problem is None:
            problem = PathProblem(_explain(e), _NO_PATH_HINT)
        raise VerificationError(f"{where}: {problem.message}", hint=problem.hint) from e
    if profile == "device":
        # Under rfc5280 the extension policy leaves EKU to tpmid.
        reason = check_device_eku(cert)
        if reason is not None:
            raise VerificationError(f"{where}: {reason}",
                                    hint="ask the CA operator for a certificate profile with "
                                    "id-kp-clientAuth, or without extendedKeyUsage")
    return tuple(originals.get((c.subject.public_bytes(), spki_der(c.public_key())), c)
                 for c in verified.chain[1:])


@dataclass(frozen=True)
class UnvouchedRoot:
    """A root ``/cacerts`` offered that the identity's anchor does not vouch for, and why."""

    root: x509.Certificate
    reason: str


@dataclass(frozen=True)
class CacertsTrust:
    """What an identity may trust among the CA certificates ``/cacerts`` offered.

    ``anchors`` are its trust anchors: the current one first, then the new roots
    (``new_roots``) its NewWithOld vouched for; ``intermediates`` the other CA
    certificates offered, usable only as links of a path that ends at an anchor;
    ``unvouched`` the roots offered that nothing the identity trusts vouches for.
    """

    anchors: tuple[x509.Certificate, ...]
    new_roots: tuple[x509.Certificate, ...] = ()
    intermediates: tuple[x509.Certificate, ...] = ()
    unvouched: tuple[UnvouchedRoot, ...] = ()


def _same_key(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.subject == b.subject and spki_der(a.public_key()) == spki_der(b.public_key())


def _self_signed(c: x509.Certificate) -> bool:
    return c.issuer == c.subject and _signed_by(c, c)


def _link_problem(link: x509.Certificate, anchor: x509.Certificate, now: datetime) -> str | None:
    """Why ``link`` is not a valid NewWithOld from ``anchor`` (None: it is)."""
    if link.issuer != anchor.subject:
        return f"it is issued by {quoted_name(link.issuer)}, not by the anchor"
    if not _signed_by(link, anchor):
        return "its signature does not verify with the anchor's key"
    if not link.not_valid_before_utc <= now <= link.not_valid_after_utc:
        return (f"it is valid only from {link.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z to "
                f"{link.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z")
    return ca_problem(link)


def follow_root_key_update(offered: Sequence[x509.Certificate], anchor: x509.Certificate,
                           *, now: datetime) -> CacertsTrust:
    """Which of ``offered`` (``/cacerts``) an identity whose trust anchor is ``anchor`` trusts.

    RFC 7030 §4.1.3: after a Root CA Key Update the server offers the new root
    (NewWithNew) with OldWithOld, OldWithNew and NewWithOld, in any order. A client
    accepts the new root only through a certificate it validates with what it already
    trusts: NewWithOld, the new name and key signed by the anchor's key, a CA
    certificate valid now. A self-signed root with that name and key becomes a trust
    anchor next to the current one. OldWithNew is not needed for that (it serves
    clients that already trust the new root). A root with no such link — a CA replaced
    outright, or a NewWithOld with a bad signature, expired, or from another CA — is
    ``unvouched``, whatever channel it arrived on. Roots that issued the anchor itself
    (the anchor is an intermediate) are neither.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    roots = [c for c in offered if _self_signed(c) and not _same_key(c, anchor)]
    others = [c for c in offered if not _self_signed(c)]
    links = [c for c in others if not _same_key(c, anchor)
             and _link_problem(c, anchor, now) is None]
    new_roots: list[x509.Certificate] = []
    unvouched: list[UnvouchedRoot] = []
    for root in roots:
        if any(_same_key(root, link) for link in links) and ca_problem(root) is None:
            new_roots.append(root)
            continue
        if _signed_by(anchor, root):
            continue  # above the anchor: not needed, not a stranger
        candidates = [c for c in others if _same_key(root, c)]
        if candidates:
            problem = _link_problem(candidates[0], anchor, now) or ca_problem(root)
            reason = (f"the NewWithOld certificate offered for it ({describe_cert(candidates[0])}) "
                      f"does not validate from the anchor: {problem}")
        else:
            reason = "/cacerts holds no NewWithOld certificate for it signed by the anchor"
        unvouched.append(UnvouchedRoot(root, reason))
    anchors = (anchor, *new_roots)
    # Links with an anchor's name and key (NewWithOld, OldWithNew) add no path and would
    # let a path end at the old anchor instead of the new root; not offered as links.
    intermediates = tuple(c for c in others if not any(_same_key(c, a) for a in anchors))
    return CacertsTrust(anchors=anchors, new_roots=tuple(new_roots),
                        intermediates=intermediates, unvouched=tuple(unvouched))


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
    trust: TrustProfile = "rfc5280",
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
                         now=now, trust=trust)
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
    trust: TrustProfile = "rfc5280",
) -> None:
    """Check that a TLS server certificate chains to ``root`` and names ``host``.

    The second half of the pinned ``/cacerts`` bootstrap: the connection was
    made without verification, so the server's certificate must chain to the
    pinned root (with the returned CA certificates as intermediates) and pass
    the RFC 6125 host or IP check, or the answer is refused. ``trust`` is
    ``trust.profile``: under rfc5280 the pinned root is a trust anchor (name and
    key) and the CAs below it are judged by RFC 5280.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    subject: Subject
    try:
        subject = IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        subject = DNSName(host)
    builder = (PolicyBuilder().store(Store(trust_anchors([root], trust))).time(now)
               .max_chain_depth(MAX_CHAIN_DEPTH))
    if trust == "rfc5280":
        builder = builder.extension_policies(
            ca_policy=_ca_policy(trust), ee_policy=ExtensionPolicy.webpki_defaults_ee())
    try:
        builder.build_server_verifier(subject).verify(leaf, list(intermediates))
    except _X509VerificationError as e:
        log.debug("the path validator says: %s", e)
        problem = diagnose_path(leaf, anchors=[root], intermediates=intermediates,
                                profile="server", trust=trust, now=now)
        reason = problem.message if problem is not None else (
            "it does not name that host (RFC 6125)" if "subject" in str(e).lower()
            or "name" in str(e).lower() else _explain(e))
        raise VerificationError(
            f"the EST server's TLS certificate {quoted_name(leaf.subject)} does not "
            f"validate for {host!r} against the pinned root "
            f"{quoted_name(root.subject)}: {reason}",
            hint="the server's TLS certificate is not from the pinned CA; trust the CA that "
            "issued it instead (--trusted-certs, trust.est_anchors or est.trust_anchors)",
        ) from e
