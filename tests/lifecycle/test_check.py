"""``tpmid check`` on a real swtpm, a real store and the reference EST server over loopback TLS.

A freshly enrolled device passes every check; each failure is produced for
real (TPM stopped, IDevID evicted, a foreign key at the IDevID handle, a
certificate for another key committed to the store, an untrusted or stopped EST
server, world-writable files, a TPM in dictionary-attack lockout). Only the
clock is injected (``run_checks(now=...)``) for the expired-certificate and
implausible-clock cases, because the system clock cannot be moved in a test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.lifecycle.test_status_support import (  # noqa: F401  (pytest fixtures)
    IDEVID_HANDLE,
    Device,
    device_fixture,
    enrolled_fixture,
    own_server_device_fixture,
)
from tests.tpm.helpers import run_tool
from tpmid.lifecycle.check import CheckResult, all_passed, run_checks
from tpmid.policy import RELEASE_DATE
from tpmid.render import serial as render_serial
from tpmid.store import Store
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import evict_persistent
from tpmid.wiring.est import fetch_cacerts

EXPECTED_CHECKS = [
    "config file permissions", "store permissions", "clock plausible", "TPM reachable",
    "TPM not in lockout",
    "TPM object slots",
    *(f"{n}: {c}" for n in ("idevid", "ldevid", "edgeca")
      for c in ("key", "certificate valid now", "certificate chain", "certificate matches key")),
    "idevid: EST server", "ldevid: EST server", "edgeca: EST server",
]


def checks(dev: Device, now: datetime | None = None) -> dict[str, CheckResult]:
    """Run every check through the library with the device's TPM; by name."""
    results = run_checks(dev.config, open_store=lambda: Store(dev.config.store.dir, create=False),
                         open_tpm=lambda: TpmConnection(dev.sim.tcti),
                         now=now or datetime.now(UTC), config_path=dev.config_path,
                         fetch_cacerts=fetch_cacerts)
    by_name = {r.name: r for r in results}
    assert len(by_name) == len(results), "check names must be unique"
    return by_name


def failed(results: dict[str, CheckResult]) -> set[str]:
    return {n for n, r in results.items() if not r.ok}


# --------------------------------------------------------------------------- passing


def test_freshly_enrolled_device_passes_every_check_and_leaves_no_transient_objects(
    enrolled: Device,
) -> None:
    rc, out, _ = enrolled.cli("check")
    assert rc == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    result_lines = lines[:-1]
    assert len(result_lines) == len(EXPECTED_CHECKS)
    assert all(line.startswith("✔ ok  ") for line in result_lines), out
    for name in EXPECTED_CHECKS:
        assert any(line.startswith(f"✔ ok    {name}: ") for line in result_lines), name
    assert "FAIL" not in out
    assert lines[-1] == f"all {len(EXPECTED_CHECKS)} checks passed"
    assert enrolled.transients() == []

    rc, data = enrolled.cli_json("check")
    assert rc == 0
    assert [r["name"] for r in data] == EXPECTED_CHECKS
    assert all(r["ok"] and not r["skipped"] and r["hint"] is None for r in data)
    assert enrolled.transients() == []


def test_check_without_est_sends_nothing_over_the_network(enrolled: Device) -> None:
    before = len(enrolled.server.issued())
    rc, data = enrolled.cli_json("check", "--no-est")
    assert rc == 0
    assert not any(r["name"].endswith("EST server") for r in data)
    assert len(enrolled.server.issued()) == before


# --------------------------------------------------------------------------- TPM and keys


def test_stopped_tpm_fails_and_skips_the_key_checks_but_still_checks_certificates(
    enrolled: Device,
) -> None:
    enrolled.sim.stop()
    rc, out, _ = enrolled.cli("check")
    assert rc == 1
    assert "✘ FAIL  TPM reachable: TPM not reachable through TCTI" in out
    assert "hint: check that the TPM or simulator is running" in out
    assert "- skip  ldevid: key: not checked: the TPM is not reachable" in out
    assert "✔ ok    ldevid: certificate valid now" in out
    assert "✔ ok    idevid: certificate chain" in out

    rc, data = enrolled.cli_json("check")
    by_name = {r["name"]: r for r in data}
    assert rc == 1
    assert by_name["TPM reachable"]["ok"] is False
    assert by_name["idevid: certificate matches key"]["skipped"] is True


def test_evicted_idevid_fails_its_key_check_with_the_handle_and_the_fix(enrolled: Device) -> None:
    with TpmConnection(enrolled.sim.tcti) as tpm:
        evict_persistent(tpm, IDEVID_HANDLE)
    results = checks(enrolled)
    assert failed(results) == {"idevid: key", "idevid: certificate matches key"}
    assert "no key at 0x81020000" in results["idevid: key"].detail
    assert "tpmid key create idevid" in (results["idevid: key"].hint or "")
    assert results["idevid: certificate matches key"].skipped
    assert enrolled.transients() == []


def test_idevid_made_from_another_template_fails_the_template_check(enrolled: Device) -> None:
    enrolled.edit(lambda d: d["identities"]["idevid"]["key"].update(template="H-3"))
    results = checks(enrolled)
    assert not results["idevid: key"].ok
    assert "not an IDevID from template H-3" in results["idevid: key"].detail
    assert "template H-2" in results["idevid: key"].detail


def test_key_with_the_decrypt_attribute_at_the_idevid_handle_fails(enrolled: Device,
                                                                    tmp_path: Path) -> None:
    with TpmConnection(enrolled.sim.tcti) as tpm:
        evict_persistent(tpm, IDEVID_HANDLE)
    ctx = str(tmp_path / "primary.ctx")
    run_tool(enrolled.sim, "tpm2_createprimary", "-C", "e", "-G", "ecc256", "-c", ctx, "-a",
             "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|decrypt|sign")
    run_tool(enrolled.sim, "tpm2_evictcontrol", "-C", "o", "-c", ctx, hex(IDEVID_HANDLE))
    run_tool(enrolled.sim, "tpm2_flushcontext", "-t")
    results = checks(enrolled)
    assert not results["idevid: key"].ok
    assert "decrypt attribute" in results["idevid: key"].detail
    assert results["idevid: certificate matches key"].skipped
    assert enrolled.transients() == []


def test_stored_certificate_for_another_key_fails_the_match_check(enrolled: Device) -> None:
    store = enrolled.store
    ld, idev = enrolled.current("ldevid"), enrolled.current("idevid")
    # Commit the IDevID's (valid, well-chained) certificate as the LDevID's current one,
    # keeping the LDevID key file: the store now pairs a key with someone else's certificate.
    with store.identity_lock("ldevid"):
        store.commit("ldevid", idev.cert, idev.chain, ld.key_file)
    results = checks(enrolled)
    assert failed(results) == {"ldevid: certificate matches key"}
    r = results["ldevid: certificate matches key"]
    assert f"serial {render_serial(idev.cert.serial_number)}" in r.detail
    assert "certifies another key" in r.detail
    assert "tpmid reset ldevid --yes && tpmid enroll ldevid" in (r.hint or "")
    assert enrolled.transients() == []


def test_tpm_in_dictionary_attack_lockout_fails(enrolled: Device) -> None:
    # One failed authorization allowed, then lockout for an hour (lockout password empty).
    run_tool(enrolled.sim, "tpm2_dictionarylockout", "-s", "-n", "1", "-t", "3600", "-l", "3600")
    wrong = run_tool(enrolled.sim, "tpm2_sign", "-c", hex(IDEVID_HANDLE), "-p", "wrong",
                     "-g", "sha256", "-o", "/dev/null", check=False, stdin=b"data")
    assert wrong.returncode != 0
    rc, out, _ = enrolled.cli("check")
    assert rc == 1
    assert "✘ FAIL  TPM not in lockout: the TPM is in dictionary-attack lockout" in out
    assert "tpm2_dictionarylockout --clear-lockout" in out


# --------------------------------------------------------------------------- certificates, clock


def test_expired_certificate_fails_validity_but_not_its_chain(enrolled: Device) -> None:
    ld = enrolled.current("ldevid")
    results = checks(enrolled, now=ld.not_after + timedelta(days=1))
    assert failed(results) == {"ldevid: certificate valid now"}
    r = results["ldevid: certificate valid now"]
    assert "has already expired" in r.detail
    assert "tpmid enroll ldevid" in (r.hint or "")
    assert enrolled.transients() == []


CLOCKS: dict[str, Callable[[Device], datetime]] = {
    "before tpmid's release": lambda dev: RELEASE_DATE - timedelta(days=1),
    "an hour before the certificates' notBefore":
        lambda dev: dev.current("ldevid").not_before - timedelta(hours=1),
}


@pytest.mark.parametrize("clock", CLOCKS.values(), ids=CLOCKS.keys())
def test_implausible_clock_fails_the_clock_check(enrolled: Device,
                                                 clock: Callable[[Device], datetime]) -> None:
    results = checks(enrolled, now=clock(enrolled))
    assert not results["clock plausible"].ok
    assert "timedatectl set-ntp true" in (results["clock plausible"].hint or "")
    assert not results["ldevid: certificate valid now"].ok


def test_missing_certificate_fails_with_the_enroll_command(device: Device) -> None:
    device.enroll("idevid")
    results = checks(device)
    assert {"ldevid: certificate", "edgeca: certificate"} <= failed(results)
    assert results["ldevid: certificate"].hint == "enroll it: tpmid enroll ldevid"
    assert "not enrolled" in results["ldevid: key"].detail
    assert results["idevid: certificate matches key"].ok


# --------------------------------------------------------------------------- EST servers


def test_est_server_with_an_untrusted_tls_certificate_fails(enrolled: Device) -> None:
    # Trust the manufacturer CA instead of the CA that issued the server's TLS certificate.
    enrolled.edit(lambda d: d.update(trust={"est_anchors": [str(enrolled.server.manufacturer_ca)]}))
    results = checks(enrolled)
    assert failed(results) == {"idevid: EST server", "ldevid: EST server", "edgeca: EST server"}
    r = results["ldevid: EST server"]
    assert "certificate verify failed" in r.detail
    assert "does not chain to the configured trust" in (r.hint or "")


def test_stopped_est_server_fails_the_est_checks(own_server_device: Device) -> None:
    dev = own_server_device.enroll_all()
    dev.server.stop()
    rc, out, _ = dev.cli("check")
    assert rc == 1
    assert out.count("✘ FAIL") == 3
    for name in ("idevid", "ldevid", "edgeca"):
        assert f"✘ FAIL  {name}: EST server: " in out
        assert f"hint: check identities.{name}.est.url and that the EST server is up" in out
    assert "✔ ok    TPM reachable" in out


# --------------------------------------------------------------------------- permissions


PERMISSIONS: dict[str, tuple[Callable[[Device], Path], str]] = {
    "world-writable key directory": (lambda d: d.store_dir / "keys" / "ldevid",
                                     "store permissions"),
    "world-writable key file": (lambda d: d.current("edgeca").key_file or Path("/nonexistent"),
                                "store permissions"),
    "world-writable config file": (lambda d: d.config_path, "config file permissions"),
}


@pytest.mark.parametrize(("target", "check"), PERMISSIONS.values(), ids=PERMISSIONS.keys())
def test_files_other_users_can_write_fail_with_the_chmod_that_fixes_them(
    enrolled: Device, target: Callable[[Device], Path], check: str,
) -> None:
    path = target(enrolled)
    path.chmod(0o777 if path.is_dir() else 0o666)
    rc, data = enrolled.cli_json("check")
    assert rc == 1
    by_name = {r["name"]: r for r in data}
    assert [r["name"] for r in data if not r["ok"]] == [check]
    assert "writable by group and others" in by_name[check]["detail"]
    assert by_name[check]["hint"] == f"chmod go-w {path}"


def test_unsafe_store_root_is_reported_and_file_key_checks_are_skipped(enrolled: Device) -> None:
    (enrolled.store_dir / "keys").chmod(0o777)
    results = checks(enrolled)
    assert not results["store permissions"].ok
    assert results["ldevid: key"].skipped
    assert "the store is not usable" in results["ldevid: key"].detail
    assert not results["ldevid: certificate"].ok
    assert results["idevid: key"].ok  # the persistent key does not live in the store
    assert not all_passed(list(results.values()))


def test_check_json_is_a_list_of_results(enrolled: Device) -> None:
    enrolled.sim.stop()
    rc, out, _ = enrolled.cli("--json", "check")
    data = json.loads(out)
    assert rc == 1
    assert isinstance(data, list)
    assert set(data[0]) == {"name", "ok", "skipped", "detail", "hint"}
