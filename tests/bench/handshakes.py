"""Handshake benchmark: a TPM key versus a software key, over real TLS on loopback.

``scripts/bench`` calls :func:`measure_handshakes` with a TPM key opened
through a :class:`~tpmid.testing.tpmproxy.TpmProxy` TCTI, so the result also
says how many TPM commands each handshake cost (it should be exactly one,
TPM2_Sign). With the proxy's ``delay`` the TPM column approximates a hardware
TPM (~20 ms per command) while the simulator itself is fast.

One measured "handshake" is what an EST client pays per connection: TCP
connect, the full mTLS handshake and one small HTTP request/response (in
TLS 1.3 only the response proves the server accepted the client certificate).
"""

from __future__ import annotations

import datetime
import os
import ssl
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.loopback import LoopbackTlsServer, request_once
from tpmid.tls.context import ClientTls, client_tls
from tpmid.tls.keys import SoftwareSigningKey, TlsSigningKey, profile_for

_SERVER_NAME = "bench.tpmid.invalid"


class CommandCounter(Protocol):
    """What the benchmark needs from a TPM proxy (``TpmProxy`` fits)."""

    @property
    def count(self) -> int: ...

    @property
    def commands(self) -> list[str]: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class HandshakeBench:
    """Result of :func:`measure_handshakes` (latencies in milliseconds)."""

    alg: str
    tls_version: str
    n: int
    tpm_median_ms: float
    software_median_ms: float
    tpm_p90_ms: float
    software_p90_ms: float
    #: TPM commands seen by the proxy per TPM handshake (None without a proxy).
    tpm_commands_per_handshake: float | None
    tpm_commands_by_name: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return dict(self.__dict__)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, spki_der: bytes, cn: str,
           san: str | None = None, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    pub = serialization.load_der_public_key(spki_der)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_name)
         .public_key(pub)  # type: ignore[arg-type]
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(hours=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure_handshakes(tpm_key: TlsSigningKey, *, n: int = 50,
                       proxy: CommandCounter | None = None,
                       tls_version: ssl.TLSVersion | None = None) -> HandshakeBench:
    """Time ``n`` sequential mTLS connections with ``tpm_key`` and with a software key.

    The software key has the same algorithm and is loaded from a 0600 PEM file
    through ``client_tls(key_file=...)``, the ordinary OpenSSL route. Each
    context first does one untimed warm-up connection (it absorbs one-time
    costs such as a simulator's first-use self-test), then ``proxy`` is reset
    and the ``n`` timed connections follow. ``tls_version`` pins the protocol
    (RSA keys are capped at TLS 1.2 regardless).
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    alg = profile_for(tpm_key).alg
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("tpmid bench CA")
    ca_cert = _issue(ca_key, ca_name, _spki(ca_key), "tpmid bench CA", ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(ca_key, ca_name, _spki(server_key), "bench server", san=_SERVER_NAME)
    tpm_cert = _issue(ca_key, ca_name, tpm_key.public_key_der(), "bench TPM client")
    soft = SoftwareSigningKey.generate(alg)
    soft_cert = _issue(ca_key, ca_name, soft.public_key_der(), "bench software client")

    with tempfile.TemporaryDirectory(prefix="tpmid-bench-") as d:
        key_path = Path(d) / "client-key.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(soft.private_key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        with LoopbackTlsServer(cert_chain=[server_cert], private_key=server_key,
                               client_cas=[ca_cert]) as server, \
                client_tls(key=tpm_key, cert_chain=[tpm_cert], trust_anchors=[ca_cert],
                           max_version=tls_version) as tpm_tls, \
                client_tls(key_file=key_path, cert_chain=[soft_cert], trust_anchors=[ca_cert],
                           max_version=tpm_tls.ssl_context.maximum_version) as soft_tls:
            # Same protocol for both columns (an RSA TPM context is capped at 1.2).

            def run(tls: ClientTls, count: int) -> list[float]:
                times = []
                for _ in range(count):
                    t0 = time.perf_counter()
                    with tls.translate_errors():  # a TPM failure surfaces as TpmError
                        request_once(tls.ssl_context, server.host, server.port, _SERVER_NAME)
                    times.append((time.perf_counter() - t0) * 1000.0)
                return times

            run(tpm_tls, 1)
            run(soft_tls, 1)
            if proxy is not None:
                proxy.reset()
            tpm_times = run(tpm_tls, n)
            per_hs = proxy.count / n if proxy is not None else None
            by_name = dict(Counter(proxy.commands)) if proxy is not None else {}
            version = server.records[-1].version or "?"
            soft_times = run(soft_tls, n)

    return HandshakeBench(
        alg=alg, tls_version=version, n=n,
        tpm_median_ms=statistics.median(tpm_times),
        software_median_ms=statistics.median(soft_times),
        tpm_p90_ms=_percentile(tpm_times, 0.9), software_p90_ms=_percentile(soft_times, 0.9),
        tpm_commands_per_handshake=per_hs, tpm_commands_by_name=by_name,
    )
