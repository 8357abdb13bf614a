"""Test helpers for the reference EST server: a plain HTTPS client, software keys, CSRs.

The client is ``http.client`` over an ``ssl`` context we build ourselves, so a
test controls the TLS version, the client certificate, and can read the
session's tls-unique before it sends the request (for RFC 7030 §3.5 PoP).
Keys are software keys: TPM keys belong to the client's own tests.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AttributeOID, NameOID

from tpmid.est import messages
from tpmid.testing.estserver import RunningEstServer

TLS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
HARDWARE_MODULE_NAME = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4")  # RFC 4108 §5
# The serialNumber of the device the helpers enroll: its IDevID carries it, and the
# mTLS labels (subject_policy client-serial) issue only subjects that carry it too.
DEVICE_SERIAL = "TEST-0001"


@dataclass
class Reply:
    """An HTTP response as a test sees it."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    tls_version: str | None

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def certs(self) -> list[x509.Certificate]:
        assert self.status == 200, f"expected 200, got {self.status}: {self.text}"
        assert messages.media_type_matches(self.headers.get("content-type"), messages.PKCS7_MIME)
        return messages.decode_certs_only(self.body)

    def cert(self) -> x509.Certificate:
        certs = self.certs()
        assert len(certs) == 1, f"expected one certificate, got {len(certs)}"
        return certs[0]


def client_context(cafile: Path, *, cert: Path | None = None, key: Path | None = None,
                   tls: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    if tls:
        ctx.minimum_version = ctx.maximum_version = TLS[tls]
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def request(
    url: str,
    *,
    cafile: Path,
    method: str = "GET",
    body: bytes | Callable[[bytes | None], bytes] | None = None,
    headers: dict[str, str] | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    tls: str | None = None,
    timeout: float = 20.0,
) -> Reply:
    """One HTTPS request on its own connection. ``body`` may be a function of tls-unique."""
    parts = urlsplit(url)
    ctx = client_context(cafile, cert=cert, key=key, tls=tls)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=ctx,
                                       timeout=timeout)
    try:
        conn.connect()
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        version = sock.version()
        if callable(body):
            unique = sock.get_channel_binding("tls-unique") if version == "TLSv1.2" else None
            body = body(unique)
        hdrs = dict(headers or {})
        conn.request(method, parts.path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, version)
    finally:
        conn.close()


# --------------------------------------------------------------------------- keys and CSRs


def new_key(alg: str = "ecc-p256") -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if alg == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1() if alg == "ecc-p384" else ec.SECP256R1())


def make_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    cn: str | None = "device",
    *,
    serial: str | None = None,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    hw_module: bytes | None = None,
    challenge: bytes | None = None,
    digest: hashes.HashAlgorithm | None = None,
) -> x509.CertificateSigningRequest:
    """A CSR (CN, then serialNumber); ``hw_module`` is the DER of a HardwareModuleName."""
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    name = x509.Name(attrs)
    b = x509.CertificateSigningRequestBuilder().subject_name(name)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if hw_module is not None:
        sans.append(x509.OtherName(HARDWARE_MODULE_NAME, hw_module))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if challenge is not None:
        b = b.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge)
    return b.sign(key, digest or hashes.SHA256())


def hardware_module_name(hw_type: str, serial: bytes) -> bytes:
    """DER of ``HardwareModuleName ::= SEQUENCE { hwType OID, hwSerialNum OCTET STRING }``."""
    oid = messages.der_oid(hw_type)
    return messages.der_tlv(0x30, oid + messages.der_tlv(0x04, serial))


def csr_body(csr: x509.CertificateSigningRequest) -> bytes:
    return messages.encode_csr(csr)


def pem_csr(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# --------------------------------------------------------------------------- flows


@dataclass
class Identity:
    """A software key and its certificate, also written as PEM files for TLS."""

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    cert: x509.Certificate
    key_path: Path
    cert_path: Path


def enroll(
    srv: RunningEstServer,
    label: str,
    tmp: Path,
    name: str,
    *,
    cn: str | None = None,
    serial: str | None = None,
    client: Identity | None = None,
    operation: str = "simpleenroll",
    headers: dict[str, str] | None = None,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    tls: str | None = None,
) -> Identity:
    """Enroll a new software key at ``label`` and return the identity; asserts 200."""
    key = key or new_key()
    hdrs = {"Content-Type": messages.PKCS10, **(headers or {})}
    if label == "idevid" and "Secret-Value" not in hdrs:
        hdrs["Secret-Value"] = srv.secret
    reply = request(srv.url(label, operation), cafile=srv.tls_ca, method="POST",
                    body=csr_body(make_csr(key, cn or name, serial=serial)), headers=hdrs,
                    cert=client.cert_path if client else None,
                    key=client.key_path if client else None, tls=tls)
    assert reply.status == 200, f"{label}/{operation}: {reply.status} {reply.text}"
    cert = reply.cert()
    return Identity(key, cert, write_key(tmp / f"{name}.key.pem", key),
                    write_cert(tmp / f"{name}.cert.pem", cert))


def idevid(srv: RunningEstServer, tmp: Path, name: str = "idevid", *,
           serial: str | None = DEVICE_SERIAL) -> Identity:
    """An IDevID ``CN=IDevID, serialNumber=serial`` (no serialNumber when None)."""
    return enroll(srv, "idevid", tmp, name, cn="IDevID", serial=serial)


def ldevid(srv: RunningEstServer, tmp: Path, name: str = "ldevid",
           cn: str = "my-device-id", *, serial: str = DEVICE_SERIAL) -> Identity:
    """An LDevID with the serialNumber of the fresh IDevID that authenticates it."""
    client = idevid(srv, tmp, f"{name}-idevid", serial=serial)
    return enroll(srv, "ldevid", tmp, name, cn=cn, serial=serial, client=client)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)
