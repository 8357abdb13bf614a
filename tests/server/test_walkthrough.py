"""The reference walkthrough's shell pipelines, run verbatim against `tpmid est-server run`.

From ``../shared/reference/iot-edge-est-walkthrough.txt`` (Microsoft's "Automatic
IoT Edge Certificate Management with GlobalSign EST"): only the URL, the secret
and ``--cacert`` (our TLS CA) are filled in. The same curl | openssl style is
then used with ``--cert/--key`` (software keys) against the mTLS labels, whose
``subject_policy: client-serial`` wants the device's serialNumber in every subject.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tpmid.testing.estserver import RunningEstServer

pytestmark = pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")

TO_PEM = ("openssl base64 -d | openssl pkcs7 -inform DER -outform PEM -print_certs "
          "| openssl x509 -out")


def sh(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under bash with errexit and pipefail, as a careful operator would."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def ok(script: str, cwd: Path) -> str:
    proc = sh(script, cwd)
    assert proc.returncode == 0, f"exit {proc.returncode}\n$ {script}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def idevid_walkthrough(srv: RunningEstServer, cwd: Path, subj: str = "/CN=IDevID") -> None:
    cacert = shlex.quote(str(srv.tls_ca))
    idevid_cacerts = srv.url("idevid", "cacerts")
    idevid_enroll = srv.url("idevid", "simpleenroll")
    # Walkthrough: "Retrieve the GlobalSign demo root CA certificate ..."
    ok(f"curl --cacert {cacert} {idevid_cacerts}| openssl base64 -d | openssl pkcs7 -inform DER "
       "-outform PEM -print_certs | openssl x509 -out globalsign-root.cert.pem", cwd)
    # "Use openssl to create a new private key and certificate signing request (CSR)."
    ok(f"openssl req -nodes -new -subj {subj} -sha256 -keyout IDevID.key.pem -out IDevID.csr",
       cwd)
    # "Send the CSR to GlobalSign's simple enroll EST endpoint using curl ..."
    ok(f'curl -X POST --data-binary "@IDevID.csr" -H "Content-Transfer-Encoding:base64" '
       f'-H "Secret-Value: {srv.secret}" -H "Content-Type:application/pkcs10" '
       f"--cacert {cacert} {idevid_enroll} | openssl base64 -d | openssl pkcs7 -inform DER "
       "-outform PEM -print_certs | openssl x509 -out IDevID.cert.pem", cwd)


def test_walkthrough_idevid_pipeline_yields_a_certificate_openssl_verify_accepts(
    est_server: RunningEstServer, tmp_path: Path
) -> None:
    idevid_walkthrough(est_server, tmp_path)
    out = ok("openssl verify -CAfile globalsign-root.cert.pem IDevID.cert.pem", tmp_path)
    assert out.strip() == "IDevID.cert.pem: OK"
    root = cert(tmp_path / "globalsign-root.cert.pem")
    assert root == x509.load_pem_x509_certificate(est_server.manufacturer_ca.read_bytes())
    assert cert(tmp_path / "IDevID.cert.pem").subject.rfc4514_string() == "CN=IDevID"


def test_walkthrough_idevid_pipeline_fails_with_a_wrong_secret(est_server: RunningEstServer,
                                                               tmp_path: Path) -> None:
    ok("openssl req -nodes -new -subj /CN=IDevID -sha256 -keyout k.pem -out IDevID.csr", tmp_path)
    proc = sh(f'curl -sS -X POST --data-binary "@IDevID.csr" -H "Content-Transfer-Encoding:base64" '
              f'-H "Secret-Value: not-{est_server.secret}" -H "Content-Type:application/pkcs10" '
              f"--cacert {est_server.tls_ca} {est_server.url('idevid', 'simpleenroll')} "
              f"| {TO_PEM} IDevID.cert.pem", tmp_path)
    assert proc.returncode != 0
    assert not (tmp_path / "IDevID.cert.pem").exists() or not (
        tmp_path / "IDevID.cert.pem").read_bytes().strip()


def test_mtls_pipelines_get_ldevid_and_edge_ca_with_curl_cert_and_key(
    est_server: RunningEstServer, tmp_path: Path
) -> None:
    # The device's serial is in its IDevID, and in every name it asks for with it.
    idevid_walkthrough(est_server, tmp_path, "/CN=IDevID/serialNumber=WALK-0001")
    ca = f"--cacert {shlex.quote(str(est_server.tls_ca))}"
    as_idevid = "--cert IDevID.cert.pem --key IDevID.key.pem"
    as_ldevid = "--cert LDevID.cert.pem --key LDevID.key.pem"
    post = '-X POST -H "Content-Transfer-Encoding:base64" -H "Content-Type:application/pkcs10"'

    # LDevID: operator CA, authenticated by the IDevID.
    ok(f"curl {ca} {as_idevid} {est_server.url('ldevid', 'cacerts')} | {TO_PEM} "
       "operator-root.cert.pem", tmp_path)
    ok("openssl req -nodes -new -subj /CN=my-device-id/serialNumber=WALK-0001 -sha256 "
       "-keyout LDevID.key.pem -out LDevID.csr", tmp_path)
    ok(f'curl {post} --data-binary "@LDevID.csr" {ca} {as_idevid} '
       f"{est_server.url('ldevid', 'simpleenroll')} | {TO_PEM} LDevID.cert.pem", tmp_path)
    assert ok("openssl verify -CAfile operator-root.cert.pem LDevID.cert.pem",
              tmp_path).strip() == "LDevID.cert.pem: OK"

    # Edge CA: operator CA, authenticated by the LDevID.
    ok("openssl req -nodes -new -subj '/CN=my-device-id Edge CA/serialNumber=WALK-0001' -sha256 "
       "-keyout EdgeCA.key.pem -out EdgeCA.csr", tmp_path)
    ok(f'curl {post} --data-binary "@EdgeCA.csr" {ca} {as_ldevid} '
       f"{est_server.url('edgeca', 'simpleenroll')} | {TO_PEM} EdgeCA.cert.pem", tmp_path)
    assert ok("openssl verify -CAfile operator-root.cert.pem EdgeCA.cert.pem",
              tmp_path).strip() == "EdgeCA.cert.pem: OK"
    constraints = ok("openssl x509 -in EdgeCA.cert.pem -noout -ext basicConstraints", tmp_path)
    assert "CA:TRUE, pathlen:0" in constraints

    # Renewal of the LDevID: simplereenroll with the LDevID itself, new key.
    ok("openssl req -nodes -new -subj /CN=my-device-id/serialNumber=WALK-0001 -sha256 "
       "-keyout LDevID2.key.pem -out LDevID2.csr", tmp_path)
    ok(f'curl {post} --data-binary "@LDevID2.csr" {ca} {as_ldevid} '
       f"{est_server.url('ldevid', 'simplereenroll')} | {TO_PEM} LDevID2.cert.pem", tmp_path)
    old, new = cert(tmp_path / "LDevID.cert.pem"), cert(tmp_path / "LDevID2.cert.pem")
    assert new.subject == old.subject and new.serial_number != old.serial_number


def test_mtls_pipeline_without_client_certificate_gets_401(est_server: RunningEstServer,
                                                           tmp_path: Path) -> None:
    ok("openssl req -nodes -new -subj /CN=x -sha256 -keyout k.pem -out x.csr", tmp_path)
    status = ok(f'curl -s -o body.txt -w "%{{http_code}}" -X POST --data-binary "@x.csr" '
                f'-H "Content-Type:application/pkcs10" --cacert {est_server.tls_ca} '
                f"{est_server.url('edgeca', 'simpleenroll')}", tmp_path)
    assert status == "401"
    assert "requires a TLS client certificate" in (tmp_path / "body.txt").read_text()
