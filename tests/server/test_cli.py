"""`tpmid est-server init|run|hash-secret` as an operator uses them."""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.server.helpers import csr_body, make_csr, new_key, request
from tpmid.cli import main
from tpmid.est import messages
from tpmid.server.auth import verify_secret
from tpmid.testing.estserver import RunningEstServer

REPO = Path(__file__).resolve().parents[2]


def tpmid(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tpmid.cli", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_init_prints_the_secret_once_the_tls_ca_fingerprints_and_urls(tmp_path: Path) -> None:
    out_file = tmp_path / "secret.txt"
    proc = tpmid("est-server", "init", "--dir", str(tmp_path / "srv"), "--secret-out",
                 str(out_file))
    assert proc.returncode == 0, proc.stderr
    secret = re.search(r"IDevID Secret-Value .*: (\S+)$", proc.stdout, re.MULTILINE)
    assert secret is not None
    assert proc.stdout.count(secret.group(1)) == 1
    assert f"{tmp_path / 'srv' / 'tls-ca.pem'}" in proc.stdout
    assert len(re.findall(r"^  (manufacturer|operator|tls) +[0-9a-f]{64}$",
                          proc.stdout, re.MULTILINE)) == 3
    for label in ("idevid", "ldevid", "edgeca"):
        assert f"https://127.0.0.1:8443/.well-known/est/{label}" in proc.stdout
    assert out_file.read_text().strip() == secret.group(1)
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600


def test_init_json_output_is_machine_readable(tmp_path: Path) -> None:
    proc = tpmid("--json", "est-server", "init", "--dir", str(tmp_path / "srv"), "--alg",
                 "ecc-p384")
    data = json.loads(proc.stdout)
    assert data["alg"] == "ecc-p384"
    assert set(data["fingerprints"]) == {"manufacturer", "operator", "tls"}
    assert Path(data["tls_ca"]).is_file()
    config = Path(data["config"]).read_text()
    stored = re.search(r'hash: "([^"]+)"', config)
    assert stored and verify_secret(data["idevid_secret"], stored.group(1))


def test_init_refuses_an_existing_server_directory_with_exit_code_2(tmp_path: Path) -> None:
    assert main(["est-server", "init", "--dir", str(tmp_path / "srv")]) == 0
    assert main(["est-server", "init", "--dir", str(tmp_path / "srv")]) == 2


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "example.com"],
                         ids=["any", "lan-address", "hostname"])
def test_run_refuses_non_loopback_hosts_without_allow_remote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    assert main(["est-server", "init", "--dir", str(tmp_path / "srv")]) == 0
    capsys.readouterr()
    assert main(["est-server", "run", "--dir", str(tmp_path / "srv"), "--host", host]) == 2
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "--allow-remote" in err


def test_run_with_port_0_prints_the_real_port_and_serves_there(
    est_server: RunningEstServer,
) -> None:
    stdout = (est_server.dir / "run.stdout").read_text()
    m = re.search(r"^listening on https://127\.0\.0\.1:(\d+)/$", stdout, re.MULTILINE)
    assert m and int(m.group(1)) == est_server.port != 0
    assert f"idevid  {est_server.url('idevid')}" in stdout
    assert request(est_server.url("idevid", "cacerts"), cafile=est_server.tls_ca).status == 200


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(est_server_factory) -> None:
    srv: RunningEstServer = est_server_factory(
        process=True,
        config=lambda d: d["labels"]["idevid"].update(faults={"delay": "5s"}))
    result: dict[str, object] = {}

    def slow_request() -> None:
        result["reply"] = request(srv.url("idevid", "simpleenroll"), cafile=srv.tls_ca,
                                  method="POST", body=csr_body(make_csr(new_key(), "late")),
                                  headers={"Content-Type": messages.PKCS10,
                                           "Secret-Value": srv.secret})

    start = time.monotonic()
    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.8)  # the request is now inside its 5 s injected delay
    assert srv.process is not None
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(15) == 0
    t.join(15)
    # The stop cut the delay short, and the request still got its answer.
    assert time.monotonic() - start < 4.5
    assert result["reply"].status == 200
    log = (srv.dir / "run.log").read_text()
    assert "status=200" in log and "stopped" in log


def test_sighup_rereads_the_config_of_a_running_process(est_server_factory) -> None:
    srv: RunningEstServer = est_server_factory(process=True)
    body = csr_body(make_csr(new_key(), "hup"))
    hdrs = {"Content-Type": messages.PKCS10, "Secret-Value": srv.secret}
    url = srv.url("idevid", "simpleenroll")
    assert request(url, cafile=srv.tls_ca, method="POST", body=body, headers=hdrs).status == 200
    srv.configure("idevid", pending=1)  # writes config.yaml, sends SIGHUP, waits for reload
    assert request(url, cafile=srv.tls_ca, method="POST", body=body, headers=hdrs).status == 202


def test_a_broken_config_on_sighup_keeps_the_old_one(est_server_factory) -> None:
    srv: RunningEstServer = est_server_factory(process=True)
    original = srv.config_path.read_text()
    srv.config_path.write_text(original.replace("profile: idevid", "profile: bogus"))
    assert srv.process is not None
    srv.process.send_signal(signal.SIGHUP)
    log = srv.dir / "run.log"
    deadline = time.monotonic() + 10
    while "config not reloaded" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    assert request(srv.url("idevid", "cacerts"), cafile=srv.tls_ca).status == 200


def test_hash_secret_reads_stdin_and_prints_a_verifiable_hash() -> None:
    proc = tpmid("est-server", "hash-secret", stdin="my basic password\n")
    assert proc.returncode == 0, proc.stderr
    assert "my basic password" not in proc.stdout
    assert verify_secret("my basic password", proc.stdout.strip())


def test_est_server_appears_in_the_cli_help() -> None:
    proc = tpmid("--help")
    assert "est-server" in proc.stdout
