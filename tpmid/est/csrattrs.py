"""What an EST server's CSR attributes ask for, and what tpmid does about it (RFC 7030 §4.5).

Pure model: CSR attributes in (:class:`~tpmid.est.messages.CsrAttr`), a
:class:`CsrPlan` out; no I/O. RFC 7030 §4.5.2 lets a server list, in
``/csrattrs``, what it wants in the CSR: bare OIDs (challengePassword, a
signature algorithm, a subject attribute, an extension) and attributes with
values (``id-ecPublicKey`` with a curve, ``extensionRequest`` with extension
OIDs, ``rsaEncryption`` with a key size, as RFC 9908 writes it). The RFC's own
example asks for challengePassword, an ECC P-384 key, a macAddress extension and
ecdsa-with-SHA384.

:func:`plan_csr` decides, for one identity, what the CSR will be:

* **key algorithm / curve**: a key-file identity creates its new key with the
  requested algorithm (ECC P-256, P-384, RSA-2048); a persistent or
  endorsement-derived IDevID, or a key kept across a renewal (``rotate_key:
  false``), never changes algorithm because a server asked;
* **signature hash**: a TPM identity key signs with one hash, the natural one
  of its algorithm (SHA-256 for P-256 and RSA-2048, SHA-384 for P-384); a
  request for that hash is honoured, any other is not;
* **challengePassword**: proof-of-possession linking (RFC 7030 §3.5): the CSR
  carries the connection's tls-unique (and the connection is capped at TLS 1.2);
* **subject attributes and extensions** where tpmid knows the value: the CN,
  O, OU and serialNumber of ``subject``, and subjectAltName from ``san``.

Whatever cannot be honoured is listed in :attr:`CsrPlan.unhonoured` with the
reason; the enrollment warns about it (``est.csrattrs: follow``) or refuses
(``require``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tpmid.der import read_tlv
from tpmid.est.messages import CsrAttr
from tpmid.evidence import ID_AA_ATTESTATION
from tpmid.tpm.specs import KEY_SPECS

# Names for the OIDs CSR attributes (and certificates) usually hold. Shown next to
# the dotted form so that an operator recognises what a server asks for.
OID_NAMES: dict[str, str] = {
    # PKCS#9 attributes (RFC 2985)
    "1.2.840.113549.1.9.1": "emailAddress",
    "1.2.840.113549.1.9.2": "unstructuredName",
    "1.2.840.113549.1.9.7": "challengePassword",
    "1.2.840.113549.1.9.14": "extensionRequest",
    ID_AA_ATTESTATION: "id-aa-attestation",
    # X.520 name attributes
    "2.5.4.3": "commonName",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "countryName",
    "2.5.4.7": "localityName",
    "2.5.4.8": "stateOrProvinceName",
    "2.5.4.10": "organizationName",
    "2.5.4.11": "organizationalUnitName",
    "0.9.2342.19200300.100.1.1": "userId",
    # key types and curves (RFC 5480, RFC 8410)
    "1.2.840.10045.2.1": "id-ecPublicKey",
    "1.2.840.10045.3.1.7": "secp256r1",
    "1.3.132.0.34": "secp384r1",
    "1.3.132.0.35": "secp521r1",
    "1.3.36.3.3.2.8.1.1.7": "brainpoolP256r1",
    "1.3.36.3.3.2.8.1.1.11": "brainpoolP384r1",
    "1.2.840.113549.1.1.1": "rsaEncryption",
    "1.2.840.113549.1.1.10": "id-RSASSA-PSS",
    "1.3.101.112": "id-Ed25519",
    "1.3.101.113": "id-Ed448",
    # signature algorithms (RFC 5758, RFC 4055)
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.2.840.113549.1.1.5": "sha1WithRSAEncryption",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
    "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
    # hash algorithms (NIST)
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    # certificate extensions (RFC 5280)
    "2.5.29.14": "subjectKeyIdentifier",
    "2.5.29.15": "keyUsage",
    "2.5.29.17": "subjectAltName",
    "2.5.29.19": "basicConstraints",
    "2.5.29.35": "authorityKeyIdentifier",
    "2.5.29.37": "extendedKeyUsage",
    "1.3.6.1.5.5.7.3.1": "id-kp-serverAuth",
    "1.3.6.1.5.5.7.3.2": "id-kp-clientAuth",
    "1.3.6.1.5.5.7.3.28": "id-kp-cmcRA",
    "1.3.6.1.1.1.1.22": "macAddress",
    "1.3.6.1.5.5.7.8.4": "id-on-hardwareModuleName",
}


def oid_name(dotted: str) -> str | None:
    """The usual name of ``dotted`` (``sha384``, ``emailAddress``), None if tpmid has none."""
    return OID_NAMES.get(dotted)


def describe_oid(dotted: str) -> str:
    """``emailAddress (1.2.840.113549.1.9.1)``, or the bare dotted form for an unknown OID."""
    name = OID_NAMES.get(dotted)
    return f"{name} ({dotted})" if name else dotted


_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_RSA = "1.2.840.113549.1.1.1"
_CURVES = {"1.2.840.10045.3.1.7": "ecc-p256", "1.3.132.0.34": "ecc-p384"}
_CURVE_OIDS = frozenset({*_CURVES, "1.3.132.0.35", "1.3.36.3.3.2.8.1.1.7",
                         "1.3.36.3.3.2.8.1.1.11"})
# Signature algorithms: (key family, hash).
_SIGNATURES = {
    "1.2.840.10045.4.3.2": ("ecc", "sha256"),
    "1.2.840.10045.4.3.3": ("ecc", "sha384"),
    "1.2.840.10045.4.3.4": ("ecc", "sha512"),
    "1.2.840.113549.1.1.5": ("rsa", "sha1"),
    "1.2.840.113549.1.1.11": ("rsa", "sha256"),
    "1.2.840.113549.1.1.12": ("rsa", "sha384"),
    "1.2.840.113549.1.1.13": ("rsa", "sha512"),
}
_HASHES = {"1.3.14.3.2.26": "sha1", "2.16.840.1.101.3.4.2.1": "sha256",
           "2.16.840.1.101.3.4.2.2": "sha384", "2.16.840.1.101.3.4.2.3": "sha512"}
# Subject attributes tpmid can fill from ``subject`` (the config key that holds each).
_SUBJECT_ATTRS = {"2.5.4.3": "cn", "2.5.4.10": "o", "2.5.4.11": "ou", "2.5.4.5": "serial_number"}
_SAN = "2.5.29.17"
_IMPLIED = {("ecc", "sha256"): "ecc-p256", ("ecc", "sha384"): "ecc-p384",
            ("rsa", "sha256"): "rsa-2048"}
_HASH_NAMES = {"sha1": "SHA-1", "sha256": "SHA-256", "sha384": "SHA-384", "sha512": "SHA-512"}


@dataclass(frozen=True)
class DeviceFacts:
    """What :func:`plan_csr` needs to know about one identity.

    ``alg`` is the algorithm of the key the CSR would use without CSR attributes
    (the IDevID's template, ``key.alg`` of a key file); ``alg_fixed`` says the key
    cannot change algorithm (an IDevID, or a key file kept across a renewal);
    ``subject`` the configured subject attributes (config key -> set or not);
    ``san`` whether the config gives subjectAltName values; ``pop`` whether
    ``est.pop`` links every CSR already.
    """

    alg: str
    alg_fixed: bool
    subject: frozenset[str] = frozenset({"cn"})
    san: bool = False
    pop: bool = False
    attestation: bool = False  # est.attestation is not off: evidence can be included
    kind_note: str = "this key"  # "the persistent IDevID" — for messages


@dataclass(frozen=True)
class CsrPlan:
    """How the CSR is built after the server's CSR attributes were read.

    ``alg`` is the key algorithm to use; ``pop`` whether the CSR carries
    tls-unique as challengePassword. ``honoured`` and ``unhonoured`` describe
    each attribute (the second with the reason) for the log and for errors.
    """

    alg: str
    pop: bool
    honoured: tuple[str, ...] = ()
    attestation: bool = False  # the server asks for key-attestation evidence
    unhonoured: tuple[str, ...] = ()


@dataclass
class _Wishes:
    algs: list[tuple[str, str]] = field(default_factory=list)  # (alg or family, what asked)
    hashes: list[tuple[str, str, str]] = field(default_factory=list)  # (family, hash, what)
    challenge: bool = False
    attestation: bool = False
    wanted: list[str] = field(default_factory=list)  # subject attribute / extension OIDs
    unknown: list[str] = field(default_factory=list)


def _der_integer(der: bytes) -> int | None:
    try:
        tag, start, end = read_tlv(der, 0)
    except ValueError:
        return None
    if tag != 0x02 or end != len(der) or start == end:
        return None
    return int.from_bytes(der[start:end], "big", signed=True)


def _wishes(attrs: Sequence[CsrAttr]) -> _Wishes:
    w = _Wishes()
    for a in attrs:
        oid = a.oid.dotted_string
        if oid == _CHALLENGE_PASSWORD:
            w.challenge = True
        elif oid == _EC_PUBLIC_KEY:
            curves = a.value_oids
            if not curves:
                w.algs.append(("ecc", describe_oid(oid)))
            for curve in curves:
                what = f"{describe_oid(oid)} on {describe_oid(curve)}"
                w.algs.append((_CURVES.get(curve, f"unsupported:{curve}"), what))
                break  # the first curve is the one asked for; others are alternatives
        elif oid in _CURVE_OIDS:
            # A bare curve OID (libest's example list) asks for an ECC key on it.
            w.algs.append((_CURVES.get(oid, f"unsupported:{oid}"), f"ECC key on {describe_oid(oid)}"))
        elif oid == _RSA:
            sizes = [s for s in (_der_integer(v) for v in a.values or ()) if s is not None]
            if sizes:
                alg = "rsa-2048" if sizes[0] == 2048 else f"unsupported:rsa-{sizes[0]}"
                w.algs.append((alg, f"{describe_oid(oid)} of {sizes[0]} bits"))
            else:
                w.algs.append(("rsa", describe_oid(oid)))
        elif oid in _SIGNATURES:
            family, hash_name = _SIGNATURES[oid]
            w.hashes.append((family, hash_name, describe_oid(oid)))
        elif oid in _HASHES:
            w.hashes.append(("any", _HASHES[oid], describe_oid(oid)))
        elif oid == ID_AA_ATTESTATION:
            w.attestation = True
        elif oid == _EXTENSION_REQUEST:
            w.wanted.extend(a.value_oids)
            others = len(a.values or ()) - len(a.value_oids)
            if others:
                w.unknown.append(f"{describe_oid(oid)} with {others} extension value(s) "
                                 "tpmid does not read")
        elif oid in _SUBJECT_ATTRS or oid == _SAN or a.values is None:
            w.wanted.append(oid)
        else:
            w.unknown.append(f"{describe_oid(oid)} (an attribute tpmid does not know)")
    return w


def _family(alg: str) -> str:
    return "rsa" if alg.startswith("rsa") else "ecc"


def plan_csr(attrs: Sequence[CsrAttr], facts: DeviceFacts) -> CsrPlan:
    """Decide the key algorithm, PoP linking and report for one CSR (see the module doc)."""
    w = _wishes(attrs)
    honoured: list[str] = []
    unhonoured: list[str] = [*w.unknown]
    alg = facts.alg

    # A signature algorithm alone also names a key: ecdsa-with-SHA384 means a P-384 key
    # for tpmid, whose keys sign with their algorithm's natural hash.
    if not w.algs and w.hashes:
        family, hash_name, what = w.hashes[0]
        implied = _IMPLIED.get((family, hash_name))
        if implied is not None and implied != alg and not facts.alg_fixed:
            w.algs.append((implied, what))
    # Key algorithm: the first one the server names (RFC 7030 §4.5.2 lists one).
    if w.algs:
        wanted, what = w.algs[0]
        if wanted.startswith("unsupported:"):
            unhonoured.append(f"key {what}: tpmid's TPM keys are ECC P-256, ECC P-384 or "
                              "RSA-2048")
        elif wanted in ("ecc", "rsa"):
            if _family(alg) == wanted:
                honoured.append(f"key type {what}")
            elif facts.alg_fixed:
                unhonoured.append(f"key {what}: {facts.kind_note} is "
                                  f"{KEY_SPECS[alg].label} and never changes algorithm")
            else:
                alg = "rsa-2048" if wanted == "rsa" else "ecc-p256"
                honoured.append(f"key {what}: a new {KEY_SPECS[alg].label} key")
        elif wanted == alg:
            honoured.append(f"key type {what}")
        elif facts.alg_fixed:
            unhonoured.append(f"key {what}: {facts.kind_note} is {KEY_SPECS[alg].label} "
                              "and never changes algorithm")
        else:
            alg = wanted
            honoured.append(f"key {what}: a new {KEY_SPECS[alg].label} key")

    # Signature hash: the key's one hash (the natural hash of its algorithm).
    natural = KEY_SPECS[alg].hash_name
    for family, hash_name, what in w.hashes[:1]:
        if family not in ("any", _family(alg)):
            unhonoured.append(f"signature {what}: the key is {KEY_SPECS[alg].label}")
        elif hash_name != natural:
            unhonoured.append(
                f"signature {what}: a TPM {KEY_SPECS[alg].label} identity key signs with "
                f"{_HASH_NAMES[natural]} only")
        else:
            honoured.append(f"signature {what}")

    pop = facts.pop
    if w.challenge:
        pop = True
        honoured.append(f"{describe_oid(_CHALLENGE_PASSWORD)}: the CSR carries the TLS "
                        "connection's tls-unique (RFC 7030 §3.5, TLS 1.2)")

    if w.attestation:
        what = describe_oid(ID_AA_ATTESTATION)
        if facts.attestation:
            honoured.append(f"{what}: TPM2_Certify evidence by the IAK (docs/attestation.md)")
        else:
            unhonoured.append(f"{what}: key attestation is off (set est.attestation: "
                              "required-by-server or include)")

    for oid in dict.fromkeys(w.wanted):
        what = describe_oid(oid)
        if oid in _SUBJECT_ATTRS:
            key = _SUBJECT_ATTRS[oid]
            if key in facts.subject:
                honoured.append(f"subject {what}")
            else:
                unhonoured.append(f"subject {what}: not configured (set subject.{key})")
        elif oid == _SAN:
            if facts.san:
                honoured.append(f"extension {what}")
            else:
                unhonoured.append(f"extension {what}: no values configured (set san.dns, "
                                  "san.ip or san.uri)")
        else:
            unhonoured.append(f"{what}: tpmid does not know a value for it")
    return CsrPlan(alg=alg, pop=pop, honoured=tuple(honoured), unhonoured=tuple(unhonoured),
                   attestation=w.attestation)
