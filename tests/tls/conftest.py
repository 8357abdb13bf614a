"""Fixtures for the TLS shim tests: TPM keys in a per-test swtpm, a test CA, mTLS servers.

TPM keys are real ``tpmid.tpm.loaded.LoadedKey`` objects: the ek-derived IDevID
of the TCG H-1/H-2/H-3 template in the test's own swtpm (one TPM2_Sign per
signature), usually opened through a counting :class:`TpmProxy`.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.loopback import LoopbackTlsServer
from tpmid.errors import TpmError
from tpmid.testing.tpmproxy import TpmProxy
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import derive_idevid
from tpmid.tpm.loaded import LoadedKey

SERVER_NAME = "est.tpmid.test"


TEMPLATES = {"rsa-2048": "H-1", "ecc-p256": "H-2", "ecc-p384": "H-3"}


def load_tpm_key(tcti: str, alg: str) -> tuple[LoadedKey, TpmConnection]:
    """The ek-derived IDevID of ``alg`` (TCG H-1/H-2/H-3) in the TPM behind ``tcti``."""
    conn = TpmConnection(tcti)
    try:
        return derive_idevid(conn, TEMPLATES[alg]), conn
    except BaseException:
        conn.close()
        raise


@dataclass
class IssuingCa:
    """A throwaway CA that issues the server's and the TPM keys' certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, cn: str = "tpmid test CA") -> IssuingCa:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def issue(self, public_key_der: bytes, cn: str, *, server: bool = False) -> x509.Certificate:
        """Issue a leaf for a public key (DER SPKI); ``server`` adds SERVER_NAME and 127.0.0.1."""
        pub = serialization.load_der_public_key(public_key_der)
        now = datetime.datetime.now(datetime.UTC)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(self.cert.subject).public_key(pub)  # type: ignore[arg-type]
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(
                 [ExtendedKeyUsageOID.SERVER_AUTH if server
                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return b.sign(self.key, hashes.SHA256())


@pytest.fixture(scope="session")
def client_ca() -> IssuingCa:
    """The CA the server trusts for client certificates."""
    return IssuingCa.create("tpmid test client CA")


@pytest.fixture(scope="session")
def server_ca() -> IssuingCa:
    """The CA (explicit trust anchor) the client trusts for the server."""
    return IssuingCa.create("tpmid test server CA")


@pytest.fixture(scope="session")
def server_identity(server_ca: IssuingCa) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return server_ca.issue(der, SERVER_NAME, server=True), key


MakeServer = Callable[..., LoopbackTlsServer]


@pytest.fixture
def mtls_server(server_identity: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
                client_ca: IssuingCa) -> Iterator[MakeServer]:
    """Factory: a started loopback server requiring a client cert from ``client_ca``."""
    servers: list[LoopbackTlsServer] = []

    def make(**kw: object) -> LoopbackTlsServer:
        cert, key = server_identity
        srv = LoopbackTlsServer(cert_chain=[cert], private_key=key,
                                client_cas=[client_ca.cert], **kw)  # type: ignore[arg-type]
        servers.append(srv.start())
        return srv

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def proxy(tpm_proxy: TpmProxy) -> TpmProxy:
    """The plugin's counting proxy in front of this test's swtpm."""
    return tpm_proxy


MakeKey = Callable[[str, str], LoadedKey]


@pytest.fixture
def tpm_key() -> Iterator[MakeKey]:
    """Factory ``(tcti, alg) -> LoadedKey``; keys and connections are closed afterwards."""
    opened: list[tuple[LoadedKey, TpmConnection]] = []

    def make(tcti: str, alg: str) -> LoadedKey:
        pair = load_tpm_key(tcti, alg)
        opened.append(pair)
        return pair[0]

    yield make
    for key, conn in opened:
        try:
            key.close()
        except TpmError:
            pass  # the test stopped the TPM on purpose
        conn.close()
