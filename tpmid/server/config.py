"""The reference server's config file (``DIR/config.yaml``): labels, profiles, auth, behaviours.

Parsing is pure (``parse_server_config(data, source)``); ``load_server_config``
reads the file. Unknown keys and wrong types are rejected with a message that
names the key. The schema is documented in ``docs/est-server.md``.

No secret is ever in this file: the Secret-Value and Basic passwords are stored
as salted scrypt hashes (:func:`tpmid.server.auth.hash_secret`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from tpmid.config import MappingReader, parse_duration, read_yaml_file, shown
from tpmid.errors import ConfigError
from tpmid.est.messages import CsrAttr, der_oid
from tpmid.server.subject_policy import (
    SUBJECT_POLICIES,
    AnySubject,
    ClientSerialSubject,
    SubjectPolicy,
)

CaName = Literal["manufacturer", "operator"]
Profile = Literal["idevid", "ldevid", "edgeca"]
ServerAlg = Literal["ecc-p256", "ecc-p384", "rsa-2048"]

CA_NAMES: tuple[str, ...] = ("manufacturer", "operator")
PROFILES: tuple[str, ...] = ("idevid", "ldevid", "edgeca")
ALGS: tuple[str, ...] = ("ecc-p256", "ecc-p384", "rsa-2048")
# RFC 7030 §3.2.2: the operation path segments.
OPERATIONS: tuple[str, ...] = ("cacerts", "simpleenroll", "simplereenroll", "csrattrs",
                               "serverkeygen")
ENROLL_OPERATIONS: tuple[str, ...] = ("simpleenroll", "simplereenroll", "serverkeygen")
TLS_VERSIONS: tuple[str, ...] = ("1.2", "1.3")

YEAR = 365 * 86400
_YEARS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(y|yr|yrs|year|years)\s*$", re.IGNORECASE)
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_lifetime(value: object, where: str) -> float:
    """A duration as in :func:`tpmid.config.parse_duration`, plus years (``20y``)."""
    if isinstance(value, str):
        m = _YEARS_RE.match(value)
        if m:
            return float(m.group(1)) * YEAR
    seconds = parse_duration(value, where)
    if seconds < 1:
        raise ConfigError(f"{where}: a certificate lifetime must be at least 1 second")
    return seconds


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class SecretValueAuth:
    """A static secret in a request header, like GlobalSign's IDevID endpoint."""

    hash: str
    header: str = "Secret-Value"
    kind: Literal["secret_value"] = "secret_value"


@dataclass(frozen=True)
class BasicAuthPolicy:
    """HTTP Basic (RFC 7617) with one user whose password is stored hashed."""

    username: str
    hash: str
    realm: str = "tpmid-est"
    kind: Literal["basic"] = "basic"


@dataclass(frozen=True)
class ClientCertAuth:
    """A TLS client certificate issued directly by one of ``issuers`` (CA names)."""

    issuers: tuple[str, ...]
    kind: Literal["client_cert"] = "client_cert"


@dataclass(frozen=True)
class AnonymousAuth:
    """No authentication (a lab switch; never the default)."""

    kind: Literal["anonymous"] = "anonymous"


AuthPolicy = SecretValueAuth | BasicAuthPolicy | ClientCertAuth | AnonymousAuth


@dataclass(frozen=True)
class Faults:
    """Misbehaviours injected for client tests; all off by default.

    The server still signs with its real CAs: only the injected defect is wrong.
    """

    status: int | None = None  # answer with this HTTP status instead
    retry_after: float | None = None  # Retry-After sent with ``status``
    retry_after_header: str | None = None  # ... or this raw header value
    malformed_body: bool = False  # a 200 whose body is not the promised structure
    wrong_content_type: bool = False  # a 200 with Content-Type text/plain
    delay: float = 0.0  # seconds to wait before answering
    wrong_key: bool = False  # issue the certificate for a fresh key, not the CSR's
    trickle: float = 0.0  # send the answer one byte every this many seconds
    reset: bool = False  # send half the answer, then reset the connection
    drop: bool = False  # close the connection without any answer
    oversize: int = 0  # pad the answer to this many bytes
    foreign_issuer: bool = False  # sign with a throwaway CA nobody trusts
    expired: bool = False  # issue a certificate whose validity has already ended
    subject: str | None = None  # issue for this subject (RFC 4514), not the requested one
    operations: tuple[str, ...] = OPERATIONS  # which operations misbehave
    times: int = 0  # only the first N matching requests (0: all of them)

    @property
    def active(self) -> bool:
        """True if any fault is switched on."""
        return (self.status is not None or self.malformed_body or self.wrong_content_type
                or self.delay > 0 or self.wrong_key or self.trickle > 0 or self.reset
                or self.drop or self.oversize > 0 or self.foreign_issuer or self.expired
                or self.subject is not None)


@dataclass(frozen=True)
class LabelConfig:
    """One EST label (RFC 7030 §3.2.2): a CA, a certificate profile, an auth policy, behaviours.

    ``subject_policy`` says which subjects the authenticated client may ask for
    (:mod:`tpmid.server.subject_policy`).
    """

    name: str
    ca: str
    profile: str
    lifetime: float
    auth: AuthPolicy
    subject_policy: SubjectPolicy
    pending: int = 0  # first N requests per CSR key get 202 + Retry-After
    retry_after: float = 5.0
    reenroll_forcing: bool = False
    libest_quirks: bool = False
    pop: bool = False  # require tls-unique in challengePassword (RFC 7030 §3.5)
    allow_sha1_csr: bool = False
    serverkeygen: bool = True
    serverkeygen_alg: str | None = None  # None: the CA's algorithm
    csrattrs: tuple[CsrAttr, ...] | None = None  # None: derived from profile and CA key
    faults: Faults = field(default_factory=Faults)


@dataclass(frozen=True)
class ServerConfig:
    """The whole server config file."""

    labels: Mapping[str, LabelConfig]
    default_label: str | None = None
    tls_min: str = "1.2"
    tls_max: str = "1.3"
    max_body: int = 65536
    source: str = "<config>"

    def label(self, name: str | None) -> LabelConfig | None:
        """The label called ``name`` (None: the default label), or None."""
        if name is None:
            name = self.default_label
        return self.labels.get(name) if name is not None else None


# --------------------------------------------------------------------------- parsing


_HINT = "see docs/est-server.md for the config file reference"


def _R(data: object, where: str, source: str) -> MappingReader:
    """A reader of this file's mappings (shared with tpmid's own config parser)."""
    return MappingReader(data, where, source, hint=_HINT)


def _auth(r: MappingReader) -> AuthPolicy:
    kinds = [k for k in ("secret_value", "basic", "client_cert", "anonymous") if r.has(k)]
    if len(kinds) != 1:
        raise ConfigError(
            f"{r.source}: {r.where}: give exactly one of secret_value, basic, client_cert "
            f"or anonymous (found: {', '.join(kinds) or 'none'})"
        )
    kind = kinds[0]
    policy: AuthPolicy
    if kind == "secret_value":
        s = r.sub("secret_value")
        policy = SecretValueAuth(hash=s.string("hash", required=True),
                                 header=s.string("header", "Secret-Value"))
        s.done()
    elif kind == "basic":
        b = r.sub("basic")
        policy = BasicAuthPolicy(username=b.string("username", required=True),
                                 hash=b.string("hash", required=True),
                                 realm=b.string("realm", "tpmid-est"))
        b.done()
        if ":" in policy.username:
            raise r.err("basic.username", "must not contain ':' (RFC 7617 §2)")
    elif kind == "client_cert":
        c = r.sub("client_cert")
        issuers = c.pop("issuers", None)
        if isinstance(issuers, str):
            issuers = [issuers]
        if (not isinstance(issuers, list) or not issuers
                or not all(isinstance(i, str) and i in CA_NAMES for i in issuers)):
            raise c.err("issuers", f"expected a list of CA names from {', '.join(CA_NAMES)}")
        c.done()
        policy = ClientCertAuth(issuers=tuple(issuers))
    else:
        if r.pop("anonymous") is not True:
            raise r.err("anonymous", "expected true")
        policy = AnonymousAuth()
    r.done()
    return policy


def _subject_policy(r: MappingReader, auth: AuthPolicy) -> SubjectPolicy:
    """The label's ``subject_policy``; if absent, ``client-serial`` under client_cert auth, else any.

    Why that default: a label that authenticates devices by their certificate is
    exactly where one device could ask for another's name, so it is bound unless
    the file says ``any`` — which also protects config files written before the
    key existed. A label authenticated by a shared secret, a password or nothing
    has no client certificate to bind to, so ``client-serial`` there would refuse
    every request and is a config error.
    """
    binds = isinstance(auth, ClientCertAuth)
    kind = r.string("subject_policy", "client-serial" if binds else "any",
                    choices=SUBJECT_POLICIES)
    if kind == "any":
        return AnySubject()
    if not binds:
        raise r.err("subject_policy", f"{kind} binds the subject to the TLS client certificate, "
                    f"so it needs auth client_cert (this label uses {auth.kind}); use any")
    return ClientSerialSubject()


def parse_csrattrs(value: object, where: str, source: str) -> tuple[CsrAttr, ...]:
    """CSR attribute items from YAML: OID strings, or ``{type: OID, values: [OID, ...]}``."""
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {where}: expected a list of OIDs or "
                          "{type: OID, values: [OID, ...]} items")
    out: list[CsrAttr] = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        try:
            if isinstance(item, str):
                der_oid(item)
                out.append(CsrAttr.of(item))
                continue
            r = _R(item, here, source)
            oid = r.string("type", required=True)
            values = r.pop("values", [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise r.err("values", "expected a list of OIDs")
            hex_values = r.pop("der_values", [])
            if not isinstance(hex_values, list) or not all(isinstance(v, str) for v in hex_values):
                raise r.err("der_values", "expected a list of hex strings")
            r.done()
            der_oid(oid)
            items = [der_oid(v) for v in values] + [bytes.fromhex(h) for h in hex_values]
            out.append(CsrAttr(x509.ObjectIdentifier(oid), tuple(items)))
        except ValueError as e:
            raise ConfigError(f"{source}: {here}: {e}") from e
    return tuple(out)


def _faults(r: MappingReader) -> Faults:
    status = r.pop("status")
    if status is not None and (isinstance(status, bool) or not isinstance(status, int)
                               or not 100 <= status <= 599):
        raise r.err("status", f"expected an HTTP status code, got {shown(status)}")
    retry_after = r.pop("retry_after")
    ops = r.pop("operations", list(OPERATIONS))
    if isinstance(ops, str):
        ops = [ops]
    if not isinstance(ops, list) or not all(o in OPERATIONS for o in ops):
        raise r.err("operations", f"expected a list from {', '.join(OPERATIONS)}")
    subject = r.string("subject")
    if subject is not None:
        try:
            x509.Name.from_rfc4514_string(subject)
        except ValueError as e:
            raise r.err("subject", f"not an RFC 4514 name ({e})") from None
    f = Faults(
        status=status,
        retry_after=(parse_duration(retry_after, f"{r.source}: {r.path('retry_after')}")
                     if retry_after is not None else None),
        retry_after_header=r.string("retry_after_header"),
        malformed_body=r.flag("malformed_body", False),
        wrong_content_type=r.flag("wrong_content_type", False),
        delay=r.duration("delay", 0),
        wrong_key=r.flag("wrong_key", False),
        trickle=r.duration("trickle", 0),
        reset=r.flag("reset", False),
        drop=r.flag("drop", False),
        oversize=r.whole("oversize", 0),
        foreign_issuer=r.flag("foreign_issuer", False),
        expired=r.flag("expired", False),
        subject=subject,
        operations=tuple(ops),
        times=r.whole("times", 0),
    )
    r.done()
    return f


def _label(name: str, r: MappingReader) -> LabelConfig:
    ca = r.string("ca", required=True, choices=CA_NAMES)
    profile = r.string("profile", required=True, choices=PROFILES)
    if "lifetime" not in r.data:
        raise r.err("lifetime", "is required (for example 30s, 7day or 20y)")
    lifetime = parse_lifetime(r.pop("lifetime"), f"{r.source}: {r.path('lifetime')}")
    if "auth" not in r.data:
        raise r.err("auth", "is required (secret_value, basic, client_cert or anonymous)")
    auth = _auth(r.sub("auth"))
    subject_policy = _subject_policy(r, auth)
    csrattrs = (parse_csrattrs(r.pop("csrattrs"), r.path("csrattrs"), r.source)
                if r.has("csrattrs") else None)
    label = LabelConfig(
        name=name,
        ca=ca,
        profile=profile,
        lifetime=lifetime,
        auth=auth,
        subject_policy=subject_policy,
        pending=r.whole("pending", 0),
        retry_after=r.duration("retry_after", 5),
        reenroll_forcing=r.flag("reenroll_forcing", False),
        libest_quirks=r.flag("libest_quirks", False),
        pop=r.flag("pop", False),
        allow_sha1_csr=r.flag("allow_sha1_csr", False),
        serverkeygen=r.flag("serverkeygen", True),
        serverkeygen_alg=r.string("serverkeygen_alg", None, choices=ALGS),
        csrattrs=csrattrs,
        faults=_faults(r.sub("faults")),
    )
    r.done()
    return label


def parse_server_config(data: object, source: str = "<config>") -> ServerConfig:
    """Build a :class:`ServerConfig` from a parsed YAML document; ConfigError on any mistake."""
    top = _R(data, "", source)
    lr = top.sub("labels")
    labels: dict[str, LabelConfig] = {}
    for name in list(lr.data):
        if not isinstance(name, str) or not _LABEL_RE.match(name) or name in OPERATIONS:
            raise ConfigError(
                f"{source}: labels: {shown(name)} is not a usable label (letters, digits, '.', '_', "
                "'-'; not an operation name such as cacerts)"
            )
        labels[name] = _label(name, lr.sub(name))
    lr.done()
    if not labels:
        raise ConfigError(f"{source}: labels: at least one label is required")
    default = top.string("default_label")
    if default is not None and default not in labels:
        raise top.err("default_label", f"{shown(default)} is not one of the labels "
                      f"({', '.join(sorted(labels))})")
    t = top.sub("tls")
    tls_min = str(t.pop("min_version", "1.2"))
    tls_max = str(t.pop("max_version", "1.3"))
    for key, v in (("min_version", tls_min), ("max_version", tls_max)):
        if v not in TLS_VERSIONS:
            raise t.err(key, f"{shown(v)} is not one of {', '.join(TLS_VERSIONS)}")
    if tls_min > tls_max:
        raise t.err("min_version", "is above max_version")
    t.done()
    max_body = top.whole("max_body", 65536, minimum=1024)
    top.done()
    return ServerConfig(labels=labels, default_label=default, tls_min=tls_min, tls_max=tls_max,
                        max_body=max_body, source=source)


# --------------------------------------------------------------------------- lab overrides

# What `tpmid est-server label` may change per label, kept in DIR/lab.yaml on top of
# config.yaml (tpmid.server.lab).
LAB_KEYS: tuple[str, ...] = ("lifetime", "pending", "retry_after", "faults")

LabOverrides = dict[str, dict[str, Any]]


def parse_lab(data: object, source: str) -> LabOverrides:
    """The lab overrides document ``{labels: {NAME: {lifetime, pending, retry_after, faults}}}``.

    Only its shape is checked here; the values are checked with the config they
    change (:func:`merge_lab`, then :func:`parse_server_config`).
    """
    top = _R(data, "", source)
    labels = top.sub("labels")
    out: LabOverrides = {}
    for name in list(labels.data):
        r = labels.sub(name) if isinstance(name, str) else None
        if r is None:
            raise ConfigError(f"{source}: labels: {shown(name)} is not a label name")
        unknown = sorted(str(k) for k in r.data if k not in LAB_KEYS)
        if unknown:
            raise r.err(unknown[0], f"cannot be changed by lab overrides (only "
                        f"{', '.join(LAB_KEYS)})")
        if "faults" in r.data and not isinstance(r.data["faults"] or {}, Mapping):
            raise r.err("faults", "expected a mapping")
        if r.data:
            out[name] = dict(r.data)
    top.done()
    return out


def merge_lab(data: object, lab: Mapping[str, Mapping[str, Any]], source: str) -> Any:
    """A copy of the config document ``data`` with ``lab``'s per-label values in place.

    A lab value replaces the config file's (``faults`` as a whole: the lab's faults
    are the label's complete set, so ``faults: {}`` switches the file's off too).
    """
    merged = copy.deepcopy(data)
    labels = merged.get("labels") if isinstance(merged, dict) else None
    if not isinstance(labels, dict):
        return merged  # parse_server_config explains what is wrong with the file
    for name, overrides in lab.items():
        if not isinstance(labels.get(name), dict):
            raise ConfigError(f"{source}: labels: {shown(name)} is not a label of the server "
                              f"(it has: {', '.join(sorted(map(str, labels)))})",
                              hint=f"`tpmid est-server label {shown(name)} --reset` removes "
                              "its overrides")
        labels[name].update(copy.deepcopy(dict(overrides)))
    return merged


def load_server_config(path: Path, lab: Path | None = None) -> ServerConfig:
    """Read and parse the server config file at ``path``, with the lab overrides in ``lab``."""
    data = read_yaml_file(path, "server config",
                          "create the server directory with: tpmid est-server init --dir DIR")
    source = str(path)
    if lab is not None and lab.exists():
        overrides = parse_lab(read_yaml_file(lab, "lab overrides file", ""), str(lab))
        if overrides:
            data = merge_lab(data, overrides, str(lab))
            source = f"{path} (with {lab.name})"
    return parse_server_config(data, source)
