"""Which transient TPM objects tpmid processes hold: the ledger beside the host TPM lock.

Without a resource manager (swtpm, ``/dev/tpm0``) a transient object stays in
one of the TPM's few slots (three on swtpm) until it is flushed or the TPM is
reset. A tpmid process flushes what it loads before it gives the TPM back, so
objects are only left when a process dies while it holds the TPM. Other programs
may use the same TPM, and their objects are none of tpmid's business.

So every tpmid process records, under the host TPM lock, each transient object
it loads: its handle, its Name (which identifies the object, not just the slot),
what it is, and the process (PID and its start time, so that a reused PID is not
taken for the same process). Start-up recovery and ``tpmid check`` flush only
objects recorded for a process that is gone, and leave everything else alone.

The file is written atomically but not durably: after a power loss the TPM's
transient objects are gone as well.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpmid.errors import StoreError
from tpmid.store.fsio import TMP_PREFIX, atomic_write

log = logging.getLogger(__name__)

LEDGER_SUFFIX = ".objects.json"


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True)
class LedgerEntry:
    """One transient object a tpmid process loaded (or, ``pending``, is about to load).

    A pending entry is written just before the command that creates the object,
    whose handle is not known yet: a process killed between the TPM's answer and
    the ledger's update leaves one. ``match`` then says how to recognise the
    object: ``name:<hex>`` (a key file's object, whose Name is known before it is
    loaded) or ``fields:<hex>`` (the public area of a template without its key).
    """

    handle: int
    name: str  # hex of the object's TPM Name
    what: str
    pid: int
    start: int | None
    pending: bool = False
    match: str = ""

    @property
    def alive(self) -> bool:
        """The process that loaded it still runs (same PID and the same start time)."""
        now = process_start(self.pid)
        return now is not None and (self.start is None or now == self.start)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"handle": f"{self.handle:#010x}", "name": self.name,
                             "what": self.what, "pid": self.pid, "start": self.start}
        if self.pending:
            d.update(pending=True, match=self.match)
        return d

    @classmethod
    def from_json(cls, d: Any) -> LedgerEntry:
        if not isinstance(d, dict):
            raise ValueError("not an object")
        handle, pid, start = int(str(d["handle"]), 16), d["pid"], d.get("start")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"pid {pid!r}")
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
            raise ValueError(f"start {start!r}")
        return cls(handle=handle, name=str(d.get("name", ""))[:200],
                   what=str(d.get("what", ""))[:200], pid=pid, start=start,
                   pending=d.get("pending") is True, match=str(d.get("match", ""))[:4096])


class TransientLedger:
    """The ledger file (see the module docstring); used only with the host TPM lock held."""

    _warned = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pid = os.getpid()
        self._start = process_start(self._pid)

    def entries(self) -> list[LedgerEntry]:
        """Every recorded object (an unreadable ledger counts as empty, with a warning)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warning("cannot read the TPM object ledger %s: %s", self.path, e.strerror)
            return []
        try:
            doc = json.loads(raw) if raw.strip() else {"objects": []}
            return [LedgerEntry.from_json(d) for d in doc["objects"]]
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable TPM object ledger %s (%s)", self.path, e)
            return []

    def expect(self, match: str, what: str) -> None:
        """Record that this process is about to create or load an object (see LedgerEntry)."""
        entry = LedgerEntry(0, "", what, self._pid, self._start, pending=True, match=match)
        self._write([e for e in self.entries() if not self._mine_pending(e)] + [entry])

    def add(self, handle: int, name: bytes, what: str) -> None:
        """Record an object this process just loaded (replacing its pending entry)."""
        entry = LedgerEntry(handle, name.hex(), what, self._pid, self._start)
        self._write([e for e in self.entries()
                     if e.handle != handle and not self._mine_pending(e)] + [entry])

    def settle(self) -> None:
        """Drop this process's pending entry (the command failed: nothing was created)."""
        entries = self.entries()
        kept = [e for e in entries if not self._mine_pending(e)]
        if len(kept) != len(entries):
            self._write(kept)

    def _mine_pending(self, e: LedgerEntry) -> bool:
        return e.pending and e.pid == self._pid and e.start == self._start

    def remove(self, handle: int) -> None:
        """Forget an object that was flushed."""
        entries = self.entries()
        kept = [e for e in entries if e.pending or e.handle != handle]
        if len(kept) != len(entries):
            self._write(kept)

    def keep_only(self, entries: list[LedgerEntry]) -> None:
        """Rewrite the ledger with ``entries`` (after a clean-up)."""
        if entries != self.entries():
            self._write(entries)

    def _write(self, entries: list[LedgerEntry]) -> None:
        data = json.dumps({"objects": [e.to_json() for e in entries]}, indent=1).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A process killed mid-write left its temporary file; writers take turns
            # under the host TPM lock, so any such file is a leftover.
            for old in self.path.parent.glob(f"{TMP_PREFIX}{self.path.name}.*"):
                old.unlink(missing_ok=True)
            atomic_write(self.path, data + b"\n", 0o644, durable=False)
        except (OSError, StoreError) as e:
            # The TPM work goes on: at worst a leftover object is not flushed for us.
            # Said once per process (a read-only store would say it for every object).
            (log.debug if self._warned else log.warning)(
                "cannot update the TPM object ledger %s: %s", self.path, e)
            TransientLedger._warned = True
