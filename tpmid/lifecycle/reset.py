"""``tpmid reset``: remove issued identities from the store to enroll from scratch.

:func:`plan_reset` / :func:`apply_reset` remove identities from the store
(certificates, key files, journal, attempt state) under the identity lock, so
that the next enrollment starts from nothing, as the IoT Edge walkthrough's "To
restart" does by deleting ``certd/certs`` and ``keyd/keys``. The IDevID is the
device's birth certificate and is kept unless explicitly included. This is the
only command that deletes identities.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tpmid.config import Config
from tpmid.errors import StoreError, TpmError
from tpmid.store import Store
from tpmid.tpm.identity import identity_key

if TYPE_CHECKING:
    from tpmid.tpm.connection import TpmConnection, TpmOpener

log = logging.getLogger(__name__)

# How long `tpmid reset` waits for an identity lock held by a renewal in progress.
RESET_LOCK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ResetItem:
    """What ``tpmid reset`` does (or would do) to one identity.

    ``action``: ``remove`` (store entries, maybe a persistent key), ``keep`` (an
    IDevID without ``--include-idevid``) or ``nothing`` (nothing stored).
    """

    name: str
    action: Literal["remove", "keep", "nothing"]
    paths: tuple[Path, ...] = ()
    versions: tuple[str, ...] = ()
    pending: str | None = None
    evict_handle: int | None = None
    note: str = ""
    done: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "action": self.action,
            "paths": [str(p) for p in self.paths],
            "versions": list(self.versions),
            "pending": self.pending,
            "evict_handle": f"{self.evict_handle:#010x}" if self.evict_handle is not None
            else None,
            "note": self.note,
            "done": list(self.done),
        }


def _stored_paths(root: Path, name: str) -> tuple[Path, ...]:
    # The layout of docs/store-and-renewal.md; Store.remove_identity deletes exactly these.
    candidates = (root / "certs" / name, root / "keys" / name,
                  root / "journal" / f"{name}.json", root / "state" / f"{name}.json")
    return tuple(p for p in candidates if os.path.lexists(p))


def plan_reset(config: Config, store: Store | None, names: Sequence[str] = (), *,
               include_idevid: bool = False) -> list[ResetItem]:
    """What ``tpmid reset [NAME ...]`` would remove; changes nothing.

    Without ``names``, every configured identity. IDevIDs (``kind: persistent`` /
    ``ek-derived``) are kept unless ``include_idevid``, which also evicts a
    persistent IDevID key (``key.handle``) from the TPM.
    """
    wanted = list(dict.fromkeys(names)) if names else list(config.identities)
    for n in wanted:
        config.identity(n)
    items: list[ResetItem] = []
    for name in wanted:
        key = identity_key(config.identity(name))
        if key.birth and not include_idevid:
            items.append(ResetItem(
                name, "keep",
                note=f"IDevID ({key.describe()}): the device's birth identity is kept; "
                "--include-idevid removes it too"))
            continue
        paths: tuple[Path, ...] = ()
        versions: tuple[str, ...] = ()
        pending = None
        if store is not None:
            paths = _stored_paths(store.root, name)
            versions = tuple(store.versions(name))
            with contextlib.suppress(StoreError):
                entry = store.journal_get(name)
                if entry is not None:
                    pending = f"{entry.operation} in flight (phase {entry.phase})"
        evict = key.handle
        note = key.reset_note()
        if not paths and evict is None:
            items.append(ResetItem(name, "nothing", note="nothing stored"))
            continue
        items.append(ResetItem(name, "remove", paths=paths, versions=versions, pending=pending,
                               evict_handle=evict, note=note))
    return items


def _release_key_ref(tpm: TpmConnection, name: str, key_ref: str) -> str:
    """Evict the TPM object a journal entry created (``persistent:0x81000010``)."""
    scheme, _, value = key_ref.partition(":")
    if scheme != "persistent":
        raise StoreError(f"{name}: the renewal in flight holds TPM object {key_ref!r}, which "
                         "tpmid reset does not know how to release",
                         hint="release it with tpm2-tools, then run tpmid reset again")
    try:
        handle = int(value, 0)
    except ValueError:
        raise StoreError(f"{name}: journal names an unreadable TPM object {key_ref!r}") from None
    if handle not in tpm.persistent_handles():
        return f"TPM object {key_ref} was already gone"
    tpm.evict(handle)
    return f"evicted {key_ref} (key of the renewal in flight)"


@contextlib.contextmanager
def _maybe_tpm(needed: bool, open_tpm: TpmOpener | None) -> Iterator[TpmConnection | None]:
    if not needed:
        yield None
        return
    if open_tpm is None:
        raise TpmError("tpmid reset needs the TPM to evict a key, but no TPM was given")
    with open_tpm() as tpm:
        yield tpm


def apply_reset(config: Config, store: Store | None, items: Sequence[ResetItem], *,
                open_tpm: TpmOpener | None = None,
                lock_timeout: float = RESET_LOCK_TIMEOUT_S) -> list[ResetItem]:
    """Remove what ``items`` (from :func:`plan_reset`) list; return them with ``done`` filled.

    Each identity is removed under its identity lock (waiting up to
    ``lock_timeout`` for a renewal in progress). The TPM is opened first, only if
    a key must be evicted, so an unreachable TPM fails before anything is removed.
    Store entries go before the key: a failed eviction is repaired by running
    the reset again.
    """
    todo = [i for i in items if i.action == "remove"]
    needs_tpm = any(i.evict_handle is not None for i in todo)
    if store is not None and not needs_tpm:
        # A journal entry holding a non-file TPM object also needs the TPM (docs:
        # Store.remove_identity: release key_ref first).
        for i in todo:
            with contextlib.suppress(StoreError):
                entry = store.journal_get(i.name)
                if entry is not None and entry.key_ref:
                    needs_tpm = True
    out: list[ResetItem] = []
    with _maybe_tpm(needs_tpm, open_tpm) as tpm:
        for item in items:
            if item.action != "remove":
                out.append(item)
                continue
            done: list[str] = []
            lock = (store.identity_lock(item.name, timeout=lock_timeout) if store is not None
                    else contextlib.nullcontext())
            with lock:
                if store is not None:
                    try:
                        entry = store.journal_get(item.name)
                    except StoreError:
                        entry = None  # unreadable: removed below like everything else
                    if entry is not None and entry.key_ref:
                        assert tpm is not None
                        done.append(_release_key_ref(tpm, item.name, entry.key_ref))
                    existing = _stored_paths(store.root, item.name)
                    store.remove_identity(item.name)
                    done += [f"removed {p}" for p in existing]
                if item.evict_handle is not None:
                    assert tpm is not None
                    done.append(identity_key(config.identity(item.name)).remove(tpm))
            log.info("reset %s: %s", item.name, "; ".join(done) or "nothing to do")
            out.append(ResetItem(item.name, item.action, paths=item.paths,
                                 versions=item.versions, pending=item.pending,
                                 evict_handle=item.evict_handle, note=item.note,
                                 done=tuple(done)))
    return out
