"""``requests`` over the TPM-backed context through :class:`SSLContextAdapter`."""

from __future__ import annotations

import json

import pytest
import requests

from tests.tls.conftest import IssuingCa, MakeKey, MakeServer
from tpmid.errors import TpmError
from tpmid.testing.swtpm import Swtpm
from tpmid.testing.tpmproxy import TpmProxy
from tpmid.tls import ClientTls, client_tls
from tpmid.tls.adapter import SSLContextAdapter


def _session(tls: ClientTls) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxies or CA bundles from the environment
    s.mount("https://", SSLContextAdapter(tls))
    return s


def _url(server: object) -> str:
    # The server certificate carries 127.0.0.1 as an IP SAN: hostname checking stays on.
    return f"https://127.0.0.1:{server.port}/"  # type: ignore[attr-defined]


@pytest.fixture
def tpm_tls(proxy: TpmProxy, tpm_key: MakeKey, client_ca: IssuingCa,
            server_ca: IssuingCa) -> ClientTls:
    key = tpm_key(proxy.tcti, "ecc-p256")
    cert = client_ca.issue(key.public_key_der(), "adapter device")
    return client_tls(key=key, cert_chain=[cert], trust_anchors=[server_ca.cert])


def test_requests_authenticates_with_the_tpm_key_through_the_adapter(
    tpm_tls: ClientTls, proxy: TpmProxy, mtls_server: MakeServer,
) -> None:
    server = mtls_server()
    with tpm_tls, _session(tpm_tls) as s:
        s.get(_url(server), timeout=10)
        proxy.reset()
        resp = s.get(_url(server), timeout=10)
    assert resp.status_code == 200
    assert json.loads(resp.text)["peer_subject"] == "CN=adapter device"
    assert proxy.commands == ["TPM2_Sign"]


def test_requests_raises_the_tpm_error_when_the_tpm_is_gone(
    tpm_tls: ClientTls, swtpm: Swtpm, mtls_server: MakeServer,
) -> None:
    server = mtls_server()
    swtpm.stop()
    with tpm_tls, _session(tpm_tls) as s, pytest.raises(TpmError) as info:
        s.get(_url(server), timeout=10)
    assert isinstance(info.value.__cause__, requests.RequestException)


def test_adapter_leaves_the_context_untouched_and_refuses_a_client_cert_argument(
    tpm_tls: ClientTls, mtls_server: MakeServer,
) -> None:
    server = mtls_server()
    before = tpm_tls.ssl_context.cert_store_stats()
    with tpm_tls, _session(tpm_tls) as s:
        # verify=True would normally load certifi's bundle into the context.
        assert s.get(_url(server), timeout=10, verify=True).status_code == 200
        with pytest.raises(ValueError, match="cert="):
            s.get(_url(server), timeout=10, cert="/nonexistent.pem")
    assert tpm_tls.ssl_context.cert_store_stats() == before
