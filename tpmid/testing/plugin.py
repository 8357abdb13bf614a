"""tpmid's pytest plugin: simulated TPMs, the reference EST server and a counting TPM proxy.

Registered through the ``pytest11`` entry point ``tpmid`` (pyproject.toml), so it is
loaded by every pytest run in an environment where tpmid is installed. It therefore
imports nothing but pytest and the standard library when loaded: the fixtures import
what they need (swtpm harness, reference server, cryptography, yaml) when a test asks
for them, the test-support boundary's exception to imports at the top
(docs/architecture.md). Nothing starts unless a test requests a fixture.

Fixtures (``docs/testing.md``):

* ``tpm_template`` (session) — one TPM manufactured per pytest-xdist worker (EK
  certificates from a local CA; ~1 s); every ``swtpm`` copies its state;
* ``swtpm`` — a factory-fresh :class:`~tpmid.testing.swtpm.Swtpm` for one test, on
  its own loopback ports (``swtpm.tcti``), stopped afterwards;
* ``worker_swtpm`` (session) — one TPM shared by a worker's read-only tests;
* ``tpm_proxy`` — a :class:`~tpmid.testing.tpmproxy.TpmProxy` in front of this test's
  ``swtpm``: point tpmid at ``tpm_proxy.tcti`` and count what reached the TPM;
* ``est_server`` (session) — one ``tpmid est-server run`` process per worker, for
  read-only use;
* ``est_server_factory`` — ``factory(alg=, process=, labels=, config=, clock=)``
  makes a server with its own directory for one test, with per-label overrides
  (``labels={"ldevid": {"lifetime": "10min"}}``); all stopped afterwards;
* ``fresh_est_server`` — ``est_server_factory()`` with the defaults.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tpmid.testing.estserver import RunningEstServer
    from tpmid.testing.swtpm import Swtpm
    from tpmid.testing.tpmproxy import TpmProxy

SWTPM_TOOLS = ("swtpm", "swtpm_setup")


def _require_swtpm() -> None:
    missing = [t for t in SWTPM_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"tpmid.testing: {' and '.join(missing)} not found on PATH; install "
                    "swtpm (Debian and Ubuntu: apt-get install swtpm swtpm-tools)",
                    pytrace=False)


@pytest.fixture(scope="session")
def tpm_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manufactured TPM state (with its EK CA) for this worker; never started itself."""
    from tpmid.testing.swtpm import manufacture

    _require_swtpm()
    return manufacture(tmp_path_factory.mktemp("tpm-template"))


@pytest.fixture
def swtpm(tpm_template: Path, tmp_path: Path) -> Iterator[Swtpm]:
    """A factory-fresh simulated TPM for one test."""
    from tpmid.testing.swtpm import Swtpm, copy_state

    sim = Swtpm(copy_state(tpm_template, tmp_path / "swtpm")).start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture(scope="session")
def worker_swtpm(tpm_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """One simulated TPM shared by this worker's read-only tests."""
    from tpmid.testing.swtpm import Swtpm, copy_state

    sim = Swtpm(copy_state(tpm_template, tmp_path_factory.mktemp("worker-swtpm"))).start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def tpm_proxy(swtpm: Swtpm) -> Iterator[TpmProxy]:
    """A counting proxy in front of this test's swtpm (``tpm_proxy.tcti``, ``.by_name()``)."""
    from tpmid.testing.tpmproxy import TpmProxy

    with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port).start() as proxy:
        yield proxy


@pytest.fixture(scope="session")
def est_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEstServer]:
    """One `tpmid est-server run` process per worker; read-only use."""
    from tpmid.testing.estserver import start_est_server

    srv = start_est_server(tmp_path_factory.mktemp("est-server"), process=True)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def est_server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningEstServer]]:
    """Make servers with their own directories for one test; all stopped afterwards.

    ``factory(alg="ecc-p256", process=False, labels=None, config=None, clock=None,
    init_args=None)``: see :func:`tpmid.testing.estserver.start_est_server`.
    """
    from tpmid.testing.estserver import start_est_server

    started: list[RunningEstServer] = []

    def factory(**kw: Any) -> RunningEstServer:
        srv = start_est_server(tmp_path / f"est-server-{len(started)}", **kw)
        started.append(srv)
        return srv

    try:
        yield factory
    finally:
        for srv in started:
            srv.stop()


@pytest.fixture
def fresh_est_server(est_server_factory: Callable[..., RunningEstServer]) -> RunningEstServer:
    """An in-process server with its own directory, free to reconfigure."""
    return est_server_factory()
