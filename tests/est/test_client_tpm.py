"""EstClient with mutual TLS whose client key is in a simulated TPM, counted from outside.

A :class:`TpmProxy` sits between tpmid and swtpm (outside tpmid's TPM stack),
so the commands it counts are the ones that reached the TPM: a silent fallback
to a software key would show up as zero TPM2_Sign.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.est.test_client import load, software_csr
from tests.est.test_client_support import spki, tls_versions
from tpmid.config import SanConfig, SubjectConfig
from tpmid.csr import build_csr
from tpmid.errors import EstTransportError, TpmError
from tpmid.est.client import EstClient, make_session
from tpmid.testing.estserver import RunningEstServer, start_est_server
from tpmid.testing.swtpm import Swtpm
from tpmid.testing.tpmproxy import TpmProxy
from tpmid.tls import client_tls
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import create_persistent_idevid, open_persistent
from tpmid.tpm.loaded import LoadedKey


@dataclass
class Device:
    """A TPM (behind a counting proxy) with a persistent H-2 IDevID certified by ``server``."""

    proxy: TpmProxy
    tpm: TpmConnection
    key: LoadedKey
    cert: x509.Certificate
    server: RunningEstServer


@pytest.fixture(params=["1.2", "1.3"], ids=["TLS 1.2", "TLS 1.3"])
def device(request: pytest.FixtureRequest, swtpm: Swtpm, tmp_path: Path) -> Iterator[Device]:
    def edit(d: dict[str, Any]) -> None:
        tls_versions(request.param)(d)
        # Only TPM signatures are counted here; the IDevID and the CSR carry no
        # serialNumber, so the ldevid label does not bind subjects to it.
        d["labels"]["ldevid"]["subject_policy"] = "any"

    srv = start_est_server(tmp_path / "srv", config=edit)
    try:
        with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port).start() as proxy:
            tpm = TpmConnection(proxy.tcti)
            try:
                create_persistent_idevid(tpm, "H-2")
                key = open_persistent(tpm, 0x81020000, expect_template="H-2")
                with client_tls(trust_anchors=load(srv.tls_ca)) as tls:
                    csr = build_csr(key.private_key(), SubjectConfig(cn="IDevID"), SanConfig(),
                                    hash_name=key.hash_name)
                    idevid = EstClient(srv.url("idevid"), make_session(tls), tls=tls,
                                       headers={"Secret-Value": srv.secret})
                    cert = idevid.simpleenroll(csr).certificate
                assert spki(cert) == key.public_key_der()
                yield Device(proxy, tpm, key, cert, srv)
                try:
                    key.close()
                except TpmError:
                    pass  # the test stopped the TPM on purpose
            finally:
                tpm.close()
    finally:
        srv.stop()


def test_mtls_requests_cost_exactly_one_tpm_sign_per_handshake(
    device: Device, caplog: pytest.LogCaptureFixture,
) -> None:
    """cacerts + csrattrs + simpleenroll on one keep-alive connection: one handshake, one
    TPM2_Sign (the CSR is signed by a software key here so that only TLS is counted)."""
    caplog.set_level("INFO", logger="tpmid.server")
    srv = device.server
    with client_tls(key=device.key, cert_chain=[device.cert],
                    trust_anchors=load(srv.tls_ca)) as tls:
        device.proxy.reset()
        with make_session(tls) as session:
            client = EstClient(srv.url("ldevid"), session, tls=tls)
            client.cacerts()
            client.csrattrs()
            csr, key = software_csr("ldevid-over-mtls")
            issued = client.simpleenroll(csr).certificate
        assert device.proxy.commands == ["TPM2_Sign"]
        with make_session(tls) as session:  # a new connection is a new full handshake
            EstClient(srv.url("ldevid"), session, tls=tls).cacerts()
        assert device.proxy.commands == ["TPM2_Sign", "TPM2_Sign"]
    assert spki(issued) == spki(key)
    # The server authenticated the request by the TPM-held IDevID, over the pinned version.
    version = "TLSv" + srv.config()["tls"]["max_version"]
    assert f"label=ldevid status=200 client=CN=IDevID {version}" in caplog.text


def test_handshake_fails_with_the_tpm_error_when_the_tpm_is_stopped(
    device: Device, swtpm: Swtpm,
) -> None:
    """Negative control: with swtpm gone, no handshake succeeds and the TPM error surfaces."""
    srv = device.server
    with client_tls(key=device.key, cert_chain=[device.cert],
                    trust_anchors=load(srv.tls_ca)) as tls:
        swtpm.stop()
        client = EstClient(srv.url("ldevid"), make_session(tls), tls=tls)
        with pytest.raises(TpmError):
            client.cacerts()
        # The socket path of proof-of-possession surfaces it the same way.
        with pytest.raises(TpmError):
            client.simpleenroll(
                lambda tu: software_csr(challenge=base64.b64encode(tu).decode())[0])
    assert [r["label"] for r in srv.issued()] == ["idevid"]  # nothing issued without the TPM


def test_tls_version_pinning_reaches_the_wire(device: Device) -> None:
    """The server's pinned version is what the TPM-authenticated connection negotiates."""
    srv = device.server
    want = srv.config()["tls"]["max_version"]
    other = ssl.TLSVersion.TLSv1_3 if want == "1.2" else ssl.TLSVersion.TLSv1_2
    with client_tls(key=device.key, cert_chain=[device.cert], trust_anchors=load(srv.tls_ca),
                    min_version=other, max_version=other) as tls:
        client = EstClient(srv.url("ldevid"), make_session(tls), tls=tls)
        with pytest.raises(EstTransportError, match="failed: TLSV1_ALERT_PROTOCOL_VERSION"):
            client.cacerts()
        assert tls.signatures == 0
