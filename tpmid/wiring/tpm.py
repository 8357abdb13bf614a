"""The TPM opener: the configured TCTI, hierarchy passwords and host-wide TPM lock.

Imports the TPM stack; the CLI imports this module only for commands that use
the TPM (see :mod:`tpmid.wiring`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tpmid.store import host_tpm_lock
from tpmid.tpm.connection import HierarchyPasswords, TpmConnection, TpmOpener
from tpmid.wiring import Runtime


def tpm_opener(rt: Runtime) -> TpmOpener:
    """A zero-argument opener of the configured TPM, for one command or one renewal.

    Each call holds the host-wide TPM lock (when there is one, see
    :meth:`Runtime.tpm_lock_path`) for as long as the connection is open, and
    resolves the hierarchy passwords at that moment.
    """

    @contextlib.contextmanager
    def open_tpm() -> Iterator[TpmConnection]:
        passwords = HierarchyPasswords(**rt.hierarchy_passwords())
        lock = rt.tpm_lock_path()
        with (host_tpm_lock(lock) if lock is not None else contextlib.nullcontext()), \
                TpmConnection(rt.config.tpm.tcti, passwords) as tpm:
            yield tpm

    return open_tpm
