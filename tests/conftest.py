"""Shared fixtures: real simulated TPMs (swtpm), one set per pytest-xdist worker.

* ``tpm_template`` — one TPM manufactured per worker (EK certificates included,
  ~1 s); everything else copies its state directory.
* ``swtpm`` — a factory-fresh TPM for one test: a copy of the template started
  on its own free loopback ports (~10 ms), stopped afterwards.
* ``worker_swtpm`` — one TPM shared by the tests of a worker that only read.

Further fixtures (reference EST server, ...) live in the conftest of the
relevant test folder or are added here when several folders need them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpmid.testing.swtpm import Swtpm, copy_state, manufacture

# The reference EST server fixtures (est_server, est_server_factory, fresh_est_server).
pytest_plugins = ["tests.server_fixtures"]


def pytest_configure(config: pytest.Config) -> None:
    missing = [t for t in ("swtpm", "swtpm_setup", "tpm2_readpublic", "openssl") if not shutil.which(t)]
    if missing:
        raise pytest.UsageError(
            f"missing tools {', '.join(missing)}: run scripts/test (it installs them)"
        )


@pytest.fixture(scope="session")
def tpm_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manufactured TPM state (with its EK CA) for this worker; never started itself."""
    return manufacture(tmp_path_factory.mktemp("tpm-template"))


@pytest.fixture
def swtpm(tpm_template: Path, tmp_path: Path) -> Iterator[Swtpm]:
    """A factory-fresh simulated TPM for one test."""
    sim = Swtpm(copy_state(tpm_template, tmp_path / "swtpm")).start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture(scope="session")
def worker_swtpm(tpm_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """One simulated TPM shared by this worker's read-only tests."""
    sim = Swtpm(copy_state(tpm_template, tmp_path_factory.mktemp("worker-swtpm"))).start()
    try:
        yield sim
    finally:
        sim.stop()
