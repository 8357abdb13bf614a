"""Azure IoT Edge's ``/etc/aziot/config.toml`` and tpmid's config: import and export (pure).

:func:`import_aziot` maps IoT Edge's EST settings to a tpmid config and says,
for every key of the TOML file, whether it was mapped and to what, or why not:

* ``[cert_issuance.est]``: ``trusted_certs`` → ``trust.est_anchors``;
  ``[cert_issuance.est.urls]`` ``default`` (and per certificate: ``device-id``,
  ``aziot-edged-ca``) → each identity's ``est.url`` unless it names its own;
  ``[cert_issuance.est.auth]`` ``username``/``password`` → HTTP Basic (the
  password as a reference to a 0600 file: a secret never goes into tpmid's
  config), ``identity_cert``/``identity_pk`` and ``bootstrap_identity_*`` → the
  bootstrap identity: a TPM IDevID (``idevid``), because a software key file
  cannot become a TPM key (the report gives the tpmid way);
* ``[provisioning.attestation.identity_cert]`` (or ``.authentication`` for
  manual provisioning) with ``method = "est"`` → the LDevID (``ldevid``):
  ``common_name`` (default: ``registration_id``, as IoT Edge does), ``subject``,
  ``url``, per-certificate auth, ``auto_renew``;
* ``[edge_ca]`` with ``method = "est"`` → the Edge CA (``edge-ca``, profile
  ``ca``, authenticated with the LDevID); without ``common_name`` tpmid asks for
  IoT Edge's own default, ``aziot-edge CA``;
* ``auto_renew = {threshold, retry, rotate_key}`` in IoT Edge's units (``N%``,
  ``Nm`` minutes, ``Nd`` days) → ``renew``;
* the top-level ``pkcs11`` section IoT Edge's key service needs (unless
  ``pkcs11=False``), PINs as references to 0600 files; ``[aziot_keys]
  pkcs11_lib_path``/``pkcs11_base_slot`` naming tpm2-pkcs11 give its library and
  token label (kept, so URIs naming the token keep naming it; the PIN in
  ``pin-value`` is not copied);
* ``[tpm] tcti`` → ``tpm.tcti``.

Everything else (DPS and IoT Hub provisioning, the runtime, modules) is IoT
Edge's and is listed as not mapped, with the reason.

:func:`export_aziot` renders the IoT Edge fragment that makes IoT Edge use
tpmid's identities: X.509 attestation with the LDevID's ``fullchain.pem`` and
its PKCS#11 URI, the Edge CA likewise, and the PKCS#11 library and slot for
IoT Edge's key service.

Nothing here reads a file or the environment: the CLI does (``tpmid._cli.aziot``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tpmid.config import (
    DEFAULT_PKCS11_LIBRARY,
    DEFAULT_PKCS11_TOKEN,
    DEFAULT_STORE_DIR,
    DEFAULT_TCTI,
    PKCS11_TOKEN_LABEL_MAX,
)
from tpmid.errors import ConfigError
from tpmid.pkcs11.uri import parse_pkcs11_uri

Status = Literal["mapped", "not mapped"]

EDGE_CA_DEFAULT_CN = "aziot-edge CA"  # IoT Edge's default common_name for an EST Edge CA
DEFAULT_SECRETS_DIR = Path("/etc/tpmid")
DEFAULT_PASSWORD_FILE = Path("/etc/tpmid/est-password")
DEFAULT_PIN_FILE = Path("/etc/tpmid/pkcs11-user-pin")
DEFAULT_SO_PIN_FILE = Path("/etc/tpmid/pkcs11-so-pin")
# IoT Edge's certificate ids in [cert_issuance.est.urls] (aziotctl's names).
CERT_IDS = {"device-id": "ldevid", "aziot-edged-ca": "edge-ca"}

_IDEVID_REMEDY = (
    "tpmid authenticates the first enrollment with an IDevID whose key is in the TPM: "
    "provision one (`tpmid provision`, with the manufacturer's EST server), or adopt the "
    "one the TPM vendor provisioned (`tpmid provision --adopt` with the NV index of its "
    "certificate in --cert-nv); the imported config names it identity idevid (persistent "
    "H-2 key at 0x81020000)")
_IOT_EDGE_OWN = ("IoT Edge's own setting (runtime, modules, IoT Hub); it stays in IoT Edge's "
                 "config.toml")
_PROVISIONING = ("provisioning (DPS or IoT Hub registration) is IoT Edge's job; it stays in IoT "
                 "Edge's config.toml. `tpmid aziot export` writes the [provisioning.attestation] "
                 "that uses tpmid's LDevID")


@dataclass(frozen=True)
class Finding:
    """What became of one key of the TOML file."""

    key: str  # dotted path in the TOML document
    status: Status
    detail: str  # the tpmid key it became, or why it did not become one
    line: int | None = None
    remedy: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"key": self.key, "status": self.status, "detail": self.detail,
                "line": self.line, "remedy": self.remedy}


@dataclass
class ImportResult:
    """A tpmid config document and the report on every key of the IoT Edge file."""

    config: dict[str, Any]
    findings: list[Finding]
    decisions: list[str] = field(default_factory=list)  # choices tpmid made, in words
    actions: list[str] = field(default_factory=list)  # what the operator must still do

    @property
    def clean(self) -> bool:
        """Every key was mapped."""
        return all(f.status == "mapped" for f in self.findings)

    def not_mapped(self) -> list[Finding]:
        return [f for f in self.findings if f.status != "mapped"]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (``tpmid aziot import --json``)."""
        return {"clean": self.clean, "config": self.config,
                "findings": [f.to_json() for f in self.findings],
                "decisions": self.decisions, "actions": self.actions}


# --------------------------------------------------------------------------- reading TOML


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """The TOML document in ``text``; ConfigError naming the line for a malformed file."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        where = f"line {m.group(1)}, column {m.group(2)}" if m else "somewhere"
        what = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError(f"{source}: not valid TOML at {where}: {what}",
                          hint="fix that line; IoT Edge itself would refuse the file "
                          "(`iotedge config apply` parses it the same way)") from None


def key_lines(text: str) -> dict[str, int]:
    """Dotted key path → line number, for the keys and tables a TOML file writes plainly.

    Enough to point at ``identity_pk = ...`` under ``[cert_issuance.est.auth]``;
    keys inside inline tables get the line of their table's key.
    """
    lines: dict[str, int] = {}
    table = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", line)
        if m:
            table = ".".join(p.strip().strip('"\'') for p in m.group(1).split("."))
            lines.setdefault(table, n)
            continue
        m = re.match(r"^([A-Za-z0-9_\-.\"' ]+?)\s*=", line)
        if m:
            key = ".".join(p.strip().strip('"\'') for p in m.group(1).split("."))
            lines.setdefault(f"{table}.{key}" if table else key, n)
    return lines


def _leaves(doc: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Every key path that holds a value (tables are walked; an empty table is a leaf)."""
    for key, value in doc.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if value:
                yield from _leaves(value, path)
            else:
                yield path
        else:
            yield path


# --------------------------------------------------------------------------- the mapping


def parse_amount(value: object) -> str | None:
    """IoT Edge's ``threshold``/``retry`` (``80%``, ``10m``, ``4d``) in tpmid's words, or None."""
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(%|m|d)\s*", value)
    if not m:
        return None
    number, unit = int(m.group(1)), m.group(2)
    if unit == "%":
        return f"{number}%" if number <= 100 else None
    return f"{number}min" if unit == "m" else f"{number}d"


def is_url(value: object) -> bool:
    """An http(s) URL that is not a walkthrough's placeholder (``https://<YOUR-ENDPOINT>``)."""
    return (isinstance(value, str) and value.startswith(("https://", "http://"))
            and not re.search(r"[<>\s]", value))


def _why_not_url(value: object) -> str:
    if isinstance(value, str) and re.search(r"[<>]", value):
        return "still a placeholder (<...>): put the EST server's URL there"
    return "not an http(s) URL"


def _file_uri(value: object) -> Path | None:
    if isinstance(value, str) and value.startswith("file://"):
        path = value[len("file://"):]
        return Path(path) if path.startswith("/") else None
    return None


class _Importer:
    """One import: walks the document, builds the config, records a finding per key."""

    def __init__(self, doc: dict[str, Any], lines: Mapping[str, int], *,
                 serial: str | None, store_dir: Path, secrets_dir: Path, pkcs11: bool) -> None:
        self.doc = doc
        self.lines = lines
        self.serial = serial
        self.store_dir = store_dir
        self.password_file = secrets_dir / DEFAULT_PASSWORD_FILE.name
        self.pin_file = secrets_dir / DEFAULT_PIN_FILE.name
        self.so_pin_file = secrets_dir / DEFAULT_SO_PIN_FILE.name
        self.want_pkcs11 = pkcs11
        self.findings: dict[str, Finding] = {}
        self.decisions: list[str] = []
        self.actions: list[str] = []
        self.config: dict[str, Any] = {}
        self.identities: dict[str, dict[str, Any]] = {}

    # -- recording --------------------------------------------------------------------

    def _line(self, key: str) -> int | None:
        parts = key.split(".")
        while parts:
            n = self.lines.get(".".join(parts))
            if n is not None:
                return n
            parts.pop()
        return None

    def mapped(self, key: str, to: str) -> None:
        self.findings[key] = Finding(key, "mapped", to, self._line(key))

    def unmapped(self, key: str, why: str, remedy: str | None = None) -> None:
        self.findings[key] = Finding(key, "not mapped", why, self._line(key), remedy)

    def under(self, prefix: str, status: Status, detail: str, remedy: str | None = None) -> None:
        """Record every leaf under ``prefix`` not recorded yet."""
        node = _get(self.doc, prefix)
        if node is None:
            return
        keys = [prefix] if not isinstance(node, Mapping) or not node else \
            [f"{prefix}.{k}" for k in _leaves(node)]
        for key in keys:
            if key not in self.findings:
                self.findings[key] = Finding(key, status, detail, self._line(key),
                                             remedy if status != "mapped" else None)

    # -- sections ---------------------------------------------------------------------

    def run(self) -> ImportResult:
        est = _table(self.doc, "cert_issuance.est")
        defaults = self._est_defaults(est)
        ldevid_path, ldevid = self._ldevid_section()
        if ldevid is not None:
            self._identity("ldevid", ldevid_path, ldevid, defaults, profile="device")
        edge = _table(self.doc, "edge_ca")
        if edge is not None:
            if edge.get("method") == "est":
                self._identity("edge-ca", "edge_ca", edge, defaults, profile="ca")
            else:
                self.under("edge_ca", "not mapped",
                           "an Edge CA that IoT Edge makes itself (quickstart) or reads from "
                           "files; tpmid enrolls an Edge CA over EST only (method = \"est\")")
        self._pkcs11()
        self._tpm()
        self._rest()
        self._assemble(defaults)
        findings = [self.findings[k] for k in sorted(
            self.findings, key=lambda k: (self.findings[k].line or 10**9, k))]
        return ImportResult(self.config, findings, self.decisions, self.actions)

    def _est_defaults(self, est: dict[str, Any] | None) -> dict[str, Any]:
        """[cert_issuance.est]: anchors, URLs and authentication every identity starts from."""
        d: dict[str, Any] = {"urls": {}, "auth": {}}
        if est is None:
            return d
        anchors: list[str] = []
        certs = est.get("trusted_certs")
        if certs is not None:
            items = certs if isinstance(certs, list) else [certs]
            for uri in items:
                anchor = _file_uri(uri)
                if anchor is not None:
                    anchors.append(str(anchor))
            if anchors and len(anchors) == len(items):
                self.mapped("cert_issuance.est.trusted_certs", "trust.est_anchors")
            elif anchors:
                self.mapped("cert_issuance.est.trusted_certs",
                            "trust.est_anchors (the file:// entries only)")
                self.decisions.append("trusted_certs entries that are not file:// URIs were left "
                                      "out: tpmid reads anchors from files")
            else:
                self.unmapped("cert_issuance.est.trusted_certs",
                              "no file:// URI: tpmid reads trust anchors from files")
        if anchors:
            self.config["trust"] = {"est_anchors": anchors}
        urls = est.get("urls")
        if isinstance(urls, Mapping):
            for key, url in urls.items():
                where = f"cert_issuance.est.urls.{key}"
                if not is_url(url):
                    self.unmapped(where, _why_not_url(url))
                elif key == "default":
                    d["urls"]["default"] = url
                    self.mapped(where, "est.url of every identity that names no URL of its own")
                elif key in CERT_IDS:
                    d["urls"][CERT_IDS[key]] = url
                    self.mapped(where, f"identities.{CERT_IDS[key]}.est.url")
                else:
                    self.unmapped(where, f"{key!r} is not a certificate tpmid enrolls "
                                        "(device-id, aziot-edged-ca)")
            if not urls:
                self.mapped("cert_issuance.est.urls", "nothing to map: each identity names "
                                                     "its own URL")
        d["auth"] = self._auth("cert_issuance.est.auth", _table(self.doc, "cert_issuance.est.auth")
                               or {})
        for key in ("username", "password", "identity_cert", "identity_pk",
                    "bootstrap_identity_cert", "bootstrap_identity_pk"):
            # The super-config form writes these directly under [cert_issuance.est] too.
            if key in est:
                d["auth"].update(self._auth("cert_issuance.est", {key: est[key]}))
        return d

    def _auth(self, where: str, auth: Mapping[str, Any]) -> dict[str, Any]:
        """username/password and the EST identity of one section; records findings."""
        out: dict[str, Any] = {}
        if "username" in auth:
            out["username"] = auth["username"]
            self.mapped(f"{where}.username", "est.auth.basic.username")
        if "password" in auth:
            out["password"] = True
            self.mapped(f"{where}.password",
                        f"est.auth.basic.password: {{file: {self.password_file}}} (the "
                        "password itself is not copied: tpmid keeps no secret in its config)")
            action = (f"write the EST password to {self.password_file} (mode 0600, owned by "
                      "the user running tpmid), or point est.auth.basic.password elsewhere")
            if action not in self.actions:
                self.actions.append(action)
        for cert_key, key_key in (("identity_cert", "identity_pk"),
                                  ("bootstrap_identity_cert", "bootstrap_identity_pk")):
            if cert_key in auth or key_key in auth:
                out["bootstrap"] = True
            if cert_key in auth:
                self.unmapped(f"{where}.{cert_key}",
                              "the certificate of an EST identity whose key is outside the "
                              "TPM; tpmid authenticates with its TPM IDevID (identity idevid) "
                              "instead", _IDEVID_REMEDY)
            if key_key in auth:
                self._identity_key(f"{where}.{key_key}", auth[key_key])
        return out

    def _identity_key(self, path: str, value: Any) -> None:
        if isinstance(value, str) and value.startswith("pkcs11:"):
            tpm = self._tpm2_pkcs11_library()
            why = ("a TPM object in tpm2-pkcs11: the URI is kept in IoT Edge's config and "
                   "still names that key there, but tpmid authenticates only with keys it made "
                   "itself" if tpm else "a PKCS#11 object of a library that is not tpm2-pkcs11, "
                   "so not a TPM key")
            self.unmapped(path, why, _IDEVID_REMEDY)
        else:
            where = _file_uri(value)
            what = f" ({where})" if where else ""
            self.unmapped(path, f"a software key file{what} cannot become a TPM key",
                          _IDEVID_REMEDY)

    def _ldevid_section(self) -> tuple[str, dict[str, Any] | None]:
        for where in ("provisioning.attestation.identity_cert",
                      "provisioning.authentication.identity_cert"):
            node = _get(self.doc, where)
            if node is None:
                continue
            if isinstance(node, Mapping) and node.get("method") == "est":
                return where, dict(node)
            self.under(where, "not mapped",
                       "a device identity certificate IoT Edge reads from a file or makes "
                       "itself; tpmid enrolls the LDevID over EST only (method = \"est\")")
        return "", None

    def _subject(self, where: str, section: Mapping[str, Any], name: str,
                 default_cn: str | None) -> dict[str, str]:
        subject: dict[str, str] = {}
        if "common_name" in section:
            subject["cn"] = str(section["common_name"])
            self.mapped(f"{where}.common_name", f"identities.{name}.subject.cn")
        raw = section.get("subject")
        if isinstance(raw, Mapping):
            known = {"CN": "cn", "O": "o", "OU": "ou", "serialNumber": "serial_number"}
            for attr, value in raw.items():
                key = f"{where}.subject.{attr}"
                if attr in known and isinstance(value, str):
                    subject.setdefault(known[attr], value)
                    self.mapped(key, f"identities.{name}.subject.{known[attr]}")
                else:
                    self.unmapped(key, "tpmid's subjects have CN, O, OU and serialNumber only")
        elif raw is not None:
            self.unmapped(f"{where}.subject", "expected a table of attributes (CN = ...)")
        if "cn" not in subject:
            subject["cn"] = default_cn or name
        if self.serial and "serial_number" not in subject:
            subject["serial_number"] = self.serial
        return subject

    def _identity(self, name: str, where: str, section: dict[str, Any],
                  defaults: dict[str, Any], *, profile: str) -> None:
        self.mapped(f"{where}.method", f"identities.{name} (enrolled over EST)")
        reg_key = next((k for k in ("provisioning.attestation.registration_id",
                                    "provisioning.device_id")
                        if isinstance(_get(self.doc, k), str)), None)
        reg = _get(self.doc, reg_key) if reg_key else None
        if profile == "device":
            subject = self._subject(where, section, name, reg if isinstance(reg, str) else None)
            if "common_name" not in section and "subject" not in section:
                if reg_key is not None:
                    self.mapped(reg_key,
                                "identities.ldevid.subject.cn (IoT Edge's default common name "
                                "of the device identity); it stays in IoT Edge's config too")
                self.decisions.append(
                    f"the LDevID's common name is {subject['cn']!r} (IoT Edge's default: "
                    "the registration id)" if isinstance(reg, str) else
                    "the LDevID has no common_name: tpmid asks for CN 'ldevid'")
        else:
            subject = self._subject(where, section, name, EDGE_CA_DEFAULT_CN)
            if "common_name" not in section and "subject" not in section:
                self.decisions.append(
                    f"[edge_ca] has no common_name: tpmid asks for CN {EDGE_CA_DEFAULT_CN!r}, "
                    "IoT Edge's own default for an Edge CA issued over EST (it must differ "
                    "from the device id and host name)")
        url = section.get("url")
        if is_url(url):
            self.mapped(f"{where}.url", f"identities.{name}.est.url")
        else:
            if url is not None:
                self.unmapped(f"{where}.url", _why_not_url(url))
            url = defaults["urls"].get(name) or defaults["urls"].get("default")
        auth = dict(defaults["auth"])
        auth.update(self._auth(where, section))
        renew = self._renew(f"{where}.auto_renew", section.get("auto_renew"), name)
        if "expiry_days" in section:
            self.unmapped(f"{where}.expiry_days", "the EST server decides the lifetime; tpmid "
                                                  "asks for none")
        ident: dict[str, Any] = {"key": {"kind": "file", "alg": "ecc-p256"}, "subject": subject}
        if profile == "ca":
            ident["profile"] = "ca"
        est: dict[str, Any] = {"url": url, "auth": {}}
        if profile == "ca":
            est["auth"]["client"] = "ldevid"
        elif auth.get("bootstrap"):
            est["auth"]["client"] = "idevid"
        if auth.get("username") is not None:
            basic: dict[str, Any] = {"username": str(auth["username"])}
            if auth.get("password"):
                basic["password"] = {"file": str(self.password_file)}
            est["auth"]["basic"] = basic
        if not est["auth"]:
            del est["auth"]
        ident["est"] = est
        if renew:
            ident["renew"] = renew
        self.identities[name] = ident
        self.under(where, "not mapped", "not an IoT Edge EST setting tpmid knows")

    def _renew(self, where: str, section: Any, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if section is None:
            return out
        if not isinstance(section, Mapping):
            self.unmapped(where, "expected a table (threshold, retry, rotate_key)")
            return out
        for key in ("threshold", "retry"):
            if key in section:
                value = parse_amount(section[key])
                if value is None:
                    self.unmapped(f"{where}.{key}",
                                  f"{section[key]!r} is not an IoT Edge amount (N%, Nm or Nd); "
                                  f"tpmid's default applies")
                else:
                    out[key] = value
                    self.mapped(f"{where}.{key}", f"identities.{name}.renew.{key}: {value}")
        if "rotate_key" in section:
            if isinstance(section["rotate_key"], bool):
                out["rotate_key"] = section["rotate_key"]
                self.mapped(f"{where}.rotate_key", f"identities.{name}.renew.rotate_key")
            else:
                self.unmapped(f"{where}.rotate_key", "expected true or false")
        return out

    def _tpm2_pkcs11_library(self) -> bool:
        lib = _get(self.doc, "aziot_keys.pkcs11_lib_path")
        return isinstance(lib, str) and "tpm2_pkcs11" in Path(lib).name

    def _pkcs11(self) -> None:
        """[aziot_keys] and the top-level ``pkcs11`` section (on unless the caller says no)."""
        keys = _table(self.doc, "aziot_keys") or {}
        lib = keys.get("pkcs11_lib_path")
        section: dict[str, Any] = {"library": str(DEFAULT_PKCS11_LIBRARY),
                                   "token": DEFAULT_PKCS11_TOKEN,
                                   "user_pin": {"file": str(self.pin_file)},
                                   "so_pin": {"file": str(self.so_pin_file)}}
        if lib is not None and not self._tpm2_pkcs11_library():
            self.unmapped("aziot_keys.pkcs11_lib_path",
                          f"{lib!r} is not tpm2-pkcs11: keys in it are not TPM keys, and tpmid "
                          "keeps its keys in the TPM")
            self.under("aziot_keys", "not mapped", "belongs to that PKCS#11 library")
        elif lib is not None:
            section["library"] = str(lib)
            self.mapped("aziot_keys.pkcs11_lib_path", "pkcs11.library")
            slot = keys.get("pkcs11_base_slot")
            attrs: dict[str, str] = {}
            if isinstance(slot, str):
                try:
                    attrs = parse_pkcs11_uri(slot)
                except ValueError:
                    attrs = {}
            token = attrs.get("token")
            if token and len(token.encode()) <= PKCS11_TOKEN_LABEL_MAX:
                section["token"] = token
                self.mapped("aziot_keys.pkcs11_base_slot",
                            f"pkcs11.token: {token!r} (kept: IoT Edge's URIs name that token "
                            "by its label; the PIN in pin-value is not copied)")
            elif slot is not None:
                self.unmapped("aziot_keys.pkcs11_base_slot",
                              "names no token label (a slot-id, or not a pkcs11: URI); tpmid "
                              f"uses token {DEFAULT_PKCS11_TOKEN!r}")
            if "pin-value" in attrs:
                self.decisions.append(
                    "the user PIN of pkcs11_base_slot (pin-value) was not copied: tpmid keeps "
                    "no secret in its config")
        self.under("aziot_keys", "not mapped", "IoT Edge's key service setting; "
                   "`tpmid aziot export` writes the [aziot_keys] that uses tpmid's token")
        if not self.want_pkcs11:
            self.decisions.append("no pkcs11 section (--no-pkcs11): IoT Edge cannot use the "
                                  "LDevID and Edge CA keys, and `tpmid aziot export` refuses")
            return
        section["store"] = str(self.store_dir / "pkcs11")
        self.config["pkcs11"] = section
        self.decisions.append(
            f"the LDevID and Edge CA keys are linked into PKCS#11 token {section['token']!r} "
            f"(tpm2-pkcs11 store {section['store']}); `tpmid pkcs11 list` shows their URIs")
        self.actions.append(
            f"write the token's user PIN to {self.pin_file} and its security officer PIN to "
            f"{self.so_pin_file} (mode 0600, owned by the user running tpmid); tpmid creates "
            "the token at the first enrollment")

    def _tpm(self) -> None:
        tcti = _get(self.doc, "tpm.tcti")
        if isinstance(tcti, str) and tcti:
            # tpm2-tss's "device" alone means the kernel resource manager first.
            self.config["tpm"] = {"tcti": DEFAULT_TCTI if tcti == "device" else tcti}
            self.mapped("tpm.tcti", "tpm.tcti")
        self.under("tpm", "not mapped", "TPM attestation with DPS is IoT Edge's")

    def _rest(self) -> None:
        """Everything not looked at so far: IoT Edge's own, with the reason."""
        for key in _leaves(self.doc):
            if key in self.findings:
                continue
            top = key.split(".")[0]
            if top == "provisioning":
                self.unmapped(key, _PROVISIONING)
            elif top == "cert_issuance":
                self.unmapped(key, "a certificate tpmid does not enroll (tpmid enrolls the "
                                   "device identity and the Edge CA)")
            elif top in ("preloaded_keys", "preloaded_certs"):
                self.unmapped(key, "a key or certificate IoT Edge's services load from a file "
                                   "or URI; tpmid's come from its own store and token")
            elif top in _IOT_EDGE_SECTIONS:
                self.unmapped(key, _IOT_EDGE_OWN)
            else:
                self.unmapped(key, "unknown to tpmid (and not one of IoT Edge's documented "
                                   "sections)")

    def _assemble(self, defaults: dict[str, Any]) -> None:
        ids: dict[str, Any] = {}
        needs_idevid = any(i.get("est", {}).get("auth", {}).get("client") == "idevid"
                           for i in self.identities.values())
        if needs_idevid:
            idevid: dict[str, Any] = {
                "key": {"kind": "persistent", "template": "H-2", "handle": 0x81020000},
                "subject": {"cn": "IDevID"}}
            if self.serial:
                idevid["subject"]["serial_number"] = self.serial
            ids["idevid"] = idevid
            self.actions.append("provision the TPM IDevID (identity idevid) before the first "
                                "enrollment: `tpmid provision`, or `tpmid provision --adopt` for a "
                                "vendor-provisioned one")
        ids.update(self.identities)
        for name, ident in ids.items():
            est = ident.get("est")
            if est is not None and not est.get("url"):
                self.actions.append(f"set identities.{name}.est.url: the IoT Edge config names "
                                    "no EST URL for it")
                est["url"] = "https://est.invalid/.well-known/est"
        if self.identities and not self.serial:
            self.decisions.append(
                "the subjects carry no serialNumber (pass --serial to give them the device "
                "serial): EST servers that bind subjects to the client's serialNumber, such as "
                "tpmid's reference server, refuse them")
        self.config.setdefault("tpm", {"tcti": DEFAULT_TCTI})
        self.config["store"] = {"dir": str(self.store_dir)}
        self.config["identities"] = ids
        order = ("tpm", "store", "trust", "pkcs11", "identities")
        self.config = {k: self.config[k] for k in order if k in self.config}


_IOT_EDGE_SECTIONS = frozenset({
    "hostname", "local_gateway_hostname", "parent_hostname", "trust_bundle_cert",
    "allow_elevated_docker_permissions", "homedir", "prefer_module_identity_cache",
    "auto_reprovisioning_mode", "additional_info", "iotedge_max_requests", "agent", "connect",
    "listen", "watchdog", "moby_runtime", "image_garbage_collection", "edge_ca", "aziot_keys",
    "imds", "mqtt_broker"})


def _get(doc: Mapping[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _table(doc: Mapping[str, Any], path: str) -> dict[str, Any] | None:
    node = _get(doc, path)
    return dict(node) if isinstance(node, Mapping) else None


def import_aziot(text: str, source: str, *, serial: str | None = None,
                 store_dir: Path = DEFAULT_STORE_DIR, secrets_dir: Path = DEFAULT_SECRETS_DIR,
                 pkcs11: bool = True) -> ImportResult:
    """Map IoT Edge's config ``text`` to a tpmid config; see the module docstring.

    ConfigError for a malformed file (with the line). ``serial`` becomes the
    serialNumber of every identity's subject; ``secrets_dir`` is where the config
    expects the EST password and the token PINs (files, never in the config);
    ``pkcs11`` adds the top-level ``pkcs11`` section IoT Edge's key service needs.
    """
    doc = parse_toml(text, source)
    return _Importer(doc, key_lines(text), serial=serial, store_dir=store_dir,
                     secrets_dir=secrets_dir, pkcs11=pkcs11).run()


# --------------------------------------------------------------------------- export


def toml_string(value: str) -> str:
    """A TOML basic string (quotes, backslashes and control characters escaped)."""
    out = []
    for c in value:
        if c in "\"\\":
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


@dataclass(frozen=True)
class ExportIdentity:
    """One identity as IoT Edge is to use it: its certificate file and key URI."""

    fullchain: Path
    key_uri: str  # with pin-value: a secret


def export_aziot(*, source: str, registration_id: str, ldevid: ExportIdentity,
                 edge_ca: ExportIdentity | None, library: Path, base_slot: str) -> str:
    """IoT Edge's ``config.toml`` fragment that uses tpmid's identities (holds the PIN)."""
    lines = [
        f"# Written by `tpmid aziot export` from {source}.",
        "# Merge into /etc/aziot/config.toml (replacing IoT Edge's own [provisioning.attestation]",
        "# and [edge_ca] EST settings), then run `iotedge config apply`. The pkcs11: URIs carry",
        "# the token's user PIN (pin-value): keep this file 0600.",
        "",
        "[provisioning.attestation]",
        'method = "x509"',
        f"registration_id = {toml_string(registration_id)}",
        f"identity_cert = {toml_string(ldevid.fullchain.as_uri())}",
        f"identity_pk = {toml_string(ldevid.key_uri)}",
    ]
    if edge_ca is not None:
        lines += ["", "[edge_ca]", f"cert = {toml_string(edge_ca.fullchain.as_uri())}",
                  f"pk = {toml_string(edge_ca.key_uri)}"]
    lines += ["", "[aziot_keys]", f"pkcs11_lib_path = {toml_string(str(library))}",
              f"pkcs11_base_slot = {toml_string(base_slot)}", ""]
    return "\n".join(lines)


__all__ = ["DEFAULT_PKCS11_LIBRARY", "ExportIdentity", "Finding", "ImportResult",
           "export_aziot", "import_aziot", "key_lines", "parse_amount", "parse_toml",
           "toml_string"]
