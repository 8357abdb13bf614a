"""Start-up recovery: finish or roll back what a killed process left in the store.

:func:`recover` runs before a daemon or a command renews anything. Per identity
(skipped if another process holds its lock) it settles the journal, then
removes leftovers; see :meth:`_Recovery.run` for the rules.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tpmid.clock import utcnow
from tpmid.errors import StoreError, TpmidError
from tpmid.store.fsio import TMP_PREFIX, fsync_dir, remove_tree
from tpmid.store.journal import JournalEntry
from tpmid.store.locks import acquire_lock, release_lock
from tpmid.store.versions import KEY_SUFFIX, NAME_RE, Store

log = logging.getLogger(__name__)

ReleaseKeyRef = Callable[[str, str], None]


@dataclass(frozen=True)
class RecoveryAction:
    """One thing :func:`recover` did or found; ``str()`` is the log line."""

    name: str
    action: Literal["resume", "rollback", "completed", "removed", "skipped", "error"]
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


def recover(store: Store, *, release_key_ref: ReleaseKeyRef | None = None,
            names: Sequence[str] | None = None) -> list[RecoveryAction]:
    """Resume or roll back each identity's journal in ``store``, then remove leftovers.

    ``release_key_ref(name, key_ref)`` releases a TPM object that a rolled-back
    journal entry created and that is not a file. ``names`` limits the work to
    those identities (the renewal engine recovers one before renewing it).
    """
    return _Recovery(store).run(release_key_ref=release_key_ref, names=names)


class _Recovery:
    """The recovery of one store (package-internal: it works on the store's layout)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _names(self) -> list[str]:
        names: set[str] = set()
        for sub in ("certs", "keys"):
            with contextlib.suppress(OSError):
                names.update(n for n in os.listdir(self.store.root / sub) if NAME_RE.fullmatch(n))
        for sub in ("journal", "state"):
            with contextlib.suppress(OSError):
                for n in os.listdir(self.store.root / sub):
                    base = n.removeprefix(TMP_PREFIX)
                    if base != n:
                        base = base.rsplit(".", 1)[0]  # .tmp-<name>.json.<random>
                    if base.endswith(".json") and NAME_RE.fullmatch(base[:-5]):
                        names.add(base[:-5])
        return sorted(names)

    def run(
        self, *, release_key_ref: ReleaseKeyRef | None = None,
        names: Sequence[str] | None = None,
    ) -> list[RecoveryAction]:
        """Resume or roll back each identity's journal, then remove leftovers.

        Per identity (skipped if another process holds its lock):

        * a journal whose version is already current, or whose version directory
          was written before a crash, is completed (``current`` swapped, journal
          cleared);
        * a ``staged`` entry, or one that lost its CSR or key file, is rolled
          back: ``release_key_ref(name, key_ref)`` releases a TPM object that is
          not a file (without the callback, or if it fails, the entry stays for
          the next start-up), the staged key file is deleted, the journal cleared;
        * ``submitted``/``pending``/``issued`` entries are kept for resumption
          (resend the same CSR, RFC 7030 §4.2.3);
        * a version whose ``fullchain.pem`` is missing or damaged while its
          certificate and chain are intact gets it written again from them;
        * a ``current`` link that is lost, or names a damaged version (a
          certificate, chain, full chain or key file truncated or missing), is pointed at the newest
          intact version and a damage note is left for ``tpmid status``; with no
          intact version the link is removed, so the next renewal enrolls again
          through the bootstrap identity. Nothing is deleted for that;
        * then temporary files, versions older than the retention and key files
          no version or journal refers to are removed. A version newer than the
          current one is never deleted: it may be the one intact copy.
        """
        actions: list[RecoveryAction] = []
        for name in (self._names() if names is None else list(names)):
            fd = self._try_lock(name)
            if fd is None:
                actions.append(RecoveryAction(name, "skipped",
                                              "skipped: another tpmid process holds its lock"))
                continue
            try:
                self._recover_one(name, release_key_ref, actions)
            except StoreError as e:
                actions.append(RecoveryAction(name, "error", f"recovery failed: {e}"))
            finally:
                release_lock(fd)
        for a in actions:
            log.info("recovery: %s", a)
        return actions

    def _try_lock(self, name: str) -> int | None:
        try:
            return acquire_lock(self.store._dir("locks") / f"{name}.lock", wait=False, timeout=None,
                                 busy=lambda pid: pid, hint="")
        except StoreError:
            return None

    def _recover_one(self, name: str, release: ReleaseKeyRef | None,
                     actions: list[RecoveryAction]) -> None:
        def act(kind: Literal["resume", "rollback", "completed", "removed", "error"],
                detail: str) -> None:
            actions.append(RecoveryAction(name, kind, detail))

        cdir, kdir = self.store._cert_dir(name), self.store._key_dir(name)

        # 1. Temporary files and directories of interrupted writes.
        tmps: list[Path] = []
        for d in (cdir, kdir):
            with contextlib.suppress(FileNotFoundError):
                tmps += [d / n for n in os.listdir(d) if n.startswith(TMP_PREFIX)]
        own_tmp = f"{TMP_PREFIX}{name}.json."  # + 8 hex digits (fsio.temp_name)
        for d in (self.store.root / "journal", self.store.root / "state"):
            with contextlib.suppress(FileNotFoundError):
                tmps += [d / n for n in os.listdir(d) if n.startswith(own_tmp)
                         and _is_hex8(n[len(own_tmp):])]
        for t in tmps:
            remove_tree(t)
            fsync_dir(t.parent)
        if tmps:
            act("removed", f"removed {len(tmps)} temporary file(s) of an interrupted write")

        # 2. fullchain.pem is derived from cert.pem and chain.pem: a version that lacks it
        #    (committed before tpmid wrote one) or whose copy is damaged gets it again,
        #    instead of counting as damaged below.
        for v in self.store.versions(name):
            if self.store.repair_fullchain(name, v):
                act("completed", f"rewrote fullchain.pem of version {v} from its certificate "
                                 "and chain (it was missing or damaged)")

        # 3. The current pointer must name an intact version: a lost or damaged one is
        #    re-pointed at the newest intact version. Nothing is deleted for that.
        current = self._settle_current(name, act)

        # 4. The journal, then 5. leftovers nothing refers to.
        keep: set[str] = set()
        try:
            entry = self.store.journal_get(name)
        except StoreError:
            self.store.journal_clear(name)
            act("rollback", "discarded an unreadable journal")
            entry = None
        if entry is not None:
            current = self._settle_journal(name, entry, current, release, keep, act)
        self._cleanup(name, current, keep, act)

    def _has_journal(self, name: str) -> bool:
        try:
            return self.store.journal_get(name) is not None
        except StoreError:
            return True  # unreadable: step 3 discards it

    def _settle_current(self, name: str,
                        act: Callable[[Literal["completed", "error"], str], None]) -> str | None:
        """The current version after making sure it is intact (see :func:`recover`)."""
        store = self.store
        problem: str | None
        try:
            current = store._current_version(name)
        except StoreError as e:
            current, problem = None, e.message
        else:
            if current is None:
                problem = "the current link is missing"
            else:
                problem = store.version_problem(name, current)
                if problem is None:
                    return current
        if not store.versions(name):
            return None  # never enrolled: nothing to point at
        fallback = store.newest_intact(name, exclude=current)
        link = store._cert_dir(name) / "current"
        if fallback is not None:
            store._swap_current(name, fallback)
            if current is not None:
                store.note_damage(name, current, problem or "damaged", fallback, utcnow())
            act("completed", f"{problem}; version {fallback}, the newest intact one, is "
                             "current now")
            return fallback
        if current is None and problem == "the current link is missing" and \
                self._has_journal(name):
            return None  # a first enrollment interrupted before its commit: the journal settles it
        if os.path.lexists(link):
            # Nothing intact to fall back to: no current version, so the next renewal
            # enrolls again through the bootstrap identity. The damaged version stays.
            os.unlink(link)
            fsync_dir(link.parent)
        store.note_damage(name, current or "current", problem or "damaged", None, utcnow())
        act("error", f"{problem}; no intact version to fall back to: the next renewal "
                     "enrolls through the bootstrap identity")
        return None

    def _settle_journal(
        self, name: str, entry: JournalEntry, current: str | None,
        release: ReleaseKeyRef | None, keep: set[str],
        act: Callable[[Literal["resume", "rollback", "completed", "error"], str], None],
    ) -> str | None:
        """Complete, resume or roll back one journal entry; return the current version."""
        cdir, kdir = self.store._cert_dir(name), self.store._key_dir(name)
        v = entry.version
        if v is not None and v == current:
            self.store.journal_clear(name)
            act("completed", f"finished the interrupted commit of version {v}")
            return current
        if v is not None and (cdir / v).is_dir() and (current is None or int(v) > int(current)):
            # The version directory is only written after verification (commit's
            # contract), so rolling forward is safe and keeps the new certificate.
            self.store._swap_current(name, v)
            self.store.journal_clear(name)
            act("completed", f"completed the interrupted commit: version {v} is now current")
            return v
        key_missing = v is not None and not (kdir / f"{v}{KEY_SUFFIX}").is_file()
        if entry.phase != "staged" and entry.csr_pem and not key_missing:
            if v:
                keep.add(v)
            ra = (f", server asked to retry after {entry.retry_after:g} s"
                  if entry.retry_after is not None else "")
            act("resume", f"{entry.operation} in flight (phase {entry.phase}{ra}); "
                          "keeping its key and CSR to resend")
            return current

        why = ("its key file is missing" if key_missing else
               "it had no CSR" if not entry.csr_pem else "nothing was sent yet")
        if entry.key_ref is not None:
            problem = None
            if release is None:
                problem = f"{entry.operation} in flight holds TPM object {entry.key_ref}"
            else:
                try:
                    release(name, entry.key_ref)
                except TpmidError as e:
                    problem = f"cannot release TPM object {entry.key_ref} ({e})"
            if problem is not None:
                # Keep the entry (and its staged key) so the next start-up tries again:
                # forgetting the reference would orphan a persistent TPM object.
                if v:
                    keep.add(v)
                act("error", f"{problem}; kept for the next start-up")
                return current
        what = ""
        if v is not None and not key_missing:
            remove_tree(kdir / f"{v}{KEY_SUFFIX}")
            fsync_dir(kdir)
            what = f" (deleted staged key version {v})"
        if entry.key_ref:
            what += f" (released {entry.key_ref})"
        self.store.journal_clear(name)
        act("rollback", f"rolled back the unfinished {entry.operation}: {why}{what}")
        return current

    def _cleanup(self, name: str, current: str | None, keep: set[str],
                 act: Callable[[Literal["removed"], str], None]) -> None:
        """Remove what no version refers to; of the versions, only those beyond the retention.

        A version newer than the current one was written complete by a commit (or
        is a damaged one recovery fell back from): it is kept, never deleted.
        """
        if current is None:
            committed: list[str] = []
        else:
            committed = self.store.versions(name)
        older = [v for v in committed if int(v) < int(current or 0)]
        retention = self.store.retention
        beyond = older[:len(older) - retention] if len(older) > retention else []
        for v in beyond:
            if v in keep:
                continue
            self.store._remove_version(name, v)
            act("removed", f"removed version {v} (beyond the retention)")
        alive = set(self.store.versions(name)) | keep
        for v in self.store._key_versions(name):
            if v not in alive:
                remove_tree(self.store._key_dir(name) / f"{v}{KEY_SUFFIX}")
                fsync_dir(self.store._key_dir(name))
                act("removed", f"removed orphaned key file of version {v}")


def _is_hex8(text: str) -> bool:
    return len(text) == 8 and all(c in "0123456789abcdef" for c in text)
