"""What an operator sees while tpmid works: progress, status lines, clean output ends.

Issue 11: waiting on a 202 says so (one line per state change at the default
verbosity, a countdown at -v), systemd's STATUS= follows what the daemon does,
journald gets one timestamp per line, `tpmid ... | head` ends cleanly, and the
hint after a 202 names the command that resends the request.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.faults.conftest import REPO, Field


def test_a_202_wait_is_announced_and_the_hint_names_the_command_that_resends(
        field: Field) -> None:
    field.fault("ldevid", status=202, retry_after=2, operations=["simplereenroll"])
    field.edit(lambda d: d["identities"]["ldevid"]["est"].update(max_wait="3s"))
    rc, _, err = field.cli("renew", "ldevid", "--force")
    assert rc == 4, err
    assert err.count("202 Accepted, the CA is processing the request; resending it in 2 s") == 1
    assert "this command waits at most 3 s (est.max_wait)" in err
    hint = re.search(r"tpmid: hint: .*`(tpmid renew ldevid)`", err)
    assert hint is not None, err
    # The hint works: once the CA has decided, that command resends the same CSR.
    field.fault("ldevid")
    pending = field.store.journal_get("ldevid")
    assert pending is not None and pending.phase == "pending"
    time.sleep(2)
    rc, out, err = field.cli("renew", "ldevid")
    assert rc == 0, err
    assert field.store.journal_get("ldevid") is None
    assert field.server.issued()[-1]["operation"] == "simplereenroll"


def test_a_202_wait_counts_down_at_verbose(field: Field) -> None:
    field.fault("ldevid", status=202, retry_after=3, operations=["simplereenroll"], times=1)
    proc = field.run("-v", "renew", "ldevid", "--force")  # a real process: its own logging
    assert proc.returncode == 0, proc.stderr
    assert "resending in 2 s" in proc.stderr and "resending in 1 s" in proc.stderr


def _notify_socket(tmp: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp / "notify"))
    sock.settimeout(0.2)
    return sock


def test_systemd_status_follows_the_daemon(field: Field, tmp_path: Path) -> None:
    field.server.configure("ldevid", lifetime="12s")  # due for renewal within seconds
    assert field.cli("renew", "ldevid", "--force")[0] == 0
    sock = _notify_socket(tmp_path)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tpmid.cli", "--config", str(field.config_path), "daemon"],
        cwd=REPO, env={**os.environ, **field.env, "NOTIFY_SOCKET": str(tmp_path / "notify")},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 40
        while not any(m.startswith("STATUS=idle; next: ldevid") for m in seen[1:]) \
                or "STATUS=renewing ldevid" not in seen:
            assert time.monotonic() < deadline, seen
            try:
                seen.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=20)
    assert seen[0].startswith("READY=1\nSTATUS=started; managing ldevid, edge-ca")


def test_under_journald_each_log_line_has_one_timestamp(field: Field) -> None:
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ", re.M)
    plain = field.run("-v", "renew", "ldevid", "--force")
    assert plain.returncode == 0 and stamp.search(plain.stderr), plain.stderr
    journald = field.run("-v", "renew", "ldevid", "--force", env={"JOURNAL_STREAM": "8:12345"})
    assert journald.returncode == 0, journald.stderr
    assert re.search(r"^INFO tpmid\.", journald.stderr, re.M), journald.stderr
    assert not stamp.search(journald.stderr)


def test_a_closed_stdout_ends_the_command_cleanly(field: Field) -> None:
    proc = subprocess.run(
        f"{sys.executable} -m tpmid.cli --config {field.config_path} status | head -1",
        shell=True, cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, **field.env})
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    assert proc.stdout.startswith("idevid:")
