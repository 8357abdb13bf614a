"""The transient-object ledger: only a dead tpmid process's leftovers are ever flushed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpmid.store.ledger import LedgerEntry, TransientLedger, process_start
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.tcti import has_resource_manager


@pytest.fixture
def ledger(tmp_path: Path) -> TransientLedger:
    return TransientLedger(tmp_path / "locks" / "_tpm.lock.objects.json")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_objects_are_recorded_while_loaded_and_forgotten_when_flushed(
        swtpm: Swtpm, ledger: TransientLedger) -> None:
    with TpmConnection(swtpm.tcti, ledger=ledger) as tpm:
        key = tpm.derive_idevid("H-2")
        (entry,) = ledger.entries()
        assert entry.pid == os.getpid() and entry.alive
        assert entry.handle in tpm.transient_handles() and "IDevID" in entry.what
        key.close()
        assert ledger.entries() == []


def _orphan(swtpm: Swtpm, ledger: TransientLedger, pid: int, start: int | None = 1) -> int:
    """An object in the TPM recorded for process ``pid`` (as if it had died holding it)."""
    with TpmConnection(swtpm.tcti, ledger=ledger) as tpm:
        key = tpm.derive_idevid("H-2")
        handle = int(tpm.esapi.tr_get_tpm_handle(key.handle))
        (e,) = ledger.entries()
        ledger.keep_only([LedgerEntry(e.handle, e.name, e.what, pid, start)])
        key._closed = True  # noqa: SLF001 - the "dead" process never flushed it
    return handle


def test_a_dead_processs_object_is_flushed_and_a_foreign_one_left_alone(
        swtpm: Swtpm, ledger: TransientLedger) -> None:
    orphan = _orphan(swtpm, ledger, _dead_pid())
    with TpmConnection(swtpm.tcti) as other:  # not tpmid's: no ledger
        foreign = other.derive_idevid("H-3")
        with TpmConnection(swtpm.tcti, ledger=ledger) as tpm:
            stale = tpm.flush_stale_transients()
            assert [e.handle for e in stale.flushed] == [orphan]
            assert stale.foreign == [int(other.esapi.tr_get_tpm_handle(foreign.handle))]
            assert "flushed 1 transient object left by killed tpmid process" in stale.describe()
            assert "that tpmid did not load alone" in stale.describe()
            assert orphan not in tpm.transient_handles()
        foreign.close()
    assert ledger.entries() == []


def test_a_live_processs_objects_are_left_alone(swtpm: Swtpm, ledger: TransientLedger) -> None:
    with TpmConnection(swtpm.tcti, ledger=ledger) as tpm:
        key = tpm.derive_idevid("H-2")
        assert tpm.flush_stale_transients().flushed == []
        assert len(ledger.entries()) == 1
        key.close()


def test_a_reused_pid_does_not_keep_a_dead_processs_object(
        swtpm: Swtpm, ledger: TransientLedger) -> None:
    # Our own PID, but another start time: the process that loaded it is gone.
    start = process_start(os.getpid())
    assert start is not None
    orphan = _orphan(swtpm, ledger, os.getpid(), start + 12345)
    with TpmConnection(swtpm.tcti, ledger=ledger) as tpm:
        assert [e.handle for e in tpm.flush_stale_transients().flushed] == [orphan]


def test_a_slot_taken_by_another_object_since_is_not_flushed(
        swtpm: Swtpm, ledger: TransientLedger) -> None:
    orphan = _orphan(swtpm, ledger, _dead_pid())
    with TpmConnection(swtpm.tcti) as tpm:  # the TPM was reset; someone else's object...
        tpm.esapi.flush_context(tpm.esapi.tr_from_tpmpublic(orphan))
        foreign = tpm.derive_idevid("H-3")  # ...now sits in the same slot
        assert int(tpm.esapi.tr_get_tpm_handle(foreign.handle)) == orphan
        with TpmConnection(swtpm.tcti, ledger=ledger) as mine:
            stale = mine.flush_stale_transients()
        assert stale.flushed == [] and stale.foreign == [orphan]
        assert orphan in tpm.transient_handles()
        foreign.close()


def test_an_unreadable_ledger_counts_as_empty(ledger: TransientLedger,
                                             caplog: pytest.LogCaptureFixture) -> None:
    ledger.path.parent.mkdir(parents=True)
    for junk in (b"\x00\xff", b"[]", json.dumps({"objects": [{"pid": "x"}]}).encode()):
        ledger.path.write_bytes(junk)
        assert ledger.entries() == []
    assert "ignoring the unreadable TPM object ledger" in caplog.text


@pytest.mark.parametrize(("tcti", "rm"), [
    ("device:/dev/tpmrm0", True), ("device:/dev/tpm0", False), ("device", False),
    ("swtpm:host=127.0.0.1,port=2321", False), ("mssim:port=2321", False), ("tabrmd:", True),
])
def test_which_tctis_have_a_resource_manager(tcti: str, rm: bool) -> None:
    assert has_resource_manager(tcti) is rm


def test_an_object_created_just_before_the_process_died_unrecorded_is_found_by_its_template(
        swtpm: Swtpm, ledger: TransientLedger) -> None:
    from tpmid.tpm.templates import idevid_template, template_fields

    # The process wrote its pending entry, the TPM created the object, then SIGKILL:
    # the object's handle never reached the ledger.
    match = "fields:" + template_fields(idevid_template("H-2")).hex()
    ledger.keep_only([LedgerEntry(0, "", "the H-2 IDevID", _dead_pid(), 1, pending=True,
                                  match=match)])
    with TpmConnection(swtpm.tcti) as other:  # no ledger: unrecorded objects
        theirs = other.derive_idevid("H-3")  # another program's, another template
        orphan = other.derive_idevid("H-2")
        orphan_handle = int(other.esapi.tr_get_tpm_handle(orphan.handle))
        theirs_handle = int(other.esapi.tr_get_tpm_handle(theirs.handle))
        orphan._closed = True  # noqa: SLF001 - its process "died"; the clean-up flushes it
        with TpmConnection(swtpm.tcti, ledger=ledger) as tpm:
            stale = tpm.flush_stale_transients()
            assert [e.handle for e in stale.flushed] == [orphan_handle]
            assert stale.foreign == [theirs_handle]
            assert tpm.transient_handles() == [theirs_handle]
        theirs.close()
    assert ledger.entries() == []


def test_a_failed_create_leaves_no_pending_entry(swtpm: Swtpm, ledger: TransientLedger) -> None:
    from tpmid.tpm.templates import idevid_template

    with TpmConnection(swtpm.tcti, ledger=ledger) as tpm:
        with pytest.raises(RuntimeError), \
                tpm.creating("a key", template=idevid_template("H-2")):
            assert ledger.entries()[0].pending
            raise RuntimeError("the command failed")
    assert ledger.entries() == []
