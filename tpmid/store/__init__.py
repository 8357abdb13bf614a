"""Everything tpmid keeps on disk, and the one way it is written.

* :mod:`tpmid.store.fsio` — the durable writer (atomic replace, durable append,
  directory fsync) and the permission checks every persisted path passes;
* :mod:`tpmid.store.locks` — ``flock`` locks: per identity, and the host-wide
  TPM lock;
* :mod:`tpmid.store.journal` — work in flight, written before each step that can
  be lost;
* :mod:`tpmid.store.state` — per-identity attempt state and last decision;
* :mod:`tpmid.store.versions` — :class:`Store`, the versioned certificates and
  key files with their ``current`` pointer;
* :mod:`tpmid.store.recovery` — start-up recovery of what a killed process left.

Nothing here imports from the layers above (lifecycle, CLI).
"""

from __future__ import annotations

from tpmid.store.fsio import STEPS, atomic_write, check_private_path
from tpmid.store.journal import PHASES, JournalEntry, Phase
from tpmid.store.locks import TPM_LOCK_NAME, host_tpm_lock
from tpmid.store.recovery import RecoveryAction, recover
from tpmid.store.versions import DEFAULT_RETENTION, KEY_SUFFIX, Store, StoredIdentity

__all__ = [
    "DEFAULT_RETENTION",
    "KEY_SUFFIX",
    "PHASES",
    "STEPS",
    "TPM_LOCK_NAME",
    "JournalEntry",
    "Phase",
    "RecoveryAction",
    "Store",
    "StoredIdentity",
    "atomic_write",
    "check_private_path",
    "host_tpm_lock",
    "recover",
]
