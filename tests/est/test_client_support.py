"""Shared helpers for the EST client, verification and enrollment tests (no tests here).

* :class:`TestCa` — a throwaway CA made with ``cryptography`` (for verification
  tables and for a server certificate with chosen names/EKUs);
* :class:`CannedServer` — a real HTTPS (or HTTP) server on loopback answering
  with canned responses, for wire-format leniency and faults the reference
  server does not produce (line layouts, PEM/DER bodies, redirects, echoes,
  oversized bodies, a cmcRA certificate);
* :func:`tpm_session` — an :class:`EstClient` wired to a TPM key and the
  reference server;
* :func:`identity_config` — a tpmid config for the reference server.

Imported by ``tests/est/test_client*.py`` and ``tests/lifecycle/test_enroll*.py``.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tpmid.config import Config, parse_config
from tpmid.testing.estserver import RunningEstServer

UTC = datetime.UTC
OID_CMC_RA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")


def name(cn: str, **extra: str) -> x509.Name:
    """``CN=cn`` plus optional O/serialNumber."""
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if "o" in extra:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, extra["o"]))
    if "serial_number" in extra:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, extra["serial_number"]))
    return x509.Name(attrs)


def spki(key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a public or private key."""
    pub = key.public_key() if hasattr(key, "public_key") else key
    return pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class TestCa:
    """A CA with a software key; ``issue`` makes leaves or sub-CAs with chosen properties."""

    __test__ = False  # not a test class for pytest

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def root(cls, cn: str = "test root", *, path_length: int | None = None) -> TestCa:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(UTC)
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                               critical=True)
                .add_extension(_ku(ca=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def issue(
        self,
        public_key: Any,
        subject: x509.Name,
        *,
        ca: bool = False,
        eku: list[x509.ObjectIdentifier] | None = None,
        san: list[x509.GeneralName] | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key_usage: bool = True,
        cert_sign: bool | None = None,
    ) -> x509.Certificate:
        now = datetime.datetime.now(UTC)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(not_before or now - datetime.timedelta(hours=1))
             .not_valid_after(not_after or now + datetime.timedelta(days=7))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 self.key.public_key()), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                            critical=False))
        if key_usage:
            b = b.add_extension(_ku(ca=ca if cert_sign is None else cert_sign), critical=True)
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def sub_ca(self, cn: str) -> TestCa:
        key = ec.generate_private_key(ec.SECP256R1())
        return TestCa(key, self.issue(key.public_key(), name(cn), ca=True))


def _ku(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# --------------------------------------------------------------------------- canned server


@dataclass
class Seen:
    """One request the canned server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Answer = tuple[int, list[tuple[str, str]], bytes]


@dataclass
class CannedServer:
    """A real loopback HTTP(S) server whose answers come from ``respond(seen)``.

    With ``tls`` (cert chain + key) it serves HTTPS; ``seen`` records requests
    (including headers, so a test can check what was sent).
    """

    respond: Callable[[Seen], Answer]
    tls: tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey] | None = None
    host: str = "127.0.0.1"
    seen: list[Seen] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> CannedServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                seen = Seen(self.command, self.path,
                            {k.lower(): v for k, v in self.headers.items()}, body)
                outer.seen.append(seen)
                status, headers, payload = outer.respond(seen)
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                names = {k.lower() for k, _ in headers}
                if "content-length" not in names and "connection" not in names:
                    self.send_header("Content-Length", str(len(payload)))
                if "connection" in names:
                    # "Connection: close" without a length: the body ends at EOF.
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that hang up on purpose (failed checks) are expected here

        httpd = Server((self.host, 0), Handler)
        if self.tls is not None:
            chain, key = self.tls
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            d = Path(_tmpdir())
            (d / "chain.pem").write_bytes(pem(*chain))
            (d / "key.pem").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            ctx.load_cert_chain(str(d / "chain.pem"), str(d / "key.pem"))
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    def url(self, label: str = "idevid", *, host: str | None = None) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host or self.host}:{self.port}/.well-known/est/{label}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tpmid-canned-")


def server_identity(ca: TestCa, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ("127.0.0.1",),
                    cmc_ra: bool = False) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
    """A TLS server certificate from ``ca`` with the given names (and id-kp-cmcRA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    eku = [ExtendedKeyUsageOID.SERVER_AUTH] + ([OID_CMC_RA] if cmc_ra else [])
    cert = ca.issue(key.public_key(), name("est server"), eku=eku, san=san)
    return [cert], key



# --------------------------------------------------------------------------- configs


SECRET_ENV = "EST_SECRET"
LDEVID_ALG = {"H-1": "rsa-2048", "H-2": "ecc-p256", "H-3": "ecc-p384"}


def identity_config(
    srv: RunningEstServer,
    store: Path,
    tcti: str,
    *,
    template: str = "H-2",
    ldevid_alg: str | None = None,
    idevid_est: dict[str, Any] | None = None,
    ldevid_est: dict[str, Any] | None = None,
    edgeca_est: dict[str, Any] | None = None,
    trust: dict[str, Any] | None = None,
) -> Config:
    """IDevID (persistent, Secret-Value), LDevID (key file, mTLS with the IDevID) and
    Edge CA (key file, mTLS with the LDevID) against the reference server ``srv``."""
    data: dict[str, Any] = {
        "tpm": {"tcti": tcti},
        "store": {"dir": str(store)},
        "trust": trust if trust is not None else {"est_anchors": [str(srv.tls_ca)]},
        "identities": {
            "idevid": {
                "key": {"kind": "persistent", "template": template, "handle": 0x81020000},
                "subject": {"cn": "IDevID", "serial_number": "TPMID-TEST-0001"},
                "est": {"url": srv.url("idevid"),
                        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}},
                        **(idevid_est or {})},
            },
            "ldevid": {
                "key": {"kind": "file", "alg": ldevid_alg or LDEVID_ALG[template]},
                # The IDevID's serial: the server's ldevid/edgeca labels bind to it.
                "subject": {"cn": "my-device-id", "serial_number": "TPMID-TEST-0001"},
                "est": {"url": srv.url("ldevid"), "auth": {"client": "idevid"},
                        **(ldevid_est or {})},
            },
            "edgeca": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": "my-device-id Edge CA", "serial_number": "TPMID-TEST-0001"},
                "profile": "ca",
                "est": {"url": srv.url("edgeca"), "auth": {"client": "ldevid"},
                        **(edgeca_est or {})},
            },
        },
    }
    return parse_config(data, "test-config")


def tls_versions(version: str) -> Callable[[dict[str, Any]], None]:
    """A reference-server config edit pinning its TLS version (``"1.2"`` or ``"1.3"``)."""

    def edit(d: dict[str, Any]) -> None:
        d["tls"] = {"min_version": version, "max_version": version}

    return edit


def transient_handles(tcti: str) -> list[int]:
    """Transient objects currently loaded in the TPM (should be none between operations)."""
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

    from tpmid.tpm.connection import TpmConnection

    with TpmConnection(tcti) as tpm:
        _, data = tpm.esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
        return [int(h) for h in data.data.handles]

