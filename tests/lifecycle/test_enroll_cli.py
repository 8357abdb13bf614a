"""``tpmid enroll NAME``: the CLI over a config file, a swtpm and the reference EST server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.est.test_client_support import SECRET_ENV
from tpmid.cli import main
from tpmid.render import name as render_name
from tpmid.render import serial as render_serial
from tpmid.testing.estserver import RunningEstServer
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import create_persistent_idevid


@pytest.fixture
def config_file(swtpm: Swtpm, est_server: RunningEstServer, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Path:
    with TpmConnection(swtpm.tcti) as tpm:
        create_persistent_idevid(tpm, "H-2")
    data: dict[str, Any] = {
        "tpm": {"tcti": swtpm.tcti},
        "store": {"dir": str(tmp_path / "store")},
        "trust": {"est_anchors": [str(est_server.tls_ca)]},
        "identities": {
            "idevid": {
                "key": {"kind": "persistent", "template": "H-2"},
                "subject": {"cn": "IDevID", "serial_number": "CLI-0001"},
                "est": {"url": est_server.url("idevid"),
                        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}}},
            },
            "ldevid": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                # The IDevID's serial: the server's ldevid label binds to it.
                "subject": {"cn": "cli-device", "serial_number": "CLI-0001"},
                "est": {"url": est_server.url("ldevid"), "auth": {"client": "idevid"}},
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    monkeypatch.delenv("TPMID_TCTI", raising=False)
    monkeypatch.setenv("TPMID_CONFIG", str(path))
    return path


def test_enroll_prints_subject_issuer_serial_expiry_fingerprint_and_paths(
    config_file: Path, est_server: RunningEstServer, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, est_server.secret)
    assert main(["enroll", "idevid", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    cert = x509.load_pem_x509_certificate(Path(data["cert_path"]).read_bytes())
    assert data["subject"] == render_name(cert.subject) == "serialNumber=CLI-0001,CN=IDevID"
    assert data["serial"] == render_serial(cert.serial_number)
    assert data["not_after"] == cert.not_valid_after_utc.isoformat()
    assert data["issuer"].startswith("CN=tpmid Manufacturer CA")

    assert main(["enroll", "ldevid"]) == 0
    out = capsys.readouterr().out
    assert "enrolled ldevid (simpleenroll, version 0001)" in out
    assert "subject:     serialNumber=CLI-0001,CN=cli-device" in out
    assert "key file:" in out and ".tss2.pem" in out


def test_enroll_with_a_wrong_secret_exits_5_without_showing_it(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong = "wrong-secret-value-0123456789"
    monkeypatch.setenv(SECRET_ENV, wrong)
    assert main(["-vv", "enroll", "idevid"]) == 5
    captured = capsys.readouterr()
    assert "rejected our credentials (401" in captured.err
    assert wrong not in captured.out + captured.err


def test_enroll_of_an_unknown_identity_lists_the_known_ones(
    config_file: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["enroll", "nope"]) == 2
    assert "configured: idevid, ldevid" in capsys.readouterr().err
