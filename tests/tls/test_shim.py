"""The TPM-backed TLS client: real swtpm keys, real TLS over 127.0.0.1, a counting TPM proxy.

Every server here is a real Python ``ssl`` server that requires a client
certificate chaining to the test client CA and records what it received.
"""

from __future__ import annotations

import gc
import logging
import ssl
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.loopback import LoopbackTlsServer, request_once
from tests.tls.conftest import SERVER_NAME, IssuingCa, MakeKey, MakeServer
from tpmid.errors import ConfigError, KeyMismatchError, TlsShimError, TpmError
from tpmid.testing.swtpm import Swtpm
from tpmid.testing.tpmproxy import TpmProxy
from tpmid.tls import ClientTls, SoftwareSigningKey, _shim, client_tls
from tpmid.tpm.loaded import LoadedKey

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


class RecordingKey:
    """Passes every call through to a real TPM key and notes the digest sizes asked for."""

    def __init__(self, inner: LoadedKey) -> None:
        self.inner = inner
        self.alg = inner.alg
        self.hash_name = inner.hash_name
        self.tpm = inner.tpm  # so that the shim takes the connection lock, as for inner
        self.digest_sizes: list[int] = []

    def public_key_der(self) -> bytes:
        return self.inner.public_key_der()

    def sign_digest(self, digest: bytes) -> bytes:
        self.digest_sizes.append(len(digest))
        return self.inner.sign_digest(digest)


def _tpm_tls(proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa, server_ca: IssuingCa,
             alg: str, **kw: object) -> tuple[ClientTls, bytes]:
    key = tpm_key(proxy.tcti, alg)
    cert = client_ca.issue(key.public_key_der(), f"device {alg}")
    tls = client_tls(key=key, cert_chain=[cert], trust_anchors=[server_ca.cert],
                     **kw)  # type: ignore[arg-type]
    return tls, cert.public_bytes(serialization.Encoding.DER)


def _get(tls: ClientTls, server: LoopbackTlsServer) -> bytes:
    with tls.translate_errors():
        return request_once(tls.ssl_context, server.host, server.port, SERVER_NAME)


HANDSHAKES = [
    pytest.param("ecc-p256", V12, id="p256-tls1.2"),
    pytest.param("ecc-p256", V13, id="p256-tls1.3"),
    pytest.param("ecc-p384", V12, id="p384-tls1.2"),
    pytest.param("ecc-p384", V13, id="p384-tls1.3"),
    pytest.param("rsa-2048", V12, id="rsa2048-tls1.2"),
]


@pytest.mark.parametrize(("alg", "version"), HANDSHAKES)
def test_server_receives_the_tpm_keys_certificate_and_each_handshake_costs_one_tpm2_sign(
    proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa, server_ca: IssuingCa,
    mtls_server: MakeServer, alg: str, version: ssl.TLSVersion,
) -> None:
    server = mtls_server(min_version=version, max_version=version)
    tls, cert_der = _tpm_tls(proxy, tpm_key, client_ca, server_ca, alg)
    with tls:
        # The first handshake after the key is loaded may cost a retried Sign:
        # the simulator self-tests an algorithm on first use (TPM_RC_RETRY).
        _get(tls, server)
        proxy.reset()
        for _ in range(3):
            body = _get(tls, server)
    assert f"device {alg}".encode() in body
    records = server.wait_for(4)
    assert [r.error for r in records] == [None] * 4
    assert all(r.peer_der == cert_der for r in records)
    assert {r.version for r in records} == {"TLSv1.2" if version == V12 else "TLSv1.3"}
    assert proxy.commands == ["TPM2_Sign"] * 3
    assert proxy.unparsed_bytes == 0


def test_handshake_fails_with_the_tpm_error_when_the_tpm_stops_answering(
    swtpm: Swtpm, proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa,
    server_ca: IssuingCa, mtls_server: MakeServer,
) -> None:
    server = mtls_server()
    tls, _ = _tpm_tls(proxy, tpm_key, client_ca, server_ca, "ecc-p256")
    with tls:
        _get(tls, server)
        swtpm.stop()
        with pytest.raises(TpmError) as info:
            _get(tls, server)
    assert "TPM" in str(info.value)
    assert isinstance(info.value.__cause__, ssl.SSLError | OSError)
    # The server never accepted a second client certificate.
    assert [r.peer_der is not None for r in server.wait_for(2)] == [True, False]


def test_raise_pending_reraises_the_tpm_error_where_the_ssl_error_surfaces(
    swtpm: Swtpm, proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa,
    server_ca: IssuingCa, mtls_server: MakeServer,
) -> None:
    server = mtls_server()
    tls, _ = _tpm_tls(proxy, tpm_key, client_ca, server_ca, "ecc-p384")
    swtpm.stop()
    with tls, pytest.raises(TpmError):
        try:
            request_once(tls.ssl_context, *server.address, SERVER_NAME)
        except ssl.SSLError as e:
            tls.raise_pending(e)
            raise
    tls.raise_pending()  # consumed: nothing left to raise


def test_rsa_context_is_capped_at_tls12_and_cannot_reach_a_tls13_only_server(
    proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa, server_ca: IssuingCa,
    mtls_server: MakeServer, caplog: pytest.LogCaptureFixture,
) -> None:
    server = mtls_server(min_version=V13)
    with caplog.at_level(logging.INFO, logger="tpmid.tls"):
        tls, _ = _tpm_tls(proxy, tpm_key, client_ca, server_ca, "rsa-2048", max_version=V13)
    assert any("capped at 1.2" in r.getMessage() for r in caplog.records)
    with tls:
        assert tls.ssl_context.maximum_version == V12
        proxy.reset()
        with pytest.raises(ssl.SSLError):
            _get(tls, server)
    assert proxy.commands == []


def test_rsa_context_refuses_a_tls13_minimum(
    proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa, server_ca: IssuingCa,
) -> None:
    with pytest.raises(TlsShimError, match="TLS 1.3 needs RSA-PSS"):
        _tpm_tls(proxy, tpm_key, client_ca, server_ca, "rsa-2048", min_version=V13)


@pytest.mark.parametrize(("alg", "server_sigalgs", "version"), [
    pytest.param("ecc-p256", "ECDSA+SHA384", V12, id="p256-vs-sha384-only-tls1.2"),
    pytest.param("ecc-p256", "ECDSA+SHA384", V13, id="p256-vs-sha384-only-tls1.3"),
    pytest.param("ecc-p384", "ECDSA+SHA256", V12, id="p384-vs-sha256-only-tls1.2"),
    pytest.param("ecc-p384", "ECDSA+SHA256", V13, id="p384-vs-sha256-only-tls1.3"),
    pytest.param("rsa-2048", "RSA-PSS+SHA256", V12, id="rsa-vs-pss-only-tls1.2"),
])
def test_key_offers_only_its_own_signature_algorithm(
    proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa, server_ca: IssuingCa,
    mtls_server: MakeServer, alg: str, server_sigalgs: str, version: ssl.TLSVersion,
) -> None:
    server = mtls_server(min_version=version, max_version=version,
                         client_sigalgs=server_sigalgs)
    tls, _ = _tpm_tls(proxy, tpm_key, client_ca, server_ca, alg)
    proxy.reset()
    with tls, pytest.raises(ssl.SSLError):
        _get(tls, server)
    # Refused before signing: the TPM never saw a digest of the wrong size.
    assert proxy.commands == []
    assert server.wait_for(1)[0].peer_der is None


@pytest.mark.parametrize(("alg", "server_sigalgs", "digest_size"), [
    pytest.param("ecc-p256", "ECDSA+SHA384:ECDSA+SHA512:ECDSA+SHA256", 32, id="p256"),
    pytest.param("ecc-p384", "ECDSA+SHA256:ECDSA+SHA512:ECDSA+SHA384", 48, id="p384"),
    pytest.param("rsa-2048", "RSA-PSS+SHA256:RSA+SHA512:RSA+SHA256", 32, id="rsa2048"),
])
def test_tls12_key_signs_its_own_hash_even_when_the_server_prefers_another(
    proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa, server_ca: IssuingCa,
    mtls_server: MakeServer, alg: str, server_sigalgs: str, digest_size: int,
) -> None:
    server = mtls_server(min_version=V12, max_version=V12, client_sigalgs=server_sigalgs)
    key = RecordingKey(tpm_key(proxy.tcti, alg))
    cert = client_ca.issue(key.public_key_der(), "device")
    with client_tls(key=key, cert_chain=[cert], trust_anchors=[server_ca.cert]) as tls:
        _get(tls, server)
    assert key.digest_sizes == [digest_size]
    assert server.wait_for(1)[0].version == "TLSv1.2"


def test_concurrent_handshakes_on_one_context_all_succeed_with_one_sign_each(
    proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa, server_ca: IssuingCa,
    mtls_server: MakeServer,
) -> None:
    threads_n = 6
    server = mtls_server()
    tls, cert_der = _tpm_tls(proxy, tpm_key, client_ca, server_ca, "ecc-p256")
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def worker() -> None:
        try:
            start.wait(timeout=10)
            _get(tls, server)
        except BaseException as e:  # noqa: BLE001  (collected and asserted below)
            errors.append(e)

    with tls:
        _get(tls, server)
        proxy.reset()
        workers = [threading.Thread(target=worker) for _ in range(threads_n)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=30)
    assert errors == []
    assert proxy.commands == ["TPM2_Sign"] * threads_n
    records = server.wait_for(threads_n + 1)
    assert [r.peer_der == cert_der for r in records] == [True] * (threads_n + 1)


def test_certificate_of_another_key_is_refused_before_any_handshake(
    proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa, server_ca: IssuingCa,
) -> None:
    key = tpm_key(proxy.tcti, "ecc-p256")
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(KeyMismatchError, match="does not belong"):
        client_tls(key=key, cert_chain=[client_ca.issue(other, "someone else")],
                   trust_anchors=[server_ca.cert])


def test_closed_context_can_no_longer_sign(
    proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa, server_ca: IssuingCa,
    mtls_server: MakeServer,
) -> None:
    server = mtls_server()
    tls, _ = _tpm_tls(proxy, tpm_key, client_ca, server_ca, "ecc-p256")
    tls.close()
    proxy.reset()
    with pytest.raises(TlsShimError, match="closed"):
        _get(tls, server)
    assert proxy.commands == []


def test_installed_key_is_released_when_the_context_is_collected(
    client_ca: IssuingCa, server_ca: IssuingCa,
) -> None:
    gc.collect()
    before = _shim.registered()
    key = SoftwareSigningKey.generate("ecc-p256")
    cert = client_ca.issue(key.public_key_der(), "short-lived")
    tls = client_tls(key=key, cert_chain=[cert], trust_anchors=[server_ca.cert])
    assert _shim.registered() == before + 1
    tls.close()
    del tls
    gc.collect()
    assert _shim.registered() == before


def test_software_key_file_authenticates_through_the_same_api(
    tmp_path: Path, client_ca: IssuingCa, server_ca: IssuingCa, mtls_server: MakeServer,
) -> None:
    server = mtls_server()
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "bootstrap.key"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    cert = client_ca.issue(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo), "bootstrap")
    with client_tls(key_file=key_file, cert_chain=[cert], trust_anchors=[server_ca.cert]) as tls:
        assert not tls.uses_tpm_key
        _get(tls, server)
    assert server.wait_for(1)[0].peer_der == cert.public_bytes(serialization.Encoding.DER)


def test_server_auth_only_context_is_rejected_by_a_server_that_requires_client_certs(
    server_ca: IssuingCa, mtls_server: MakeServer,
) -> None:
    optional = mtls_server(require_client_cert=False)
    required = mtls_server()
    with client_tls(trust_anchors=[server_ca.cert]) as tls:
        assert b'"peer_subject": null' in _get(tls, optional)
        with pytest.raises(ssl.SSLError):
            _get(tls, required)


def test_server_outside_the_trust_anchors_is_rejected(
    client_ca: IssuingCa, mtls_server: MakeServer,
) -> None:
    server = mtls_server(require_client_cert=False)
    with client_tls(trust_anchors=[client_ca.cert]) as tls, \
            pytest.raises(ssl.SSLCertVerificationError):
        _get(tls, server)


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="no-trust-anchors"),
    pytest.param({"use_system_store": True, "key_file": Path("/x"), "key": object()},
                 id="key-and-key-file"),
])
def test_inconsistent_arguments_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        client_tls(**kwargs)  # type: ignore[arg-type]
