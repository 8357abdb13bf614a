"""`tpmid daemon` as a real process: signals, and a real-time renewal smoke test.

Real swtpm, the reference EST server (in this test process, real TLS on
loopback), the daemon as a subprocess of the installed CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from tpmid.store import Store
from tpmid.testing.estserver import RunningEstServer, start_est_server
from tpmid.testing.swtpm import Swtpm

SECRET_ENV = "TPMID_TEST_IDEVID_SECRET"


def write_config(path: Path, server: RunningEstServer, tcti: str, store: Path,
                 renew: dict[str, Any] | None = None) -> Path:
    renew = renew or {}
    data = {
        "tpm": {"tcti": tcti},
        "store": {"dir": str(store)},
        "trust": {"est_anchors": [str(server.tls_ca)]},
        "identities": {
            "idevid": {
                "key": {"kind": "persistent", "template": "H-2", "handle": 0x81020000},
                "subject": {"cn": "IDevID", "serial_number": "DAEMON-0001"},
                "est": {"url": server.url("idevid"),
                        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}}},
            },
            "ldevid": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                # The IDevID's serial: the server's ldevid/edgeca labels bind to it.
                "subject": {"cn": "my-device-id", "serial_number": "DAEMON-0001"},
                "est": {"url": server.url("ldevid"), "auth": {"client": "idevid"}},
                "renew": renew,
            },
            "edge-ca": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": "my-edge-ca", "serial_number": "DAEMON-0001"},
                "profile": "ca",
                "est": {"url": server.url("edgeca"), "auth": {"client": "ldevid"}},
                "renew": renew,
            },
        },
    }
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    return path


def tpmid(config: Path, *args: str, env: dict[str, str], timeout: float = 60,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tpmid.cli", "--config", str(config), *args],
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"tpmid {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


class Field:
    def __init__(self, swtpm: Swtpm, tmp: Path, lifetimes: tuple[str, str],
                 renew: dict[str, Any] | None = None) -> None:
        def edit(d: dict[str, Any]) -> None:
            d["labels"]["ldevid"]["lifetime"] = lifetimes[0]
            d["labels"]["edgeca"]["lifetime"] = lifetimes[1]

        self.server = start_est_server(tmp / "est", config=edit)
        self.store = tmp / "store"
        self.config = write_config(tmp / "config.yaml", self.server, swtpm.tcti, self.store, renew)
        self.env = {**os.environ, SECRET_ENV: self.server.secret, "PYTHONUNBUFFERED": "1"}
        self.env.pop("TPMID_CONFIG", None)
        self.env.pop("TPMID_TCTI", None)

    def provision(self) -> None:
        tpmid(self.config, "key", "create", "idevid", env=self.env)
        tpmid(self.config, "enroll", "idevid", env=self.env)

    def start_daemon(self, log: Path) -> subprocess.Popen[str]:
        out = open(log, "w")  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "tpmid.cli", "--config", str(self.config), "daemon"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                text=True)
        finally:
            out.close()


def wait_for(log: Path, text: str, timeout: float, count: int = 1) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = log.read_text(errors="replace")
        if content.count(text) >= count:
            return content
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} x{count} not seen in {timeout}s; log:\n{content[-3000:]}")
        time.sleep(0.05)


@pytest.fixture
def field(swtpm: Swtpm, tmp_path: Path) -> Iterator[Field]:
    f = Field(swtpm, tmp_path, ("1day", "2day"))
    try:
        yield f
    finally:
        f.server.stop()


def test_sigterm_during_the_wait_exits_promptly_and_cleanly(field: Field, tmp_path: Path) -> None:
    field.provision()
    log = tmp_path / "daemon.log"
    proc = field.start_daemon(log)
    try:
        # It enrolls both identities first, then plans and sleeps.
        wait_for(log, "edge-ca: next renewal", timeout=60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        assert rc == 0
        assert time.monotonic() - t0 < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped" in log.read_text()
    store = Store(field.store)
    assert store.current("ldevid") is not None and store.current("edge-ca") is not None


def test_sighup_reloads_the_config_and_a_broken_config_keeps_the_old_one(
        field: Field, tmp_path: Path) -> None:
    field.provision()
    log = tmp_path / "daemon.log"
    proc = field.start_daemon(log)
    try:
        wait_for(log, "edge-ca: next renewal", timeout=60)
        good = field.config.read_text()
        field.config.write_text(good.replace("identities:", "identities: [broken"))
        proc.send_signal(signal.SIGHUP)
        wait_for(log, "configuration reload failed", timeout=10)
        assert proc.poll() is None, "a broken config on reload must not kill the daemon"
        field.config.write_text(good)
        proc.send_signal(signal.SIGHUP)
        wait_for(log, "configuration reloaded", timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_bad_config_at_start_exits_with_the_config_exit_code(field: Field, tmp_path: Path) -> None:
    field.config.write_text("identities: {ldevid: {key: {kind: nonsense}}}\n")
    proc = tpmid(field.config, "daemon", env=field.env, check=False, timeout=30)
    assert proc.returncode == 2
    assert "kind" in proc.stderr


def _spki(cert_path: Path) -> bytes:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.slow
def test_real_time_smoke_daemon_renews_short_lived_certificates_for_30_seconds(
        swtpm: Swtpm, tmp_path: Path) -> None:
    """30 s of wall-clock time: 10 s LDevIDs and 20 s Edge CAs renewed at 50 %."""
    f = Field(swtpm, tmp_path, ("10s", "20s"),
              renew={"threshold": "50%", "retry": "10%", "jitter": "0%"})
    try:
        f.provision()
        log = tmp_path / "daemon.log"
        proc = f.start_daemon(log)
        seen: set[bytes] = set()
        try:
            deadline = time.monotonic() + 31
            while time.monotonic() < deadline:
                cur = Store(f.store).current("ldevid")
                if cur is not None:
                    seen.add(_spki(cur.cert_path))
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        text = log.read_text()
        store = Store(f.store)
        ldevid, edge = store.current("ldevid"), store.current("edge-ca")
        assert ldevid is not None and edge is not None
        # Every 5 s over 30 s: the first enrollment plus at least four renewals,
        # each with a new TPM key; the Edge CA at least twice.
        assert int(ldevid.version) >= 5, text[-3000:]
        assert len(seen) >= 5
        assert int(edge.version) >= 2
        assert "renewal failed" not in text, text[-3000:]
        # Still valid when we stopped: the daemon kept up in real time.
        from datetime import UTC, datetime

        assert ldevid.not_after > datetime.now(UTC)
        check = tpmid(f.config, "check", env=f.env, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        f.server.stop()


def test_a_config_file_others_can_write_is_refused_with_the_fix(field: Field) -> None:
    field.config.chmod(0o666)
    proc = tpmid(field.config, "status", env=field.env, check=False)
    assert proc.returncode == 2
    assert "writable by group and others" in proc.stderr
    assert f"chmod go-w {field.config}" in proc.stderr
