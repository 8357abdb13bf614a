"""``tpmid status``: per-identity state from the store, on a real swtpm and reference EST server.

Each test enrolls real certificates (swtpm keys, reference EST server over
loopback TLS). States that depend on the time (renew-due, expired,
not-yet-valid) are evaluated with an injected ``now`` through
:func:`collect_status`, except one renew-due test that waits for a 20-second
certificate to cross its threshold in real time.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from tests.lifecycle.test_status_support import (  # noqa: F401  (pytest fixtures)
    IDEVID_HANDLE,
    Device,
    device_fixture,
    enrolled_fixture,
    own_server_device_fixture,
)
from tpmid.errors import EstRetryLater
from tpmid.lifecycle.status import collect_status
from tpmid.policy import AttemptState
from tpmid.render import iso
from tpmid.render import serial as render_serial


def _spki_sha256(dev: Device, name: str) -> str:
    cert = dev.current(name).cert
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def test_status_before_enrollment_reports_every_identity_missing(device: Device) -> None:
    rc, data = device.cli_json("status")
    assert rc == 0
    states = {i["name"]: i["state"] for i in data["identities"]}
    assert states == {"idevid": "missing", "ldevid": "missing", "edgeca": "missing"}
    by_name = {i["name"]: i for i in data["identities"]}
    assert by_name["idevid"]["next_renewal"] is None  # the IDevID is never auto-renewed
    assert by_name["idevid"]["auto_renew"] is False
    assert by_name["ldevid"]["auto_renew"] is True
    assert not device.store_dir.exists(), "status must not create the store"

    rc, out, _ = device.cli("status")
    assert "ldevid: missing" in out
    assert "hint:         enroll it: tpmid enroll ldevid" in out
    assert "n/a (not renewed automatically)" in out


def test_status_of_an_enrolled_device_shows_certificate_key_placement_and_schedule(
    enrolled: Device,
) -> None:
    rc, data = enrolled.cli_json("status")
    assert rc == 0
    by_name = {i["name"]: i for i in data["identities"]}
    assert {n: i["state"] for n, i in by_name.items()} == {
        "idevid": "ok", "ldevid": "ok", "edgeca": "ok"}

    ld = by_name["ldevid"]
    cert = enrolled.current("ldevid").cert
    assert ld["subject"] == "serialNumber=STATUS-0001,CN=status-device"
    assert ld["issuer"] == cert.issuer.rfc4514_string()
    assert ld["serial"] == render_serial(cert.serial_number)
    assert ld["not_before"] == iso(cert.not_valid_before_utc)
    assert ld["not_after"] == iso(cert.not_valid_after_utc)
    assert ld["public_key_sha256"] == _spki_sha256(enrolled, "ldevid")
    assert ld["key"]["kind"] == "file"
    assert ld["key"]["path"] == str(enrolled.enrolled["ldevid"].key_path)
    assert 0 <= ld["lifetime_elapsed_percent"] < 1
    # The reference server's ldevid label issues 7-day certificates; the default
    # threshold is 80 % with up to 2 % jitter earlier.
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    when = datetime.fromisoformat(ld["next_renewal"]["when"].replace("Z", "+00:00"))
    assert ld["next_renewal"]["action"] == "renew-at"
    assert nb + 0.78 * (na - nb) - timedelta(seconds=1) <= when <= nb + 0.8 * (na - nb)
    assert ld["last_attempt"] is None and ld["pending"] is None

    idev = by_name["idevid"]
    assert idev["key"] == {"kind": "persistent", "description": "persistent H-2 at 0x81020000",
                           "handle": f"{IDEVID_HANDLE:#010x}", "template": "H-2",
                           "alg": "ecc-p256", "path": None}
    assert idev["next_renewal"] is None
    assert idev["public_key_sha256"] == _spki_sha256(enrolled, "idevid")

    rc, out, _ = enrolled.cli("status", "idevid", "ldevid")
    assert rc == 0
    assert "edgeca" not in out
    assert "idevid: ok\n" in out and "ldevid: ok\n" in out
    assert f"public key:   SHA-256 {_spki_sha256(enrolled, 'ldevid')}" in out
    assert "next renewal: n/a (not renewed automatically)" in out
    assert "key:          persistent H-2 at 0x81020000\n" in out


def test_status_needs_no_tpm(enrolled: Device) -> None:
    """Status reads the store only, so it works while the TPM is unavailable."""
    enrolled.sim.stop()
    rc, data = enrolled.cli_json("status")
    assert rc == 0
    assert [i["state"] for i in data["identities"]] == ["ok", "ok", "ok"]


TIMES = {
    # name: (offset from the ldevid certificate, expected state, expected action)
    "one minute after issue is ok": ("nb", timedelta(minutes=1), "ok", "renew-at"),
    "past the 80% threshold is renew-due": ("nb", timedelta(days=7 * 0.9), "renew-due",
                                            "renew-now"),
    "after notAfter is expired": ("na", timedelta(seconds=1), "expired", "renew-now"),
    "an hour before notBefore is not-yet-valid": ("nb", -timedelta(hours=1), "not-yet-valid",
                                                  "wait-for-clock"),
}


@pytest.mark.parametrize(("base", "offset", "state", "action"), TIMES.values(), ids=TIMES.keys())
def test_ldevid_state_follows_the_clock(enrolled: Device, base: str, offset: timedelta,
                                        state: str, action: str) -> None:
    cur = enrolled.current("ldevid")
    now = (cur.not_before if base == "nb" else cur.not_after) + offset
    records = {r.name: r for r in collect_status(enrolled.config, enrolled.store, now=now)}
    ld = records["ldevid"]
    assert ld.state == state
    assert ld.next_renewal is not None and ld.next_renewal.action == action
    assert records["idevid"].next_renewal is None
    assert records["idevid"].next_renewal_text() == "n/a (not renewed automatically)"
    data = ld.to_json()
    assert data["state"] == state
    if state == "expired":
        assert data["lifetime_elapsed_percent"] == 100
        assert ld.next_renewal_text() == "now (expired)"
    if state == "not-yet-valid":
        assert "waiting for a plausible clock" in ld.next_renewal_text()


def test_a_six_second_certificate_becomes_renew_due_in_real_time(
    own_server_device: Device,
) -> None:
    dev = own_server_device
    dev.server.configure("ldevid", lifetime="6s")
    # Renew 2 s before expiry, i.e. four seconds after issue (minus up to 2 % jitter).
    dev.edit(lambda d: d["identities"]["ldevid"].update(renew={"threshold": "2s"}))
    dev.enroll("idevid")
    dev.enroll("ldevid")
    cur = dev.current("ldevid")
    assert cur.not_after - cur.not_before == timedelta(seconds=6)
    delay = (cur.not_before + timedelta(seconds=4.2) - datetime.now(UTC)).total_seconds()
    time.sleep(max(0.0, delay))
    rc, out, _ = dev.cli("status", "ldevid")
    assert rc == 0
    assert "ldevid: renew-due" in out
    assert "next renewal: now (2 s before expiry)" in out


def test_status_shows_the_last_failed_attempt_and_schedules_the_retry(enrolled: Device) -> None:
    store = enrolled.store
    cur = enrolled.current("ldevid")
    failed_at = cur.not_before + timedelta(days=6)
    with store.identity_lock("ldevid"):
        store.save_state("ldevid", AttemptState().failed(
            failed_at, "https://127.0.0.1/.well-known/est/ldevid/simplereenroll: 503"))
    now = failed_at + timedelta(minutes=5)
    (ld,) = collect_status(enrolled.config, enrolled.store, now=now, names=["ldevid"])
    assert ld.state == "renew-due"
    assert ld.next_renewal is not None and ld.next_renewal.action == "retry-at"
    assert ld.attempt is not None and ld.attempt.failures == 1
    data = ld.to_json()
    assert data["last_attempt"]["error"].endswith("simplereenroll: 503")
    assert data["last_attempt"]["time"] == iso(failed_at)

    rc, out, _ = enrolled.cli("status", "ldevid")
    assert "FAILED (1 failure): https://127.0.0.1/.well-known/est/ldevid/simplereenroll: 503" \
        in out


def test_status_shows_pending_work_after_the_server_answered_202(
    own_server_device: Device,
) -> None:
    dev = own_server_device
    dev.server.configure("ldevid", pending=5, retry_after="60s")
    dev.edit(lambda d: d["identities"]["ldevid"]["est"].update(max_wait=0))
    dev.enroll("idevid")
    with pytest.raises(EstRetryLater):
        dev.enroll("ldevid")
    rc, data = dev.cli_json("status", "ldevid")
    ld = data["identities"][0]
    assert ld["state"] == "missing"
    assert ld["pending"]["phase"] == "pending"
    assert ld["pending"]["operation"] == "enroll"
    assert ld["pending"]["retry_after"] == 60
    rc, out, _ = dev.cli("status", "ldevid")
    assert "in flight:    enroll (simpleenroll), phase pending, server Retry-After 60 s" in out


def test_status_of_an_unknown_identity_is_a_config_error(enrolled: Device) -> None:
    rc, out, err = enrolled.cli("status", "nope")
    assert rc == 2
    assert "configured: edgeca, idevid, ldevid" in err
