"""Configuration model: frozen dataclasses parsed from a YAML mapping.

Parsing is pure (``parse_config(data, source)``); ``load_config(path)`` is the
one place that reads the file. Unknown keys and wrong types are rejected with a
message that names the key and the file. Secrets are never accepted as plain
strings: they are references (``{env: NAME}``, ``{file: PATH}``, ``{stdin: true}``)
resolved later by :mod:`tpmid.secrets` with an environment the CLI injects.

The schema is documented in ``docs/config.md``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from tpmid.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/tpmid/config.yaml")
DEFAULT_TCTI = "device:/dev/tpmrm0"
DEFAULT_STORE_DIR = Path("/var/lib/tpmid")
DEFAULT_IDEVID_HANDLE = 0x81020000
DEFAULT_IAK_HANDLE = 0x81020001  # tpmid's default for a persistent IAK
DEFAULT_TPM_TIMEOUT_S = 120.0
DEFAULT_LOCK_TIMEOUT_S = 300.0
DEFAULT_EXCHANGE_DEADLINE_S = 120.0
# Debian's libtpm2-pkcs11-1 (what IoT Edge's key service loads: aziot_keys.pkcs11_lib_path).
DEFAULT_PKCS11_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so")
DEFAULT_PKCS11_TOKEN = "tpmid"
# The label a new key is linked under while its certificate is being enrolled.
PKCS11_STAGING_SUFFIX = ".next"
# PKCS#11 token labels are 32 bytes (CK_TOKEN_INFO.label, space padded).
PKCS11_TOKEN_LABEL_MAX = 32

KeyKind = Literal["persistent", "ek-derived", "file"]
Template = Literal["H-1", "H-2", "H-3"]
FileAlg = Literal["ecc-p256", "ecc-p384", "rsa-2048"]
CsrAttrsMode = Literal["follow", "ignore", "require"]
CSRATTRS_MODES: tuple[str, ...] = ("follow", "ignore", "require")
TEMPLATES: tuple[str, ...] = ("H-1", "H-2", "H-3")
FILE_ALGS: tuple[str, ...] = ("ecc-p256", "ecc-p384", "rsa-2048")


# --------------------------------------------------------------------------- amounts


@dataclass(frozen=True)
class Amount:
    """A share of a certificate's lifetime (``80%``) or an absolute duration (``10min``).

    Exactly one of ``fraction`` and ``seconds`` is set. Same meaning as Azure IoT
    Edge's ``auto_renew.threshold`` / ``retry``.
    """

    fraction: float | None = None
    seconds: float | None = None

    def of(self, lifetime_s: float) -> float:
        """Return the amount in seconds for a certificate with ``lifetime_s``."""
        if self.fraction is not None:
            return self.fraction * lifetime_s
        assert self.seconds is not None
        return self.seconds

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return f"{self.seconds:g}s"


_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
_AMOUNT_RE = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,9})?)\s*([a-z%]*)\s*$", re.IGNORECASE)

MAX_CONFIG_BYTES = 1 << 20
# No duration in a config means more than this (a century); beyond it is a typo.
MAX_DURATION_S = 100 * 365 * 86400.0
# Longest string value accepted anywhere in the config (paths, URLs, names).
MAX_STRING = 4096
# RFC 5280 Appendix A upper bounds: ub-common-name, ub-organization-name,
# ub-organizational-unit-name, ub-serial-number.
UB_NAME = 64


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut short: error messages never carry a megabyte of input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def parse_duration(value: object, where: str = "duration") -> float:
    """Parse ``90s``, ``10min``, ``12h``, ``4day``, ``30d`` (or a bare number of seconds)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration such as '10min', got {shown(value)}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or not 0 <= value <= MAX_DURATION_S:
            raise ConfigError(f"{where}: {shown(value)} is not a duration between 0 and "
                              "100 years")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a duration such as '10min', got {shown(value)}")
    m = _AMOUNT_RE.match(value)
    if not m or m.group(2) == "%" or (m.group(2) and m.group(2).lower() not in _UNITS):
        raise ConfigError(
            f"{where}: {shown(value)} is not a duration; use a number with s, min, h, day or "
            "w (for example '90s', '10min', '12h', '4day')"
        )
    seconds = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"{where}: {shown(value)} is longer than 100 years")
    return seconds


def parse_amount(value: object, where: str) -> Amount:
    """Parse a lifetime share (``'80%'``) or a duration (``'10min'``)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        m = _AMOUNT_RE.match(value)
        if not m:
            raise ConfigError(f"{where}: {shown(value)} is not a percentage such as '80%'")
        pct = float(m.group(1))
        if not 0 <= pct <= 100:
            raise ConfigError(f"{where}: {shown(value)} must be between 0% and 100%")
        return Amount(fraction=pct / 100)
    return Amount(seconds=parse_duration(value, where))


# --------------------------------------------------------------------------- secrets


@dataclass(frozen=True)
class SecretRef:
    """Where a secret comes from. Never the secret itself.

    Exactly one of ``env`` (variable name), ``file`` (0600 file), ``stdin`` or
    ``sealed`` (the name of a secret sealed to the TPM with ``tpmid secret seal``).
    """

    env: str | None = None
    file: Path | None = None
    stdin: bool = False
    sealed: str | None = None

    def describe(self) -> str:
        """A human description that never includes the value."""
        if self.env:
            return f"environment variable {self.env}"
        if self.file:
            return f"file {self.file}"
        if self.sealed:
            return f"sealed secret {self.sealed}"
        return "standard input"


# Names of sealed secrets: also their file names in the store (store/sealed.py).
SEALED_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PCR_BANKS = ("sha256", "sha384", "sha1")


@dataclass(frozen=True)
class SealedSecretConfig:
    """How ``tpmid secret seal NAME`` seals one secret: the PCRs it is bound to, if any."""

    name: str
    pcrs: tuple[int, ...] = ()
    pcr_bank: str = "sha256"


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class HierarchyAuth:
    """Authorization values of the TPM hierarchies; empty by default."""

    owner: SecretRef | None = None
    endorsement: SecretRef | None = None
    lockout: SecretRef | None = None


@dataclass(frozen=True)
class TpmConfig:
    tcti: str = DEFAULT_TCTI
    auth: HierarchyAuth = field(default_factory=HierarchyAuth)
    # Host-wide lock serialising TPM use between tpmid processes (no resource manager).
    lock_file: Path | None = None
    # A TPM that does not answer one command within this is given up on.
    timeout: float = DEFAULT_TPM_TIMEOUT_S
    # How long a command waits for the host-wide TPM lock held by another process.
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S


@dataclass(frozen=True)
class StoreConfig:
    dir: Path = DEFAULT_STORE_DIR


TrustProfile = Literal["rfc5280", "webpki"]
TRUST_PROFILES: tuple[str, ...] = ("rfc5280", "webpki")


@dataclass(frozen=True)
class TrustConfig:
    est_anchors: tuple[Path, ...] = ()
    use_system_store: bool = False
    # How CA certificates are judged: rfc5280 (anchors are a name and a key, RFC 5280
    # §6.1.1(d); intermediates by RFC 5280 §6.1.4) or webpki (the CA/Browser Forum
    # profile for anchors and intermediates alike, tpmid's behaviour before).
    profile: TrustProfile = "rfc5280"


@dataclass(frozen=True)
class KeyConfig:
    kind: KeyKind
    template: Template = "H-2"  # persistent and ek-derived
    handle: int = DEFAULT_IDEVID_HANDLE  # persistent
    alg: FileAlg = "ecc-p256"  # file
    # persistent and ek-derived: the NV index holding a copy of the certificate
    # (tpmid provision --write-nv), rewritten when TPM2_Clear deleted it.
    cert_nv: int | None = None
    # persistent and ek-derived: an IAK (TCG DevID attestation key) lives with this
    # IDevID, placed the same way (persistent at iak_handle, or re-derived).
    iak: bool = False
    iak_handle: int = DEFAULT_IAK_HANDLE


@dataclass(frozen=True)
class SubjectConfig:
    cn: str
    o: str | None = None
    ou: str | None = None
    serial_number: str | None = None


@dataclass(frozen=True)
class SanConfig:
    dns: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    hardware_module_name: bool = False


@dataclass(frozen=True)
class ClientCertAuth:
    """mTLS with a software key pair from files (bootstrap, comparison)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: SecretRef


@dataclass(frozen=True)
class EstAuth:
    client: str | None = None  # name of another identity whose key+cert do mTLS
    client_files: ClientCertAuth | None = None
    basic: BasicAuth | None = None
    headers: tuple[tuple[str, SecretRef], ...] = ()


@dataclass(frozen=True)
class EstConfig:
    url: str
    auth: EstAuth = field(default_factory=EstAuth)
    trust_anchors: tuple[Path, ...] = ()  # overrides trust.est_anchors for this identity
    issuer_anchors: tuple[Path, ...] = ()  # CA certs the issued cert must chain to
    pin: str | None = None  # SHA-256 of the root, for /cacerts bootstrap without anchors
    allow_http: bool = False
    pop: bool = False  # RFC 7030 §3.5 tls-unique linking
    # Key-attestation evidence in the CSR (docs/attestation.md): off, include, or
    # required-by-server (only when the label's /csrattrs asks for it).
    attestation: Literal["off", "include", "required-by-server"] = "off"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # One deadline per EST exchange: connect + TLS + request + the whole answer.
    total_timeout: float = 120.0
    max_wait: float = 300.0  # total time to keep resending after 202 Accepted
    accept_rewritten_subject: bool = False
    # RFC 7030 §3.6.1: accept a server certificate that chains to the anchors and
    # carries id-kp-cmcRA even when it does not name the host in the URL.
    accept_cmc_ra: bool = False
    # RFC 7030 §4.5: what the label's /csrattrs asks for shapes the CSR (follow), is not
    # fetched (ignore), or must be honoured in full (require).
    csrattrs: CsrAttrsMode = "follow"
    # RFC 7030 §4.4: the server generates the key, which is imported into the TPM
    # (enrollment and every renewal of this identity).
    serverkeygen: bool = False


@dataclass(frozen=True)
class RenewConfig:
    threshold: Amount = field(default_factory=lambda: Amount(fraction=0.8))
    retry: Amount = field(default_factory=lambda: Amount(fraction=0.04))
    jitter: Amount = field(default_factory=lambda: Amount(fraction=0.02))
    rotate_key: bool = True
    method: Literal["simplereenroll", "simpleenroll"] = "simplereenroll"
    grace: float = 0.0  # seconds the old key survives after a rotation
    # Also renew right after the identity named in est.auth.client renews (the Edge CA
    # after the LDevID), besides this identity's own schedule.
    chain: bool = False


@dataclass(frozen=True)
class HooksConfig:
    after_renew: tuple[str, ...] = ()
    # Variables of tpmid's environment a hook may see besides PATH and TPMID_*.
    environment: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pkcs11Config:
    """The tpm2-pkcs11 token tpmid keeps its identities' keys in (top-level ``pkcs11``).

    ``store`` is the tpm2-pkcs11 store directory (its ``TPM2_PKCS11_STORE``),
    ``token`` the token label, ``user_pin`` the PIN consumers log in with (and
    tpmid needs to link a key), ``so_pin`` the security officer PIN (needed only
    when tpmid creates the token), ``library`` the PKCS#11 module path written
    into IoT Edge's configuration.
    """

    store: Path
    user_pin: SecretRef
    token: str = DEFAULT_PKCS11_TOKEN
    so_pin: SecretRef | None = None
    library: Path = DEFAULT_PKCS11_LIBRARY


@dataclass(frozen=True)
class IdentityPkcs11:
    """``identities.NAME.pkcs11``: whether and under which label the key is in the token.

    Absent from the file means "on, labelled with the identity's name" for
    identities whose key can be linked (key files) when the top-level ``pkcs11``
    section exists.
    """

    enabled: bool = True
    label: str | None = None
    explicit: bool = False  # written in the file (an IDevID must not ask for it)


@dataclass(frozen=True)
class IdentityConfig:
    name: str
    key: KeyConfig
    subject: SubjectConfig
    san: SanConfig = field(default_factory=SanConfig)
    profile: Literal["device", "ca"] = "device"
    est: EstConfig | None = None
    renew: RenewConfig = field(default_factory=RenewConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    pkcs11: IdentityPkcs11 = field(default_factory=IdentityPkcs11)

    @property
    def pkcs11_label(self) -> str:
        """The CKA_LABEL of this identity's key (and certificate) in the token."""
        return self.pkcs11.label or self.name


@dataclass(frozen=True)
class Config:
    tpm: TpmConfig = field(default_factory=TpmConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    identities: Mapping[str, IdentityConfig] = field(default_factory=dict)
    source: str = "<defaults>"
    pkcs11: Pkcs11Config | None = None
    # The secrets section: PCR bindings of sealed secrets (names without one are unbound).
    sealed: Mapping[str, SealedSecretConfig] = field(default_factory=dict)

    def sealing(self, name: str) -> SealedSecretConfig:
        """How secret ``name`` is sealed: its ``secrets.NAME`` section, else unbound."""
        return self.sealed.get(name) or SealedSecretConfig(name)

    def secret_refs(self) -> list[tuple[str, SecretRef]]:
        """Every secret reference of the config, with where it is (``identities.x.est...``)."""
        refs: list[tuple[str, SecretRef]] = [
            (f"tpm.auth.{k}", ref) for k in ("owner", "endorsement", "lockout")
            if (ref := getattr(self.tpm.auth, k)) is not None]
        if self.pkcs11 is not None:
            refs.append(("pkcs11.user_pin", self.pkcs11.user_pin))
            if self.pkcs11.so_pin is not None:
                refs.append(("pkcs11.so_pin", self.pkcs11.so_pin))
        for ident in self.identities.values():
            if ident.est is None:
                continue
            where = f"identities.{ident.name}.est.auth"
            if ident.est.auth.basic is not None:
                refs.append((f"{where}.basic.password", ident.est.auth.basic.password))
            refs += [(f"{where}.headers.{h}", ref) for h, ref in ident.est.auth.headers]
        return refs

    def identity(self, name: str) -> IdentityConfig:
        """Return the identity called ``name`` or raise a ConfigError listing the known ones."""
        try:
            return self.identities[name]
        except KeyError:
            known = ", ".join(sorted(self.identities)) or "none"
            raise ConfigError(
                f"{self.source}: no identity named {shown(name)} (configured: {known})"
            ) from None

    def attestation_identity(self) -> IdentityConfig | None:
        """The identity whose IDevID carries the IAK (``key.iak``), if any."""
        return next((i for i in self.identities.values() if i.key.iak), None)


# --------------------------------------------------------------------------- parsing


def check_text(value: str, where: str, source: str, *, limit: int) -> None:
    """ConfigError for a string tpmid cannot use: too long, or with control characters."""
    if len(value) > limit:
        raise ConfigError(f"{source}: {where}: {len(value)} characters is more than the "
                          f"{limit} allowed")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ConfigError(f"{source}: {where}: {shown(value)} holds control characters")


class MappingReader:
    """Walks one mapping of a YAML document, remembering where it is, and rejects leftovers.

    Shared by tpmid's config and the reference EST server's config: every value is
    type-checked as it is taken, and :meth:`done` names any key nobody took.
    """

    def __init__(self, data: object, where: str, source: str, *, hint: str | None = None) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, "
                              f"got {type(data).__name__}")
        self.data: dict[Any, Any] = dict(data)
        self.where = where
        self.source = source
        self.hint = hint

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.path(key)}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.data

    def pop(self, key: str, default: Any = None) -> Any:
        return self.data.pop(key, default)

    def string(self, key: str, default: str | None = None, *, required: bool = False,
               choices: tuple[str, ...] | None = None) -> Any:
        if key not in self.data:
            if required:
                raise self.err(key, "is required")
            return default
        v = self.data.pop(key)
        if not isinstance(v, str) or not v:
            raise self.err(key, f"expected a non-empty string, got {shown(v)}")
        if choices is not None and v not in choices:
            raise self.err(key, f"{shown(v)} is not one of {', '.join(choices)}")
        check_text(v, self.path(key), self.source, limit=MAX_STRING)
        return v

    def flag(self, key: str, default: bool) -> bool:
        v = self.data.pop(key, default)
        if not isinstance(v, bool):
            raise self.err(key, f"expected true or false, got {shown(v)}")
        return v

    def number(self, key: str, default: float, *, minimum: float = 0.0,
               maximum: float = MAX_DURATION_S) -> float:
        v = self.data.pop(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                or not minimum <= v <= maximum:
            raise self.err(key, f"expected a number from {minimum:g} to {maximum:g}, "
                                f"got {shown(v)}")
        return float(v)

    def whole(self, key: str, default: int, *, minimum: int = 0,
              maximum: int = 2**31 - 1) -> int:
        v = self.data.pop(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
            raise self.err(key, f"expected a whole number from {minimum} to {maximum}, "
                                f"got {shown(v)}")
        return v

    def duration(self, key: str, default: float | str) -> float:
        return parse_duration(self.data.pop(key, default), f"{self.source}: {self.path(key)}")

    def amount(self, key: str, default: str) -> Amount:
        return parse_amount(self.data.pop(key, default), f"{self.source}: {self.path(key)}")

    def paths(self, key: str) -> tuple[Path, ...]:
        v = self.data.pop(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
            raise self.err(key, "expected a list of file paths")
        for p in v:
            check_text(p, self.path(key), self.source, limit=MAX_STRING)
        return tuple(Path(p.removeprefix("file://")) for p in v)

    def strings(self, key: str, *, limit: int = MAX_STRING) -> tuple[str, ...]:
        v = self.data.pop(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or len(v) > 64 or not all(isinstance(p, str) for p in v):
            raise self.err(key, "expected a list of strings")
        for s in v:
            check_text(s, self.path(key), self.source, limit=limit)
        return tuple(v)

    def sub(self, key: str) -> MappingReader:
        return MappingReader(self.data.pop(key, None), self.path(key), self.source,
                             hint=self.hint)

    def done(self) -> None:
        if self.data:
            names = ", ".join(sorted(str(k)[:40] for k in self.data))
            where = f" in {self.where}" if self.where else ""
            raise ConfigError(f"{self.source}: unknown key(s){where}: {names}", hint=self.hint)


def _secret(value: object, where: str, source: str, *, sealable: bool = True) -> SecretRef:
    if isinstance(value, str):
        raise ConfigError(
            f"{source}: {where}: secrets are never written in the config file; "
            "use {env: VARIABLE}, {file: /path/to/0600-file}, {stdin: true} or "
            "{sealed: NAME} (sealed with `tpmid secret seal`)"
        )
    r = MappingReader(value, where, source)
    env = r.string("env")
    file = r.string("file")
    stdin = r.flag("stdin", False)
    sealed = r.string("sealed")
    r.done()
    if sum(x is not None and x is not False for x in (env, file, stdin, sealed)) != 1:
        raise ConfigError(f"{source}: {where}: give exactly one of env, file, stdin or sealed")
    if sealed is not None:
        if not sealable:
            raise ConfigError(
                f"{source}: {where}: a hierarchy password cannot be a sealed secret: "
                "unsealing needs the TPM opened with it",
                hint="give it as {env: VARIABLE} or {file: /path/to/0600-file}")
        if not SEALED_NAME_RE.fullmatch(sealed):
            raise ConfigError(f"{source}: {where}.sealed: {shown(sealed)} is not a sealed "
                              "secret name (letters, digits, '_', '.', '-'; at most 64)")
    return SecretRef(env=env, file=Path(file) if file else None, stdin=stdin, sealed=sealed)


def _sealed_section(r: MappingReader) -> dict[str, SealedSecretConfig]:
    """The ``secrets`` section: ``NAME: {pcrs: [0, 7], pcr_bank: sha256}``."""
    out: dict[str, SealedSecretConfig] = {}
    for name in list(r.data):
        if not isinstance(name, str) or not SEALED_NAME_RE.fullmatch(name):
            raise ConfigError(f"{r.source}: secrets: {shown(name)} is not a sealed secret "
                              "name (letters, digits, '_', '.', '-'; at most 64)")
        s = r.sub(name)
        raw = s.pop("pcrs", [])
        if not isinstance(raw, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in raw):
            raise s.err("pcrs", "expected a list of PCR numbers such as [0, 7]")
        if any(not 0 <= i <= 23 for i in raw):
            raise s.err("pcrs", "PCR numbers are 0 to 23")
        bank = _choice(s, "pcr_bank", PCR_BANKS, "sha256")
        s.done()
        out[name] = SealedSecretConfig(name, tuple(sorted(set(raw))), bank)
    r.data.clear()
    return out


def _number(value: object, where: str, source: str, example: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ConfigError(f"{source}: {where}: {shown(value)} is not a handle such as "
                              f"{example}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: {where}: expected a handle such as {example}, "
                          f"got {shown(value)}")
    return value


def _handle(value: object, where: str, source: str) -> int:
    value = _number(value, where, source, "0x81020000")
    # TPM 2.0 Part 2 §7.5: owner-hierarchy persistent range 0x81000000-0x817FFFFF.
    if not 0x81000000 <= value <= 0x81FFFFFF:
        raise ConfigError(
            f"{source}: {where}: {value:#x} is not a persistent handle (0x81000000-0x81FFFFFF)"
        )
    return value


def _choice(r: MappingReader, key: str, choices: tuple[str, ...], default: str) -> Any:
    v = r.string(key, default)
    if v not in choices:
        raise r.err(key, f"{shown(v)} is not one of {', '.join(choices)}")
    return v


def _key(r: MappingReader) -> KeyConfig:
    if "kind" not in r.data:
        raise r.err("kind", "is required (persistent, ek-derived or file)")
    kind = _choice(r, "kind", ("persistent", "ek-derived", "file"), "file")
    template = _choice(r, "template", TEMPLATES, "H-2")
    handle = _handle(r.pop("handle", DEFAULT_IDEVID_HANDLE), r.path("handle"), r.source)
    alg = _choice(r, "alg", FILE_ALGS, "ecc-p256")
    raw_nv = r.pop("cert_nv", None)
    cert_nv = None if raw_nv is None else _number(raw_nv, r.path("cert_nv"), r.source,
                                                  "0x01800100")
    if cert_nv is not None and not 0x01000000 <= cert_nv <= 0x01FFFFFF:
        raise r.err("cert_nv", f"{cert_nv:#x} is not an NV index (0x01000000 to 0x01ffffff)")
    iak = r.flag("iak", False)
    iak_handle = _handle(r.pop("iak_handle", DEFAULT_IAK_HANDLE), r.path("iak_handle"), r.source)
    if iak and iak_handle == handle:
        raise r.err("iak_handle", f"{iak_handle:#x} is the IDevID's own handle")
    r.done()
    return KeyConfig(kind=kind, template=template, handle=handle, alg=alg, cert_nv=cert_nv,
                     iak=iak, iak_handle=iak_handle)


def _check_url(r: MappingReader, url: str) -> None:
    """ConfigError unless ``url`` is an http(s) URL with a host and a port that exists."""
    if not re.match(r"^https?://", url):
        raise r.err("url", f"{shown(url)} must start with https://")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise r.err("url", f"{shown(url)} is not a usable URL ({e}; ports are 1 to 65535)"
                    ) from None
    if not parts.hostname:
        raise r.err("url", f"{shown(url)} names no host")
    if port is not None and not 1 <= port <= 65535:
        raise r.err("url", f"{shown(url)}: port {port} does not exist (1 to 65535)")


def _est(r: MappingReader) -> EstConfig:
    url = r.string("url", required=True)
    _check_url(r, url)
    a = r.sub("auth")
    client = a.pop("client")
    client_name: str | None = None
    client_files: ClientCertAuth | None = None
    if isinstance(client, str):
        client_name = client
    elif isinstance(client, Mapping):
        cr = MappingReader(client, a.path("client"), r.source)
        client_files = ClientCertAuth(cert=Path(cr.string("cert", required=True)),
                                      key=Path(cr.string("key", required=True)))
        cr.done()
    elif client is not None:
        raise a.err("client", "expected an identity name or {cert: PATH, key: PATH}")
    basic = None
    if "basic" in a.data:
        b = a.sub("basic")
        basic = BasicAuth(username=b.string("username", required=True),
                          password=_secret(b.pop("password"), b.path("password"), r.source))
        b.done()
    h = a.sub("headers")
    headers = tuple((k, _secret(v, h.path(str(k)), r.source)) for k, v in sorted(h.data.items()))
    h.data.clear()
    a.done()
    timeout = r.sub("timeout")
    connect = timeout.number("connect", 10.0, minimum=0.1, maximum=3600)
    read = timeout.number("read", 60.0, minimum=0.1, maximum=3600)
    total = timeout.duration("total", DEFAULT_EXCHANGE_DEADLINE_S)
    if not 1 <= total <= 86400:
        raise timeout.err("total", "must be between 1 s and 1 day")
    timeout.done()
    est = EstConfig(
        url=url,
        auth=EstAuth(client=client_name, client_files=client_files, basic=basic, headers=headers),
        trust_anchors=r.paths("trust_anchors"),
        issuer_anchors=r.paths("issuer_anchors"),
        pin=r.string("pin"),
        allow_http=r.flag("allow_http", False),
        pop=r.flag("pop", False),
        attestation=_choice(r, "attestation", ("off", "include", "required-by-server"), "off"),
        connect_timeout=connect,
        read_timeout=read,
        total_timeout=total,
        max_wait=r.duration("max_wait", 300),
        accept_rewritten_subject=r.flag("accept_rewritten_subject", False),
        accept_cmc_ra=r.flag("accept_cmc_ra", False),
        csrattrs=_choice(r, "csrattrs", CSRATTRS_MODES, "follow"),
        serverkeygen=r.flag("serverkeygen", False),
    )
    if url.startswith("http://") and not est.allow_http:
        raise r.err("url", f"{shown(url)} is plain HTTP; set allow_http: true if you really mean it")
    if est.pin is not None and not re.fullmatch(r"[0-9a-fA-F:]{64,95}", est.pin):
        raise r.err("pin", "expected a SHA-256 fingerprint (64 hex digits, colons allowed)")
    r.done()
    return est


def _renew(r: MappingReader) -> RenewConfig:
    d = RenewConfig()
    method = _choice(r, "method", ("simplereenroll", "simpleenroll"), d.method)
    rc = RenewConfig(
        threshold=r.amount("threshold", "80%"),
        retry=r.amount("retry", "4%"),
        jitter=r.amount("jitter", "2%"),
        rotate_key=r.flag("rotate_key", True),
        method=method,
        grace=r.duration("grace", 0),
        chain=r.flag("chain", False),
    )
    r.done()
    return rc


def _name_part(r: MappingReader, key: str, *, required: bool = False) -> str | None:
    """A subject attribute: at most 64 characters (RFC 5280 Appendix A upper bounds)."""
    value = r.string(key, required=required)
    if value is not None and len(value) > UB_NAME:
        raise r.err(key, f"{len(value)} characters; a certificate allows at most {UB_NAME} "
                         "(RFC 5280 Appendix A)")
    return value


def _identity(name: str, r: MappingReader) -> IdentityConfig:
    key = _key(r.sub("key")) if "key" in r.data else None
    if key is None:
        raise r.err("key", "is required")
    s = r.sub("subject")
    cn = _name_part(s, "cn", required=True)
    assert cn is not None
    subject = SubjectConfig(cn=cn, o=_name_part(s, "o"),
                            ou=_name_part(s, "ou"), serial_number=_name_part(s, "serial_number"))
    s.done()
    sr = r.sub("san")
    san = SanConfig(dns=sr.strings("dns", limit=253), ip=sr.strings("ip"),
                    uri=sr.strings("uri", limit=2048),
                    hardware_module_name=sr.flag("hardware_module_name", False))
    for ip in san.ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise sr.err("ip", f"{shown(ip)} is not an IP address") from None
    sr.done()
    profile = _choice(r, "profile", ("device", "ca"), "device")
    est = _est(r.sub("est")) if "est" in r.data else None
    renew = _renew(r.sub("renew"))
    hr = r.sub("hooks")
    hooks = HooksConfig(after_renew=hr.strings("after_renew"),
                        environment=hr.strings("environment", limit=128))
    for var in hooks.environment:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            raise hr.err("environment", f"{shown(var)} is not an environment variable name")
    if hooks.after_renew and not hooks.after_renew[0]:
        raise hr.err("after_renew", "the program (first item) is empty")
    hr.done()
    pkcs11 = _identity_pkcs11(r)
    r.done()
    return IdentityConfig(name=name, key=key, subject=subject, san=san, profile=profile,
                          est=est, renew=renew, hooks=hooks, pkcs11=pkcs11)


def _pkcs11_label(r: MappingReader, key: str, value: str) -> str:
    """An object or token label: printable, no staging suffix, at most 64 characters."""
    if len(value) > 64:
        raise r.err(key, f"{len(value)} characters; at most 64")
    if value.endswith(PKCS11_STAGING_SUFFIX):
        raise r.err(key, f"{shown(value)} ends in {PKCS11_STAGING_SUFFIX!r}, which tpmid "
                         "uses for keys still being enrolled")
    return value


def _identity_pkcs11(r: MappingReader) -> IdentityPkcs11:
    if "pkcs11" not in r.data:
        return IdentityPkcs11()
    raw = r.data["pkcs11"]
    if isinstance(raw, bool):
        r.pop("pkcs11")
        return IdentityPkcs11(enabled=raw, explicit=raw)
    p = r.sub("pkcs11")
    enabled = p.flag("enabled", True)
    label = p.string("label")
    if label is not None:
        label = _pkcs11_label(p, "label", label)
    p.done()
    return IdentityPkcs11(enabled=enabled, label=label, explicit=enabled)


def _pkcs11(r: MappingReader, store_dir: Path) -> Pkcs11Config | None:
    if "pkcs11" not in r.data:
        return None
    p = r.sub("pkcs11")
    if "user_pin" not in p.data:
        raise p.err("user_pin", "is required: the PIN the token's users log in with "
                                "({env: ...}, {file: ...} or {stdin: true})")
    user_pin = _secret(p.pop("user_pin"), p.path("user_pin"), r.source)
    so_pin = _secret(p.pop("so_pin"), p.path("so_pin"), r.source) if "so_pin" in p.data \
        else None
    token = p.string("token", DEFAULT_PKCS11_TOKEN)
    if len(token.encode()) > PKCS11_TOKEN_LABEL_MAX:
        raise p.err("token", f"{shown(token)} is longer than a PKCS#11 token label can be "
                             f"({PKCS11_TOKEN_LABEL_MAX} bytes)")
    store = Path(p.string("store", str(store_dir / "pkcs11")))
    library = Path(p.string("library", str(DEFAULT_PKCS11_LIBRARY)))
    p.done()
    return Pkcs11Config(store=store, user_pin=user_pin, token=token, so_pin=so_pin,
                        library=library)


def parse_config(data: object, source: str = "<config>") -> Config:
    """Build a :class:`Config` from a parsed YAML document; raise ConfigError on any mistake."""
    top = MappingReader(data, "", source)
    t = top.sub("tpm")
    ta = t.sub("auth")
    auth = HierarchyAuth(**{
        k: _secret(ta.pop(k), ta.path(k), source, sealable=False) if k in ta.data else None
        for k in ("owner", "endorsement", "lockout")
    })
    ta.done()
    lock = t.string("lock_file")
    tpm = TpmConfig(tcti=t.string("tcti", DEFAULT_TCTI), auth=auth,
                    lock_file=Path(lock) if lock else None,
                    timeout=t.duration("timeout", DEFAULT_TPM_TIMEOUT_S),
                    lock_timeout=t.duration("lock_timeout", DEFAULT_LOCK_TIMEOUT_S))
    if not 0.5 <= tpm.timeout <= 3600:
        raise t.err("timeout", "must be between 0.5 s and 1 hour")
    t.done()
    s = top.sub("store")
    store = StoreConfig(dir=Path(s.string("dir", str(DEFAULT_STORE_DIR))))
    s.done()
    pkcs11 = _pkcs11(top, store.dir)
    tr = top.sub("trust")
    trust = TrustConfig(est_anchors=tr.paths("est_anchors"),
                        use_system_store=tr.flag("use_system_store", False),
                        profile=_choice(tr, "profile", TRUST_PROFILES, "rfc5280"))
    tr.done()
    ids = top.sub("identities")
    identities: dict[str, IdentityConfig] = {}
    for name in list(ids.data):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}",
                                                         name):
            raise ConfigError(f"{source}: identities: {shown(name)} is not a valid identity "
                              "name (letters, digits, '_', '.', '-'; at most 64)")
        identities[name] = _identity(name, ids.sub(name))
    ids.done()
    sealed = _sealed_section(top.sub("secrets"))
    top.done()
    for ident in identities.values():
        if ident.est and ident.est.auth.client:
            other = ident.est.auth.client
            if other not in identities:
                raise ConfigError(
                    f"{source}: identities.{ident.name}.est.auth.client: "
                    f"no identity named {shown(other)}"
                )
            if other == ident.name:
                raise ConfigError(
                    f"{source}: identities.{ident.name}.est.auth.client: an identity cannot "
                    "bootstrap from itself"
                )
        if ident.renew.chain and not (ident.est and ident.est.auth.client):
            raise ConfigError(
                f"{source}: identities.{ident.name}.renew.chain: chaining renews this identity "
                "after the one in est.auth.client, and it has none"
            )
    with_iak = [i.name for i in identities.values() if i.key.iak]
    if len(with_iak) > 1:
        raise ConfigError(f"{source}: key.iak is set for {', '.join(with_iak)}; a device has "
                          "one IAK")
    for ident in identities.values():
        if ident.est and ident.est.attestation != "off" and not with_iak:
            raise ConfigError(
                f"{source}: identities.{ident.name}.est.attestation: evidence is signed by "
                "the IAK, and no identity has one",
                hint="set key.iak: true on the IDevID identity and provision it")
    _check_pkcs11_labels(identities, pkcs11, source)
    return Config(tpm=tpm, store=store, trust=trust, identities=identities, source=source,
                  pkcs11=pkcs11, sealed=sealed)


def _check_pkcs11_labels(identities: Mapping[str, IdentityConfig],
                         pkcs11: Pkcs11Config | None, source: str) -> None:
    """Per-identity ``pkcs11`` needs the top-level section; no two identities share a label."""
    seen: dict[str, str] = {}
    for ident in identities.values():
        if ident.pkcs11.explicit and pkcs11 is None:
            raise ConfigError(
                f"{source}: identities.{ident.name}.pkcs11: there is no top-level pkcs11 "
                "section naming the token (store, token, user_pin)",
                hint="add a top-level pkcs11 section with the token's store directory, label "
                     "and user_pin (see docs/config.md)")
        label = ident.pkcs11_label
        if ident.pkcs11.enabled and label in seen:
            raise ConfigError(
                f"{source}: identities.{ident.name}.pkcs11.label: {shown(label)} is already "
                f"the label of {seen[label]}; every key needs its own label")
        seen[label] = ident.name


def read_yaml_file(path: Path, what: str, missing_hint: str) -> Any:
    """The parsed YAML document at ``path``; ConfigError naming the file otherwise."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist", hint=missing_hint) from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is {len(raw)} bytes, more than a config file can "
                          f"be ({MAX_CONFIG_BYTES})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start} is "
                          f"{raw[e.start]:#04x}); is it the right file?") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file") from None


def load_config(path: Path) -> Config:
    """Read and parse the YAML config file at ``path``."""
    data = read_yaml_file(path, "config file",
                          "pass --config PATH or create it (see docs/config.md)")
    return parse_config(data, str(path))
