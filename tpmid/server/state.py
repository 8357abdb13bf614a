"""The server directory: layout, ``init_server_dir`` and loading it back.

Layout (``DIR``)::

    config.yaml            0600  labels, lifetimes, auth (hashes only), behaviours
    tls-ca.pem             0644  trust this for the server's TLS (curl --cacert)
    manufacturer-ca.pem    0644  issues IDevIDs     (served by /idevid/cacerts)
    operator-ca.pem        0644  issues LDevIDs and Edge CAs (/ldevid, /edgeca)
    tls/server.pem         0644  the server's TLS certificate (127.0.0.1, ::1, localhost)
    private/               0700  manufacturer-ca.key, operator-ca.key, tls-ca.key, server.key (0600)
    issued.jsonl           0644  one JSON line per issued certificate
    lab.yaml               0600  lab overrides per label (``tpmid est-server label``)
    run.json, run.lock           the running server (``tpmid est-server run``), see lab.py

``init_server_dir(dir, tls_from=LABEL)`` makes no TLS CA: the server's TLS
certificate is issued by that label's CA, and ``tls-ca.pem`` is a copy of that
CA's certificate, so that a client pinning the label's root (a ``/cacerts``
bootstrap, RFC 7030 §4.1.1) authenticates the server.

Writes go through tpmid's one durable writer (:func:`tpmid.store.fsio.atomic_write`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from tpmid.errors import ConfigError
from tpmid.server.auth import generate_secret, hash_secret
from tpmid.server.ca import (
    CertificateAuthority,
    cert_pem,
    create_root_ca,
    fingerprint,
    generate_key,
    key_pem,
    load_ca,
    loopback_san,
)
from tpmid.server.config import ALGS, YEAR, ServerConfig, load_server_config
from tpmid.store.fsio import atomic_write

DEFAULT_PORT = 8443
CA_LIFETIME = 25 * YEAR
TLS_CERT_LIFETIME = 10 * YEAR
CA_TITLES = {
    "manufacturer": "tpmid Manufacturer CA (IDevID)",
    "operator": "tpmid Operator CA (LDevID, Edge CA)",
    "tls": "tpmid TLS CA",
}


@dataclass(frozen=True)
class ServerPaths:
    """Where everything lives under a server directory."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def private(self) -> Path:
        return self.dir / "private"

    @property
    def tls_cert(self) -> Path:
        return self.dir / "tls" / "server.pem"

    @property
    def tls_key(self) -> Path:
        return self.private / "server.key"

    @property
    def issued_log(self) -> Path:
        return self.dir / "issued.jsonl"

    @property
    def lab(self) -> Path:
        """Lab overrides on top of config.yaml (:mod:`tpmid.server.lab`)."""
        return self.dir / "lab.yaml"

    @property
    def run_file(self) -> Path:
        """What the running server tells the lab commands: pid, URL, reloads."""
        return self.dir / "run.json"

    @property
    def run_lock(self) -> Path:
        """Held by the running server for as long as it runs."""
        return self.dir / "run.lock"

    def ca_cert(self, name: str) -> Path:
        """``DIR/<name>-ca.pem``."""
        return self.dir / f"{name}-ca.pem"

    def ca_key(self, name: str) -> Path:
        """``DIR/private/<name>-ca.key``."""
        return self.private / f"{name}-ca.key"


@dataclass(frozen=True)
class InitResult:
    """What ``init_server_dir`` created. ``secret`` is shown once and stored nowhere."""

    dir: Path
    secret: str = field(repr=False)
    tls_ca_path: Path
    manufacturer_ca_path: Path
    operator_ca_path: Path
    config_path: Path
    alg: str
    fingerprints: dict[str, str]
    labels: tuple[str, ...] = ("idevid", "ldevid", "edgeca")
    tls_from: str | None = None  # the label whose CA issued the TLS certificate

    def urls(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> dict[str, str]:
        """The label base URLs the server will serve on ``host:port``."""
        return {label: est_url(host, port, label) for label in self.labels}


def est_url(host: str, port: int, label: str | None = None, operation: str | None = None) -> str:
    """``https://host:port/.well-known/est[/label][/operation]`` (IPv6 hosts bracketed)."""
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"https://{h}:{port}/.well-known/est"
    if label:
        url += f"/{label}"
    if operation:
        url += f"/{operation}"
    return url


def _config_text(alg: str, secret_hash: str) -> str:
    return f"""\
# tpmid reference EST server configuration (see docs/est-server.md).
# Re-read on SIGHUP (tpmid est-server run) or EstServer.reload().
# Label-less requests (/.well-known/est/<operation>) go to the default label.
default_label: ldevid

tls:
  min_version: "1.2"
  max_version: "1.3"

labels:
  # IDevID (birth certificate): manufacturer CA, static Secret-Value header
  # as on GlobalSign's IDevID endpoint. Only the salted hash is stored here.
  idevid:
    ca: manufacturer
    profile: idevid
    lifetime: 20y            # capped by the CA's own notAfter
    auth:
      secret_value:
        header: Secret-Value
        hash: "{secret_hash}"
    # The factory names the device: whoever holds the secret may ask for any subject.
    subject_policy: any
    csrattrs: {_default_csrattrs_yaml(alg)}

  # LDevID (device identity): operator CA; the client certificate is the
  # IDevID (manufacturer CA) at first enrollment, the LDevID when renewing.
  ldevid:
    ca: operator
    profile: ldevid
    lifetime: 7day
    auth:
      client_cert:
        issuers: [manufacturer, operator]
    # The subject's serialNumber must be the client certificate's: a device gets
    # certificates for itself only, never for another device's serial.
    subject_policy: client-serial
    csrattrs: {_default_csrattrs_yaml(alg)}

  # Edge CA: operator CA, CA:TRUE pathlen 0; authenticated by the LDevID
  # (an Edge CA certificate cannot be a TLS client certificate itself).
  edgeca:
    ca: operator
    profile: edgeca
    lifetime: 30day
    auth:
      client_cert:
        issuers: [operator]
    # The Edge CA carries the serialNumber of the LDevID that asks for it.
    subject_policy: client-serial
    csrattrs: {_default_csrattrs_yaml(alg)}

# Behaviours and fault knobs, per label (all off by default):
#   pending: 2               first N requests per CSR key get 202 + Retry-After
#   retry_after: 5s
#   reenroll_forcing: true   GlobalSign default: subject copied from a presented
#                            certificate of this label's CA
#   libest_quirks: true      reject a one-line base64 body without newline
#   pop: true                require tls-unique in challengePassword (TLS 1.2)
#   faults: {{status: 503, retry_after: 3s, malformed_body: true,
#            wrong_content_type: true, delay: 2s, wrong_key: true,
#            operations: [simpleenroll], times: 1}}
"""


def default_csrattrs(alg: str) -> list[object]:
    """The CSR attributes a label asks for by default (RFC 7030 §4.5.2).

    The key type and curve of the CA, and the matching signature algorithm.
    """
    if alg == "rsa-2048":
        return ["1.2.840.113549.1.1.11"]  # sha256WithRSAEncryption
    curve, sig = (("1.3.132.0.34", "1.2.840.10045.4.3.3") if alg == "ecc-p384"
                  else ("1.2.840.10045.3.1.7", "1.2.840.10045.4.3.2"))
    # id-ecPublicKey with the curve as value, then ecdsa-with-SHA256/384.
    return [{"type": "1.2.840.10045.2.1", "values": [curve]}, sig]


def _default_csrattrs_yaml(alg: str) -> str:
    items = []
    for item in default_csrattrs(alg):
        if isinstance(item, str):
            items.append(f'"{item}"')
        else:
            assert isinstance(item, dict)
            vals = ", ".join(f'"{v}"' for v in item["values"])
            items.append(f'{{type: "{item["type"]}", values: [{vals}]}}')
    return "[" + ", ".join(items) + "]"


# The labels init creates and the CA of each (see _config_text).
INIT_LABEL_CAS = {"idevid": "manufacturer", "ldevid": "operator", "edgeca": "operator"}


def init_server_dir(dir: Path, alg: str = "ecc-p256", *, tls_from: str | None = None) -> InitResult:
    """Create a server directory: the CAs, the TLS certificate, config and IDevID secret.

    Refuses a directory that already holds a server config. The returned
    ``secret`` is the only copy of the IDevID Secret-Value; the directory keeps
    its salted hash. By default a TLS CA of its own issues the server's TLS
    certificate; with ``tls_from`` (a label) that label's CA does, so a client that
    pins the label's root can bootstrap ``/cacerts`` against this server.
    """
    if alg not in ALGS:
        raise ConfigError(f"unknown algorithm {alg!r}; use one of {', '.join(ALGS)}")
    if tls_from is not None and tls_from not in INIT_LABEL_CAS:
        raise ConfigError(f"--tls-from {tls_from!r} is not a label of a new server",
                          hint=f"use one of {', '.join(INIT_LABEL_CAS)} (its CA issues the "
                          "TLS certificate)")
    paths = ServerPaths(dir.resolve())
    if paths.config.exists():
        raise ConfigError(f"{paths.dir} already holds an EST server (config.yaml exists)",
                          hint="choose an empty directory, or remove the old one first")
    if not paths.dir.exists():
        paths.dir.mkdir(mode=0o755, parents=True)
    paths.private.mkdir(mode=0o700, exist_ok=True)
    os.chmod(paths.private, 0o700)
    paths.tls_cert.parent.mkdir(mode=0o755, exist_ok=True)

    cas = {
        "manufacturer": create_root_ca("manufacturer", CA_TITLES["manufacturer"], alg,
                                       CA_LIFETIME, path_length=0),
        # pathlen unset: the operator CA issues Edge CAs, which issue in turn.
        "operator": create_root_ca("operator", CA_TITLES["operator"], alg, CA_LIFETIME,
                                   path_length=None),
    }
    if tls_from is None:
        cas["tls"] = create_root_ca("tls", CA_TITLES["tls"], alg, CA_LIFETIME, path_length=0)
    for name, ca in cas.items():
        atomic_write(paths.ca_key(name), key_pem(ca.key), 0o600)
        atomic_write(paths.ca_cert(name), cert_pem(ca.cert), 0o644)
    tls_issuer = cas["tls"] if tls_from is None else cas[INIT_LABEL_CAS[tls_from]]
    if tls_from is not None:
        # Clients that trust tls-ca.pem keep working: it is the issuing CA's certificate.
        atomic_write(paths.ca_cert("tls"), cert_pem(tls_issuer.cert), 0o644)

    server_key = generate_key(alg)
    server_cert = tls_issuer.issue(
        public_key=server_key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        profile="tls-server",
        lifetime=TLS_CERT_LIFETIME,
        san=loopback_san(),
    )
    atomic_write(paths.tls_key, key_pem(server_key), 0o600)
    atomic_write(paths.tls_cert, cert_pem(server_cert), 0o644)

    secret = generate_secret()
    text = _config_text(alg, hash_secret(secret))
    if tls_from is not None:
        first, rest = text.split("\n", 1)
        text = (f"{first}\n# The server's TLS certificate is issued by the CA of label "
                f"{tls_from} (init --tls-from {tls_from}).\n{rest}")
    atomic_write(paths.config, text.encode(), 0o600)
    paths.issued_log.touch(mode=0o644)
    return InitResult(
        dir=paths.dir,
        secret=secret,
        tls_ca_path=paths.ca_cert("tls"),
        manufacturer_ca_path=paths.ca_cert("manufacturer"),
        operator_ca_path=paths.ca_cert("operator"),
        config_path=paths.config,
        alg=alg,
        fingerprints={**{name: fingerprint(ca.cert) for name, ca in cas.items()},
                      "tls": fingerprint(tls_issuer.cert)},
        tls_from=tls_from,
    )


@dataclass
class ServerState:
    """A loaded server directory: config, the issuing CAs and the TLS files."""

    paths: ServerPaths
    config: ServerConfig
    cas: dict[str, CertificateAuthority]  # manufacturer and operator
    tls_ca: x509.Certificate

    @classmethod
    def load(cls, dir: Path) -> ServerState:
        """Read a directory made by :func:`init_server_dir`."""
        paths = ServerPaths(dir.resolve())
        if not paths.dir.is_dir():
            raise ConfigError(f"EST server directory {paths.dir} does not exist",
                              hint=f"create it with: tpmid est-server init --dir {paths.dir}")
        config = load_server_config(paths.config, paths.lab)
        cas = {name: load_ca(name, paths.ca_cert(name), paths.ca_key(name))
               for name in ("manufacturer", "operator")}
        try:
            tls_ca = x509.load_pem_x509_certificate(paths.ca_cert("tls").read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the TLS CA {paths.ca_cert('tls')}: {e}") from e
        for p in (paths.tls_cert, paths.tls_key):
            if not p.is_file():
                raise ConfigError(f"missing TLS file {p}")
        return cls(paths=paths, config=config, cas=cas, tls_ca=tls_ca)

    def fingerprints(self) -> dict[str, str]:
        """SHA-256 fingerprints of the manufacturer, operator and TLS CAs."""
        out = {name: fingerprint(ca.cert) for name, ca in self.cas.items()}
        out["tls"] = fingerprint(self.tls_ca)
        return out
