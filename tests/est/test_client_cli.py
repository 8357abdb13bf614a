"""``tpmid est cacerts|csrattrs URL`` against the reference EST server (in-process CLI)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tpmid.cli import main
from tpmid.testing.estserver import RunningEstServer


def _root(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def test_cacerts_prints_the_label_ca_as_pem(
    est_server: RunningEstServer, capsys: pytest.CaptureFixture[str],
) -> None:
    rc = main(["est", "cacerts", est_server.url("idevid"), "--trusted-certs",
               str(est_server.tls_ca)])
    out = capsys.readouterr().out
    assert rc == 0
    assert x509.load_pem_x509_certificates(out.encode()) == [_root(est_server.manufacturer_ca)]
    assert "# subject:  CN=tpmid Manufacturer CA (IDevID)" in out
    assert "server authenticated by explicit trust anchors" in out


def test_cacerts_json_and_out_file(
    est_server: RunningEstServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out_file = tmp_path / "ldevid-ca.pem"
    rc = main(["est", "cacerts", est_server.url("ldevid"), "--trusted-certs",
               str(est_server.tls_ca), "--out", str(out_file), "--json"])
    data = json.loads(capsys.readouterr().out)
    ca = _root(est_server.operator_ca)
    assert rc == 0
    assert data["certificates"][0]["sha256_fingerprint"] == \
        ca.fingerprint(hashes.SHA256()).hex()
    assert x509.load_pem_x509_certificates(out_file.read_bytes()) == [ca]
    assert stat.S_IMODE(os.stat(out_file).st_mode) == 0o644


def test_csrattrs_names_what_the_label_asks_for(
    est_server: RunningEstServer, capsys: pytest.CaptureFixture[str],
) -> None:
    rc = main(["est", "csrattrs", est_server.url("idevid"), "--trusted-certs",
               str(est_server.tls_ca)])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines() == [
        "1.2.840.10045.2.1 (id-ecPublicKey): 1.2.840.10045.3.1.7 (secp256r1)",
        "1.2.840.10045.4.3.2 (ecdsa-with-SHA256)",
    ]


CLI_FAILURES = {
    "no way to authenticate the server": ([], 2, "no way to authenticate"),
    "pin mismatch": (["--pin", "00" * 32], 6, "no certificate from /cacerts matches the pinned"),
    "pinned root does not cover the server's TLS certificate": (
        ["--pin", "MANUFACTURER"], 6, "does not validate for '127.0.0.1' against the pinned root"),
    "untrusted server": (["--trusted-certs", "OPERATOR"], 4,
                         "certificate verify failed: unable to get local issuer certificate"),
    "plain http": (["--trusted-certs", "TLS", "--url", "http"], 2, "plain HTTP"),
}


@pytest.mark.parametrize(("args", "code", "message"), CLI_FAILURES.values(),
                         ids=CLI_FAILURES.keys())
def test_cacerts_failures_have_precise_messages_and_exit_codes(
    args: list[str], code: int, message: str, est_server: RunningEstServer,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.delenv("TPMID_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    subst = {
        "MANUFACTURER": _root(est_server.manufacturer_ca).fingerprint(hashes.SHA256()).hex(),
        "OPERATOR": str(est_server.operator_ca), "TLS": str(est_server.tls_ca),
    }
    url = est_server.url("idevid")
    if "--url" in args:
        i = args.index("--url")
        url = url.replace("https://", "http://")
        args = args[:i] + args[i + 2:]
    argv = ["--config", str(tmp_path / "absent.yaml"), "est", "cacerts", url,
            *(subst.get(a, a) for a in args)]
    if not args:  # no flag: the (absent, non-default) config is not consulted
        argv = ["est", "cacerts", url]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code
    assert message in err
