"""``tpmid reset``: removing issued identities from a real store (and the IDevID key from a swtpm)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.lifecycle.test_status_support import (  # noqa: F401  (pytest fixtures)
    IDEVID_HANDLE,
    Device,
    device_fixture,
    enrolled_fixture,
)
from tpmid.errors import StoreError
from tpmid.lifecycle.reset import apply_reset, plan_reset
from tpmid.store import JournalEntry
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import create_persistent_idevid


def persistent_handles(dev: Device) -> list[int]:
    with TpmConnection(dev.sim.tcti) as tpm:
        return tpm.persistent_handles()


def snapshot(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its mode, to prove nothing changed."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = os.lstat(p).st_mode
    return out


def test_reset_without_yes_lists_what_it_would_remove_and_exits_1(enrolled: Device) -> None:
    before = snapshot(enrolled.store_dir)
    rc, out, _ = enrolled.cli("reset")
    assert rc == 1
    assert out.startswith("tpmid reset would remove:\n")
    assert f"  ldevid: certificate version 0001; {enrolled.store_dir}/certs/ldevid; " \
           f"{enrolled.store_dir}/keys/ldevid" in out
    assert "  edgeca: certificate version 0001" in out
    assert "kept:\n  idevid: IDevID (persistent H-2 at 0x81020000)" in out
    assert "re-run with --yes" in out
    assert snapshot(enrolled.store_dir) == before

    rc, data = enrolled.cli_json("reset")
    assert rc == 1
    assert data["applied"] is False
    actions = {i["name"]: i["action"] for i in data["identities"]}
    assert actions == {"idevid": "keep", "ldevid": "remove", "edgeca": "remove"}
    assert snapshot(enrolled.store_dir) == before


def test_reset_yes_removes_issued_identities_and_keeps_the_idevid(enrolled: Device) -> None:
    store = enrolled.store
    with store.identity_lock("ldevid"):
        store.save_state("ldevid", store.load_state("ldevid"))  # a state file to remove
    rc, data = enrolled.cli_json("reset", "--yes")
    assert rc == 0 and data["applied"] is True
    done = {i["name"]: i["done"] for i in data["identities"]}
    assert f"removed {enrolled.store_dir}/state/ldevid.json" in done["ldevid"]
    assert not (enrolled.store_dir / "certs" / "ldevid").exists()
    assert not (enrolled.store_dir / "keys" / "ldevid").exists()
    assert not (enrolled.store_dir / "state" / "ldevid.json").exists()
    assert not (enrolled.store_dir / "certs" / "edgeca").exists()
    assert enrolled.store.current("idevid") is not None
    assert IDEVID_HANDLE in persistent_handles(enrolled)

    rc, data = enrolled.cli_json("status")
    assert {i["name"]: i["state"] for i in data["identities"]} == {
        "idevid": "ok", "ldevid": "missing", "edgeca": "missing"}
    # Enrolling again starts from scratch and works.
    enrolled.enroll("ldevid")
    assert enrolled.current("ldevid").version == "0001"


def test_reset_of_named_identities_leaves_the_others(enrolled: Device) -> None:
    rc, out, _ = enrolled.cli("reset", "--yes", "edgeca")
    assert rc == 0
    assert out.startswith(f"reset edgeca: removed {enrolled.store_dir}/certs/edgeca")
    assert enrolled.store.current("edgeca") is None
    assert enrolled.store.current("ldevid") is not None


def test_naming_the_idevid_without_include_idevid_keeps_it(enrolled: Device) -> None:
    rc, out, _ = enrolled.cli("reset", "--yes", "idevid")
    assert rc == 0
    assert out.startswith("nothing to remove\nkept:\n  idevid:")
    assert "--include-idevid removes it too" in out
    assert enrolled.store.current("idevid") is not None


def test_include_idevid_removes_its_certificate_and_evicts_its_key(enrolled: Device) -> None:
    rc, out, _ = enrolled.cli("reset", "--include-idevid")
    assert rc == 1
    assert "persistent key 0x81020000 in the TPM" in out
    assert IDEVID_HANDLE in persistent_handles(enrolled)

    rc, out, _ = enrolled.cli("reset", "--yes", "--include-idevid")
    assert rc == 0
    assert "evicted the persistent key 0x81020000" in out
    assert IDEVID_HANDLE not in persistent_handles(enrolled)
    assert enrolled.store.current("idevid") is None
    assert enrolled.transients() == []
    # The TCG template derives the same key again (TPM 2.0 Part 1, primary keys).
    with TpmConnection(enrolled.sim.tcti) as tpm:
        assert create_persistent_idevid(tpm, "H-2", IDEVID_HANDLE).created


def test_reset_releases_the_tpm_object_of_work_in_flight(enrolled: Device) -> None:
    other = 0x81000010
    with TpmConnection(enrolled.sim.tcti) as tpm:
        create_persistent_idevid(tpm, "H-2", other)
    store = enrolled.store
    with store.identity_lock("ldevid"):
        store.journal_begin("ldevid", JournalEntry("renew", "pending", key_ref=f"persistent:{other:#x}",
                                                   csr_pem="-----BEGIN CERTIFICATE REQUEST-----"))
    rc, out, _ = enrolled.cli("reset", "--yes", "ldevid")
    assert rc == 0
    assert f"evicted persistent:{other:#x} (key of the renewal in flight)" in out
    assert other not in persistent_handles(enrolled)
    assert enrolled.store.journal_get("ldevid") is None


def test_reset_waits_for_the_identity_lock_and_then_gives_up(enrolled: Device) -> None:
    """The lock is held by another thread (flock excludes threads of one process too)."""
    store = enrolled.store
    items = plan_reset(enrolled.config, enrolled.store, ["ldevid"])
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.identity_lock("ldevid"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(StoreError, match="ldevid is being renewed by another tpmid process"):
            apply_reset(enrolled.config, enrolled.store, items, lock_timeout=0.2)
        assert enrolled.store.current("ldevid") is not None
    finally:
        release.set()
        t.join()
    done = apply_reset(enrolled.config, enrolled.store, items, lock_timeout=5)
    assert done[0].done and enrolled.store.current("ldevid") is None


def test_reset_of_a_device_with_nothing_stored_has_nothing_to_do(device: Device) -> None:
    rc, out, _ = device.cli("reset", "--yes")
    assert rc == 0
    assert out.startswith("nothing to remove")
    assert not device.store_dir.exists()
