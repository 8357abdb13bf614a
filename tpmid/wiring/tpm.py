"""The TPM opener: the configured TCTI, hierarchy passwords and host-wide TPM lock.

Imports the TPM stack; the CLI imports this module only for commands that use
the TPM (see :mod:`tpmid.wiring`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from tpmid.store import host_tpm_lock
from tpmid.store.ledger import LEDGER_SUFFIX, TransientLedger
from tpmid.tpm.connection import HierarchyPasswords, TpmConnection, TpmOpener
from tpmid.tpm.tcti import has_resource_manager
from tpmid.wiring import Runtime

log = logging.getLogger("tpmid")

# The connection each thread holds open through an opener of this module, by TCTI: a
# nested open in the same thread (a sealed secret unsealed while an enrollment or a
# provisioning station holds the TPM) borrows it instead of waiting for the host lock
# that thread itself holds.
_held = threading.local()


def tpm_opener(rt: Runtime) -> TpmOpener:
    """A zero-argument opener of the configured TPM, for one piece of TPM work.

    Each call holds the host-wide TPM lock (when there is one, see
    :meth:`Runtime.tpm_lock_path`) for as long as the connection is open, waiting
    at most ``tpm.lock_timeout`` for it, and resolves the hierarchy passwords at
    that moment. Every command gets ``tpm.timeout`` to answer. While a connection
    is open, the same thread opening the TPM again gets that connection.

    The first opener built for ``rt`` is also the one its sealed secrets are
    unsealed with (:attr:`Runtime.open_tpm`).
    """
    tpm_config = rt.config.tpm

    def waiting(holder: str) -> None:
        log.warning("waiting up to %s s for the TPM, in use by %s",
                    f"{tpm_config.lock_timeout:g}", holder)

    @contextlib.contextmanager
    def open_tpm() -> Iterator[TpmConnection]:
        held: dict[str, TpmConnection] = _held.__dict__.setdefault("by_tcti", {})
        current = held.get(tpm_config.tcti)
        if current is not None and not current.closed:
            yield current
            return
        passwords = HierarchyPasswords(**rt.hierarchy_passwords())
        lock = rt.tpm_lock_path()
        lock_held = (host_tpm_lock(lock, timeout=tpm_config.lock_timeout, waiting=waiting)
                     if lock is not None else contextlib.nullcontext())
        # Without a resource manager, the objects each process loads are recorded beside
        # the lock, so that only a dead process's leftovers are ever flushed.
        ledger = (TransientLedger(lock.with_name(lock.name + LEDGER_SUFFIX))
                  if lock is not None and not has_resource_manager(tpm_config.tcti) else None)
        with lock_held, TpmConnection(tpm_config.tcti, passwords, timeout=tpm_config.timeout,
                                      ledger=ledger) as tpm:
            held[tpm_config.tcti] = tpm
            try:
                yield tpm
            finally:
                held.pop(tpm_config.tcti, None)

    if rt.open_tpm is None:
        rt.open_tpm = open_tpm
    return open_tpm
