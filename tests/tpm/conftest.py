"""Fixtures for the TPM layer: a connection to a factory-fresh swtpm.

swtpm serves one client at a time: a test that runs tpm2-tools or OpenSSL (see
helpers.run_tool) against its TPM closes its own connection first.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection


@pytest.fixture
def tpm(swtpm: Swtpm) -> Iterator[TpmConnection]:
    """An open connection to this test's fresh swtpm."""
    conn = TpmConnection(swtpm.tcti)
    try:
        yield conn
    finally:
        conn.close()
