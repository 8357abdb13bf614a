"""The token stays in step with the store: through renewals, rollbacks, crashes and repairs.

Real swtpm, real reference EST server, real tpm2-pkcs11 store; renewals and
repairs run as ``tpmid`` commands (in-process, or as killed real processes).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import REPO
from tests.pkcs11.conftest import (
    SO_PIN,
    SO_PIN_ENV,
    USER_PIN,
    USER_PIN_ENV,
    P11Field,
    needs_tools,
    verify_ecdsa,
)
from tpmid.pkcs11.token import TokenStore
from tpmid.store import Store

pytestmark = [needs_tools, pytest.mark.slow]


def _sign(f: P11Field, name: str) -> None:
    """pkcs11-tool signs with the key the token has for ``name``; the current cert verifies it."""
    entry = f.entry(name)
    digest = hashlib.sha256(b"in step").digest()
    (f.dir / "d.bin").write_bytes(digest)
    r = f.pkcs11_tool("--sign", "--mechanism", "ECDSA", "--id", entry["id"], "--input-file",
                      str(f.dir / "d.bin"), "--output-file", str(f.dir / "s.bin"), pin=True)
    assert r.returncode == 0, r.stderr
    verify_ecdsa(f.current(name).cert, (f.dir / "s.bin").read_bytes(), digest)


def _labels(f: P11Field) -> list[str]:
    return sorted(o.label for o in TokenStore(f.p11_store, "tpmid").view().objects)


def test_check_reports_a_token_out_of_step_and_sync_repairs_it(p11: P11Field) -> None:
    # A renewal by a tpmid whose config had no pkcs11 section leaves the token behind.
    section = p11.data.pop("pkcs11")
    p11.write_config()
    rc, _, err = p11.cli("renew", "ldevid", "--force")
    assert rc == 0, err
    p11.edit(lambda d: d.update(pkcs11=section))

    rc, out, _ = p11.cli("check", "--no-est")
    assert rc == 1
    line = next(ln for ln in out.splitlines() if "ldevid: PKCS#11 token" in ln)
    assert "out of step" in line and "is the key of version 0002" in line, out
    assert "tpmid pkcs11 sync" in out  # the hint
    assert "edge-ca: PKCS#11 token" in out and p11.entry("edge-ca")["in_step"]
    rc, out, _ = p11.cli("pkcs11", "list")
    assert rc == 1 and "OUT OF STEP" in out

    rc, out, err = p11.cli("pkcs11", "sync")
    assert rc == 0, err
    assert "ldevid: linked the key of version 0002 under 'ldevid'" in out
    assert p11.entry("ldevid")["in_step"] and p11.entry("ldevid")["version"] == "0002"
    _sign(p11, "ldevid")
    assert p11.cli("check", "--no-est")[0] == 0
    rc, out, _ = p11.cli("pkcs11", "sync")
    assert rc == 0 and "already in step" in out


def test_a_renewal_the_server_refuses_removes_its_waiting_key(p11: P11Field) -> None:
    p11.fault("ldevid", status=503)
    rc, _, err = p11.cli("renew", "ldevid", "--force")
    assert rc != 0
    assert _labels(p11).count("ldevid.next") == 0
    assert p11.entry("ldevid")["in_step"]
    p11.assert_identity_intact("ldevid")
    _sign(p11, "ldevid")


def test_a_wrong_user_pin_stops_the_enrollment_before_anything_is_sent(
        p11_device: P11Field) -> None:
    f = p11_device
    assert f.cli("enroll", "idevid")[0] == 0
    assert f.cli("pkcs11", "sync")[0] == 0  # the token exists, with the right PINs
    issued = len(f.server.issued())
    rc, out, err = f.cli("enroll", "ldevid", env={**f.env, USER_PIN_ENV: "wrong-pin"})
    assert rc == 3, err
    assert "the PIN does not open PKCS#11 token 'tpmid'" in err
    assert "pkcs11.user_pin" in err  # the hint
    assert "wrong-pin" not in out + err
    assert len(f.server.issued()) == issued  # nothing was sent
    assert f.store.current("ldevid") is None and f.store.journal_get("ldevid") is None
    assert "ldevid.next" not in _labels(f)


def test_without_an_so_pin_tpmid_says_how_to_make_the_token(p11_device: P11Field) -> None:
    f = p11_device
    f.edit(lambda d: d["pkcs11"].pop("so_pin"))
    rc, _, err = f.cli("pkcs11", "sync")
    assert rc == 7
    assert "tpmid cannot make it without pkcs11.so_pin" in err
    assert "`tpmid pkcs11 sync`" in err


def test_an_idevid_asked_into_the_token_is_refused_with_the_reason(p11_device: P11Field) -> None:
    f = p11_device
    f.edit(lambda d: d["identities"]["idevid"].update(pkcs11={"label": "idevid"}))
    rc, _, err = f.cli("pkcs11", "list")
    assert rc == 2
    assert "tpm2-pkcs11 1.9 can link only key files" in err


HOOKED = """
import os, signal, sys
from tpmid.store import fsio
count = {{"n": 0}}
def hook(step, path):
    count["n"] += 1
    with open({counter!r}, "a") as f:
        f.write(step + " " + str(path) + "\\n")
    if count["n"] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
fsio.step_hook = hook
from tpmid.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _renew_killed(f: P11Field, counter: Path, kill_at: int) -> int:
    code = HOOKED.format(counter=str(counter), kill_at=kill_at)
    proc = subprocess.run(
        [sys.executable, "-c", code, "--config", str(f.config_path), "renew", "ldevid",
         "--force"], env={**_base_env(), **f.env}, capture_output=True, text=True, timeout=120,
        cwd=REPO, check=False)
    return proc.returncode


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("TPMID_")}


def test_a_renewal_killed_at_any_durable_step_leaves_token_and_store_in_step(
        p11: P11Field, tmp_path: Path) -> None:
    # A run that is not killed tells the durable steps of a renewal with a token.
    counter = tmp_path / "steps-full"
    assert _renew_killed(p11, counter, kill_at=0) == 0
    steps = counter.read_text().splitlines()
    # The staged key and its journal entry come before the token link, the commit after.
    assert any("keys/ldevid" in s for s in steps) and any(s.startswith("commit:") for s in steps)
    killed = 0
    for k in range(1, len(steps) + 1):
        rc = _renew_killed(p11, tmp_path / f"steps-{k}", kill_at=k)
        killed += rc == -signal.SIGKILL
        # The next command: recovery, the token brought in step, the renewal finished or not.
        proc = p11.run("renew", "ldevid")
        assert proc.returncode == 0, (k, steps[k - 1], proc.stderr)
        store = Store(p11.store_dir)
        assert store.journal_get("ldevid") is None or k == len(steps), (k, steps[k - 1])
        rows = json.loads(p11.run("pkcs11", "list", "--json").stdout)
        ldevid = next(r for r in rows if r["identity"] == "ldevid")
        assert ldevid["in_step"], (k, steps[k - 1], ldevid["problems"])
        labels = _labels(p11)
        assert labels.count("ldevid") == 3 and "ldevid.next" not in labels, (k, labels)
    assert killed == len(steps)
    _sign(p11, "ldevid")


def test_pins_reach_no_argv_no_child_environment_and_no_log(p11_device: P11Field,
                                                            tmp_path: Path) -> None:
    """The token is made and both keys linked under strace: every execve is recorded."""
    if not shutil.which("strace"):
        pytest.skip("needs strace")
    f = p11_device
    for name in ("idevid", "ldevid", "edge-ca"):
        assert f.cli("enroll", name)[0] == 0
    shutil.rmtree(f.p11_store)  # a fresh token: made, then both keys linked
    trace = tmp_path / "trace"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-v", "-s", "8192", "-e", "trace=execve", "-o", str(trace),
         sys.executable, "-m", "tpmid.cli", "-vv", "--config", str(f.config_path), "pkcs11",
         "sync"], env={**_base_env(), **f.env}, capture_output=True, text=True, timeout=180,
        cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "ldevid: linked" in proc.stdout and "edge-ca: linked" in proc.stdout
    execs = [ln for ln in trace.read_text().splitlines() if "execve(" in ln]
    children = execs[1:]  # the first is tpmid itself, whose environment holds the references
    assert children, "tpmid ran no program"
    assert any("ptool_driver.py" in ln for ln in children)
    view = TokenStore(f.p11_store, "tpmid").view()
    assert view.token is not None and view.token.user_salt is not None
    from tpmid.tpm.token import seal_auth

    derived = seal_auth(USER_PIN, view.token.user_salt).decode()
    for secret in (USER_PIN, SO_PIN, derived, USER_PIN_ENV, SO_PIN_ENV):
        leaks = [ln for ln in children if secret in ln]
        assert leaks == [], f"{secret!r} in a child's argv or environment: {leaks[0][:300]}"
    for secret in (USER_PIN, SO_PIN, derived):
        assert secret not in proc.stdout + proc.stderr, "a PIN in tpmid's output or log"
    assert re.search(r"INFO .*created PKCS#11 token 'tpmid'", proc.stderr)  # it did log
