"""The eleven field findings of issue 10, one test each (they failed before the fixes).

Each test reproduces what was found from outside — a hostile server, a damaged
store, a misbehaving TPM, bad input — and asserts what a device must do instead:
a clear error, no lost identity, no hang, no tight loop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from tpm2_pytss.constants import ESYS_TR

from tests.faults.conftest import REPO, SECRET_ENV, Field, assert_key_signs
from tests.support.wiring import enroll
from tpmid.config import RenewConfig, parse_amount
from tpmid.errors import EstRetryLater
from tpmid.policy import AttemptState, decide, jitter_rng
from tpmid.tpm.connection import TpmConnection


class BoundedClock:
    """``now``/``sleep`` for the 202 loop that refuses to be a busy loop."""

    def __init__(self, limit: int = 200) -> None:
        self.t = datetime.now(UTC)
        self.sleeps: list[float] = []
        self.limit = limit

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if len(self.sleeps) > self.limit:
            raise AssertionError(f"more than {self.limit} resends: {self.sleeps[:10]}...")
        self.t += timedelta(seconds=seconds)


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


# ---------------------------------------------------------------- 1. absurd Retry-After


@pytest.mark.parametrize("header", [
    "99999999999999999999999999999",
    "999999999",
    format_datetime(datetime(2099, 1, 1, tzinfo=UTC), usegmt=True),
], ids=["beyond-any-integer", "decades", "http-date-in-2099"])
def test_an_absurd_retry_after_is_clamped_before_expiry_and_breaks_no_command(
        field: Field, header: str) -> None:
    field.fault("ldevid", status=202, retry_after_header=header, operations=["simplereenroll"])
    rc, _, err = field.cli("renew", "ldevid", "--force")
    assert rc == 4 and "202" in err
    _no_traceback(err)
    not_after = field.current("ldevid").not_after

    rc, out, err = field.cli("status", "ldevid", "--json")
    _no_traceback(err)
    (ld,) = json.loads(out)["identities"]
    when = datetime.fromisoformat(ld["next_renewal"]["when"].replace("Z", "+00:00"))
    assert when < not_after, "retries never step past expiry"

    rc, out, err = field.cli("renew", "ldevid")  # plans, and finds it is not due yet
    assert rc == 0, out + err
    _no_traceback(err)
    # What is stored can be read back by every command.
    journal = json.loads((field.store_dir / "journal" / "ldevid.json").read_text())
    assert journal["retry_after"] <= (not_after - datetime.now(UTC)).total_seconds()
    field.assert_identity_intact("ldevid")


def test_a_state_file_holding_an_absurd_retry_after_is_repaired_on_read(field: Field) -> None:
    state = field.store_dir / "state" / "ldevid.json"
    state.write_text(json.dumps({"attempt": {"last_attempt": datetime.now(UTC).isoformat(),
                                             "retry_after": 1e29, "failures": 1,
                                             "last_error": "x"}}))
    rc, out, err = field.cli("status", "ldevid", "--json")
    _no_traceback(err)
    assert rc == 0
    (ld,) = json.loads(out)["identities"]
    assert ld["last_attempt"]["retry_after"] is None


# ---------------------------------------------------------------- 2. Retry-After: 0


@pytest.mark.parametrize("header", [
    "0", format_datetime(datetime(2001, 1, 1, tzinfo=UTC), usegmt=True),
], ids=["zero", "date-in-the-past"])
def test_retry_after_zero_is_floored_so_a_pending_server_is_not_flooded(
        field: Field, header: str) -> None:
    field.fault("idevid", status=202, retry_after_header=header, operations=["simpleenroll"])
    field.edit(lambda d: d["identities"]["idevid"]["est"].update(max_wait="30s"))
    clock = BoundedClock()
    cfg = field.config
    with TpmConnection(field.sim.tcti) as tpm, pytest.raises(EstRetryLater):
        enroll(cfg, "idevid", tpm=tpm, secrets=field.env, now=clock.now, sleep=clock.sleep,
               reenroll=False)
    assert clock.sleeps and min(clock.sleeps) >= 2.0
    assert len(clock.sleeps) <= 15  # 30 s allowed, at least 2 s apart


# ---------------------------------------------------------------- 3. slow server, hung TPM


def _trickle(field: Field, total: str) -> None:
    field.fault("ldevid", trickle="1s", operations=["simplereenroll"])
    field.edit(lambda d: d["identities"]["ldevid"]["est"].update(
        timeout={"connect": 5, "read": 30, "total": total}))


@pytest.mark.slow
def test_an_answer_one_byte_per_second_is_cut_off_at_the_exchange_deadline(
        field: Field) -> None:
    _trickle(field, "4s")
    start = time.monotonic()
    proc = field.run("renew", "ldevid", "--force", timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 4, proc.stderr
    assert "deadline" in proc.stderr or "timed out" in proc.stderr
    assert took < 20
    _no_traceback(proc.stderr)
    field.fault("ldevid")
    field.assert_identity_intact("ldevid")


@pytest.mark.slow
def test_other_commands_use_the_tpm_while_an_exchange_is_slow(field: Field) -> None:
    _trickle(field, "40s")
    issued = len(field.server.issued())
    renew = subprocess.Popen(
        [sys.executable, "-m", "tpmid.cli", "--config", str(field.config_path), "renew",
         "ldevid", "--force"], cwd=REPO, env={**os.environ, **field.env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(field.server.issued()) == issued:  # the answer is on its way, slowly
            assert time.monotonic() < deadline and renew.poll() is None
            time.sleep(0.1)
        info = field.run("tpm", "info", "--json", timeout=15)
        assert info.returncode == 0, info.stderr
    finally:
        renew.kill()
        renew.wait()


@pytest.mark.slow
def test_the_daemon_stops_within_a_second_of_sigterm_while_an_exchange_is_slow(
        field: Field) -> None:
    # A certificate that is due for renewal a few seconds from now, then a slow server.
    field.server.configure("ldevid", lifetime="12s")
    assert field.cli("renew", "ldevid", "--force")[0] == 0
    field.remember()
    _trickle(field, "60s")
    issued = len(field.server.issued())
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tpmid.cli", "--config", str(field.config_path), "daemon"],
        cwd=REPO, env={**os.environ, **field.env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(field.server.issued()) == issued:
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)
        start = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)
        assert time.monotonic() - start < 2.0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    field.fault("ldevid")
    field.assert_identity_intact("ldevid")


@pytest.mark.slow
def test_a_hung_tpm_fails_a_command_after_the_tpm_timeout(field: Field) -> None:
    field.edit(lambda d: d["tpm"].update(timeout="2s"))
    os.kill(field.sim.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        proc = field.run("tpm", "info", timeout=30)
        assert proc.returncode == 3, proc.stderr
        assert "did not answer" in proc.stderr
        assert time.monotonic() - start < 15
    finally:
        os.kill(field.sim.pid, signal.SIGCONT)


# ---------------------------------------------------------------- 4. lost current link


def test_a_lost_current_link_is_restored_to_the_newest_complete_version(field: Field) -> None:
    field.edit(lambda d: d["identities"]["ldevid"].update(renew={"grace": "1day"}))
    assert field.cli("renew", "ldevid", "--force")[0] == 0
    versions = field.store.versions("ldevid")
    assert versions == ["0001", "0002"]
    (field.store_dir / "certs" / "ldevid" / "current").unlink()

    rc, out, err = field.cli("renew", "ldevid")  # start-up recovery, then not due
    assert rc == 0, err
    assert field.store.versions("ldevid") == ["0001", "0002"]
    assert field.current("ldevid").version == "0002"
    assert (field.store_dir / "keys" / "ldevid" / "0001.tss2.pem").exists()
    assert_key_signs(field, "ldevid", field.current("ldevid"))
    assert field.cli("renew", "ldevid", "--force")[0] == 0
    assert field.current("ldevid").version == "0003"  # numbers are never reused


# ---------------------------------------------------------------- 5. damaged current version


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_current_certificate_falls_back_to_the_newest_intact_version(
        field: Field) -> None:
    field.edit(lambda d: d["identities"]["ldevid"].update(renew={"grace": "1day"}))
    assert field.cli("renew", "ldevid", "--force")[0] == 0
    _truncate(field.store_dir / "certs" / "ldevid" / "0002" / "cert.pem")

    rc, out, err = field.cli("status", "ldevid")
    assert rc != 0
    assert "damaged" in out and "0001" in out
    _no_traceback(err)

    rc, out, err = field.cli("renew", "ldevid")  # recovery falls back, then not due
    assert rc == 0, err
    assert field.current("ldevid").version == "0001"
    assert (field.store_dir / "certs" / "ldevid" / "0002").exists()  # kept for forensics
    assert_key_signs(field, "ldevid", field.current("ldevid"))
    assert field.cli("renew", "ldevid", "--force")[0] == 0  # renews from the intact one
    assert field.current("ldevid").version == "0003"


def test_a_damaged_current_version_without_an_intact_one_renews_through_the_idevid(
        field: Field) -> None:
    _truncate(field.store_dir / "certs" / "ldevid" / "0001" / "cert.pem")
    rc, out, _ = field.cli("status", "ldevid")
    assert rc != 0 and "damaged" in out
    rc, _, err = field.cli("renew", "ldevid")
    assert rc == 0, err
    cur = field.current("ldevid")
    assert cur.version == "0002"
    assert_key_signs(field, "ldevid", cur)
    assert field.server.issued()[-1]["operation"] == "simpleenroll"  # through the IDevID


# ---------------------------------------------------------------- 6. TPM2_Clear


def _clear(field: Field) -> None:
    with TpmConnection(field.sim.tcti) as tpm:
        tpm.esapi.clear(ESYS_TR.LOCKOUT)


def test_after_tpm2_clear_renew_heals_the_device_through_its_idevid(field: Field) -> None:
    idevid_cert = field.current("idevid").cert
    _clear(field)
    rc, out, err = field.cli("renew", "ldevid", "--force")
    assert rc == 0, err
    rc, out, err = field.cli("renew", "edge-ca", "--force")
    assert rc == 0, err
    with TpmConnection(field.sim.tcti) as tpm:
        assert 0x81020000 in tpm.persistent_handles()  # re-persisted
    assert field.current("idevid").cert == idevid_cert  # the same key came back
    for name in ("idevid", "ldevid", "edge-ca"):
        assert_key_signs(field, name, field.current(name))
    assert field.cli("check", "--no-est")[0] == 0


@pytest.mark.slow
def test_after_tpm2_clear_the_daemon_renews_unusable_keys_at_once(field: Field) -> None:
    versions = {n: field.current(n).version for n in ("ldevid", "edge-ca")}
    _clear(field)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tpmid.cli", "--config", str(field.config_path), "daemon"],
        cwd=REPO, env={**os.environ, **field.env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while any(field.current(n).version == versions[n] for n in versions):
            assert time.monotonic() < deadline, "the daemon did not heal the device"
            assert daemon.poll() is None
            time.sleep(0.2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=20)
    assert "TPM2_Clear" in err or "cleared" in err
    for name in ("idevid", "ldevid", "edge-ca"):
        assert_key_signs(field, name, field.current(name))


# ---------------------------------------------------------------- 7. hook environment


def test_hooks_get_a_minimal_environment_without_tpmids_secrets(field: Field,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "hook-env.json"
    hook = tmp_path / "hook.py"
    hook.write_text(textwrap.dedent(f"""\
        import json, os
        open({str(out)!r}, "w").write(json.dumps(dict(os.environ)))
    """))
    field.edit(lambda d: d["identities"]["ldevid"].update(
        hooks={"after_renew": [sys.executable, str(hook)], "environment": ["KEEP_ME"]}))
    env = {**field.env, "KEEP_ME": "yes", "UNRELATED": "no", "TPMID_OWNER_PW": "s3cret"}
    rc, _, err = field.cli("renew", "ldevid", "--force", env=env)
    assert rc == 0, err
    seen = json.loads(out.read_text())
    assert seen["TPMID_IDENTITY"] == "ldevid" and "PATH" in seen
    assert seen["KEEP_ME"] == "yes"
    assert SECRET_ENV not in seen and "UNRELATED" not in seen
    assert field.server.secret not in json.dumps(seen)


# ---------------------------------------------------------------- 8. threshold > lifetime


def test_a_threshold_longer_than_the_lifetime_renews_at_most_every_half_lifetime() -> None:
    nb = datetime(2027, 1, 1, tzinfo=UTC)
    na = nb + timedelta(days=7)
    policy = RenewConfig(threshold=parse_amount("30day", "threshold"),
                         jitter=parse_amount("0%", "jitter"))
    d = decide(not_before=nb, not_after=na, now=nb + timedelta(minutes=1), policy=policy,
               attempt=AttemptState.succeeded(nb), rng=jitter_rng("ldevid", 1))
    assert d.action == "renew-at"
    assert d.when >= nb + timedelta(days=3.5)
    assert "lifetime" in d.reason


def test_a_ca_issuing_tiny_lifetimes_is_not_renewed_in_a_tight_loop() -> None:
    nb = datetime(2027, 1, 1, tzinfo=UTC)
    policy = RenewConfig()
    d = decide(not_before=nb, not_after=nb + timedelta(seconds=1), now=nb + timedelta(seconds=2),
               policy=policy, attempt=AttemptState.succeeded(nb), rng=jitter_rng("ldevid", 1))
    assert d.when >= nb + timedelta(seconds=5)


# ---------------------------------------------------------------- 9. inputs that crashed


@pytest.mark.parametrize(("edit", "expect"), [
    (lambda d: d["identities"]["ldevid"]["subject"].update(cn="x" * 100_000), "cn"),
    (lambda d: d["identities"]["ldevid"].update(renew={"threshold": math.nan}), "threshold"),
    (lambda d: d["identities"]["ldevid"]["est"].update(url="https://127.0.0.1:99999/x"),
     "port"),
    (lambda d: d["identities"]["ldevid"]["est"].update(timeout={"read": math.inf}), "read"),
], ids=["huge-cn", "nan-threshold", "port-99999", "infinite-read-timeout"])
def test_bad_config_values_are_clear_errors_not_tracebacks(field_device: Field, edit: Any,
                                                           expect: str) -> None:
    field_device.edit(edit)
    proc = field_device.run("enroll", "ldevid")
    assert proc.returncode == 2, proc.stderr
    assert "tpmid: error:" in proc.stderr and expect in proc.stderr
    _no_traceback(proc.stderr)


def test_a_binary_config_file_is_a_clear_error(field_device: Field) -> None:
    field_device.config_path.write_bytes(b"\x00\xff\xfe binary \x00" * 50)
    proc = field_device.run("status")
    assert proc.returncode == 2 and "tpmid: error:" in proc.stderr
    _no_traceback(proc.stderr)


def test_est_server_on_an_impossible_port_is_a_clear_error(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "tpmid.cli", "est-server"]
    assert subprocess.run([*run, "init", "--dir", str(tmp_path / "s")], cwd=REPO,
                          capture_output=True, timeout=60).returncode == 0
    proc = subprocess.run([*run, "run", "--dir", str(tmp_path / "s"), "--port", "99999"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error:" in proc.stderr and "port 99999" in proc.stderr
    _no_traceback(proc.stderr)


# ---------------------------------------------------------------- 10. server binds requests


def test_an_enrolled_device_cannot_obtain_a_certificate_for_another_device(
        field: Field) -> None:
    issued = len(field.server.issued())
    field.edit(lambda d: d["identities"]["ldevid"]["subject"].update(
        cn="device-B", serial_number="FIELD-9999"))
    rc, _, err = field.cli("enroll", "ldevid")
    assert rc in (4, 5) and ("subject" in err or "serial" in err), err
    assert "subject.serial_number" in err  # the hint says what to configure
    field.edit(lambda d: d["identities"]["edge-ca"]["subject"].update(
        cn="somebody else's Edge CA", serial_number="FIELD-9999"))
    rc, _, err = field.cli("enroll", "edge-ca")
    assert rc in (4, 5), err
    assert len(field.server.issued()) == issued


# ---------------------------------------------------------------- 11. leftover transients


def test_check_flushes_objects_a_killed_tpmid_process_left_and_only_those(
        field: Field) -> None:
    # A real tpmid process loads two objects through the production wiring, then dies.
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""\
        import os, signal
        from tpmid.config import load_config
        from tpmid.wiring import Runtime
        from tpmid.wiring.tpm import tpm_opener
        rt = Runtime(load_config(__import__("pathlib").Path({str(field.config_path)!r})))
        with tpm_opener(rt)() as tpm:
            a = tpm.derive_idevid("H-2")
            b = tpm.derive_idevid("H-3")
            os.kill(os.getpid(), signal.SIGKILL)
    """)], cwd=REPO, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    with TpmConnection(field.sim.tcti) as tpm:
        left = tpm.transient_handles()
        assert len(left) == 2
        # ...and one object of a live process that is not tpmid's business.
        mine = tpm.derive_idevid("H-2")
        (theirs,) = set(tpm.transient_handles()) - set(left)
        try:
            rc, out, err = field.cli("check", "--no-est")
            assert rc == 0, out + err
            assert "flushed 2" in out + err
            assert tpm.transient_handles() == [theirs]
        finally:
            mine.close()
