"""A device whose EST Basic password is sealed to its TPM, end to end.

Real swtpm, a real ``tpmid est-server run`` process whose idevid label wants
HTTP Basic, and the real command line: ``tpmid secret seal`` (the value on
standard input of a real process), ``tpmid provision``, a re-bootstrap with
``tpmid enroll idevid``, ``tpmid reset`` and ``tpmid secret remove``. Afterwards
no file the device or the test wrote holds the password.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tpmid.cli import main
from tpmid.server import hash_secret
from tpmid.testing.estserver import RunningEstServer, tpmid_command
from tpmid.testing.swtpm import Swtpm

PASSWORD = "sealed-basic-pw-4c1e7b92d0"
SERIAL = "SEAL-0001"


@pytest.fixture
def device(swtpm: Swtpm, est_server_factory: Callable[..., RunningEstServer],
           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    server = est_server_factory(process=True, labels={"idevid": {"auth": {"basic": {
        "username": "factory", "hash": hash_secret(PASSWORD)}}}})
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o700)
    config: dict[str, Any] = {
        "tpm": {"tcti": swtpm.tcti},
        "store": {"dir": str(tmp_path / "store")},
        "trust": {"est_anchors": [str(server.tls_ca)]},
        "identities": {
            "idevid": {
                "key": {"kind": "persistent", "template": "H-2"},
                "subject": {"cn": "IDevID", "serial_number": SERIAL},
                "est": {"url": server.url("idevid"), "auth": {"basic": {
                    "username": "factory", "password": {"sealed": "est-password"}}}},
            },
            "ldevid": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": "sealed-device", "serial_number": SERIAL},
                "est": {"url": server.url("ldevid"), "auth": {"client": "idevid"}},
            },
        },
    }
    path = etc / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    monkeypatch.delenv("TPMID_TCTI", raising=False)
    monkeypatch.setenv("TPMID_CONFIG", str(path))
    yield {"config": path, "store": tmp_path / "store", "server": server, "root": tmp_path}


def tpmid(*args: str, stdin: str = "", env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """tpmid as a real process (its own stdin, environment and TPM connection)."""
    return subprocess.run(tpmid_command(*args), input=stdin, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, check=False)


def files_holding(needle: bytes, roots: list[Path], newer_than: float) -> set[Path]:
    found = set()
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = Path(dirpath) / n
                try:
                    if p.is_symlink() or not p.is_file() or p.stat().st_mtime < newer_than:
                        continue
                    if needle in p.read_bytes():
                        found.add(p)
                except OSError:
                    continue  # another process's file, gone or unreadable
    return found


@pytest.mark.slow
def test_provision_and_rebootstrap_with_a_sealed_basic_password_leave_it_in_no_file(
    device: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.time() - 1
    sealed = tpmid("secret", "seal", "est-password", stdin=PASSWORD + "\n")
    assert sealed.returncode == 0, sealed.stderr
    assert "sealed est-password (bound to no PCRs)" in sealed.stdout
    assert "no config entry uses it" not in sealed.stdout  # the config's basic.password does
    assert PASSWORD not in sealed.stdout + sealed.stderr

    assert main(["provision", "--serial", SERIAL, "--station", "test",
                 "--manifest", str(device["root"] / "manifest.jsonl")]) == 0, \
        capsys.readouterr()
    assert main(["enroll", "ldevid"]) == 0, capsys.readouterr()
    # Re-bootstrap: a new simpleenroll of the IDevID with the sealed Basic password,
    # in a process of its own.
    again = tpmid("enroll", "idevid", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["version"] == "0002"
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err + again.stdout + again.stderr

    roots = [device["store"], device["config"].parent, device["root"],
             Path(tempfile.gettempdir())]
    control = device["root"] / "control"  # the search finds the password where it is
    control.write_text(f"x{PASSWORD}y")
    assert files_holding(PASSWORD.encode(), roots, started) == {control}
    control.unlink()
    assert files_holding(PASSWORD.encode(), roots, started) == set()
    assert (device["store"] / "sealed" / "est-password.json").is_file()


@pytest.mark.slow
def test_reset_keeps_sealed_secrets_and_remove_makes_requests_fail_clearly(
    device: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    sealed = tpmid("secret", "seal", "est-password", "--from-env", "EST_PW",
                   env={"EST_PW": PASSWORD})
    assert sealed.returncode == 0, sealed.stderr
    assert main(["key", "create", "idevid"]) == 0
    assert main(["enroll", "idevid"]) == 0, capsys.readouterr()
    capsys.readouterr()

    assert main(["reset", "--yes", "--include-idevid"]) == 0
    assert "sealed secrets are never reset: est-password kept" in capsys.readouterr().out
    assert (device["store"] / "sealed" / "est-password.json").is_file()
    assert main(["secret", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["name"] == "est-password" and listed["stored"] is True
    assert listed["referenced_by"] == ["identities.idevid.est.auth.basic.password"]
    assert listed["bound_to"] == "no PCRs"
    assert main(["key", "create", "idevid"]) == 0
    assert main(["enroll", "idevid"]) == 0  # still opens after the reset

    assert main(["secret", "remove", "est-password"]) == 0
    out = capsys.readouterr().out
    assert "still used by identities.idevid.est.auth.basic.password" in out
    assert main(["enroll", "idevid"]) == 7
    err = capsys.readouterr().err
    assert "no sealed secret named 'est-password'" in err
    assert "tpmid secret seal est-password" in err
    assert main(["secret", "list"]) == 1
    assert "est-password: not sealed" in capsys.readouterr().out


def test_a_value_on_the_command_line_is_refused_without_being_echoed(
    device: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["secret", "seal", "est-password", PASSWORD]) == 2
    out = capsys.readouterr()
    assert "never takes a secret's value from the command line" in out.err
    assert PASSWORD not in out.out + out.err
    assert not (device["store"] / "sealed").exists()


def test_sealing_twice_needs_force(device: dict[str, Any]) -> None:
    assert tpmid("secret", "seal", "est-password", stdin=PASSWORD).returncode == 0
    second = tpmid("secret", "seal", "est-password", stdin="other")
    assert second.returncode == 7
    assert "already sealed" in second.stderr and "--force" in second.stderr
    assert opened(device["config"]) == PASSWORD
    assert tpmid("secret", "seal", "est-password", "--force", stdin="other\r\n").returncode == 0
    assert opened(device["config"]) == "other"


@pytest.mark.slow
def test_a_pcr_bound_password_stops_enrollment_with_a_tpm_error_after_the_pcr_changes(
    device: dict[str, Any], swtpm: Swtpm, capsys: pytest.CaptureFixture[str],
) -> None:
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    from tpmid.tpm.connection import TpmConnection

    data = yaml.safe_load(device["config"].read_text())
    data["secrets"] = {"est-password": {"pcrs": [16]}}
    device["config"].write_text(yaml.safe_dump(data))
    assert tpmid("secret", "seal", "est-password", stdin=PASSWORD).returncode == 0
    assert main(["secret", "list"]) == 0
    assert "bound to sha256:16" in capsys.readouterr().out
    assert main(["key", "create", "idevid"]) == 0
    assert main(["enroll", "idevid"]) == 0
    capsys.readouterr()
    assert sealed_check() == (True, "stored and openable by this TPM (bound to sha256:16)")
    with TpmConnection(swtpm.tcti) as tpm:
        digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x01" * 32))
        tpm.esapi.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([digest]))
    ok, detail = sealed_check()  # found before a request needs it
    assert not ok and "which changed since it was sealed" in detail
    assert main(["enroll", "idevid"]) == 3
    err = capsys.readouterr().err
    assert "sealed secret est-password is bound to PCRs sha256:16, which changed" in err
    assert "hint:" in err and "tpmid secret seal est-password --force" in err


def test_on_a_terminal_seal_prompts_twice_without_echo(device: dict[str, Any]) -> None:
    import fcntl
    import pty
    import select
    import termios

    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # the pty becomes the child's /dev/tty
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(tpmid_command("secret", "seal", "est-password"), stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=controlling_terminal)
    os.close(slave)
    seen = b""

    def read_until(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while text not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        assert text in seen, seen

    try:
        read_until(b"value of sealed secret est-password: ")
        os.write(master, PASSWORD.encode() + b"\n")
        read_until(b"again: ")
        os.write(master, PASSWORD.encode() + b"\n")
        out, err = proc.communicate(timeout=60)
        try:
            while select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 4096)
        except OSError:
            pass  # the terminal closed with the process
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert PASSWORD.encode() not in seen  # typed, never echoed
    assert b"sealed est-password" in out
    assert opened(device["config"]) == PASSWORD


def sealed_check() -> tuple[bool, str]:
    """What `tpmid check` says of the sealed est-password."""
    done = tpmid("check", "--no-est", "--json")
    (item,) = [c for c in json.loads(done.stdout)
               if c["name"] == "sealed secret est-password"]
    return item["ok"], item["detail"]


def opened(config_path: Path) -> str:
    """The sealed est-password as tpmid's secret resolver unseals it."""
    from tpmid.config import SecretRef, load_config
    from tpmid.wiring import Runtime
    from tpmid.wiring.tpm import tpm_opener

    rt = Runtime(load_config(config_path))
    tpm_opener(rt)
    return rt.secret(SecretRef(sealed="est-password"))
