"""pytest plugin: the reference EST server (``tpmid est-server``) for any test folder.

Loaded from ``tests/conftest.py`` (``pytest_plugins = ["tests.server_fixtures"]``).

* ``est_server`` — one real server *process* per pytest-xdist worker
  (``python -m tpmid.cli est-server run --dir D --port 0``), shared by the
  worker's tests. Read-only use: do not change its config.
* ``est_server_factory`` — ``factory(alg="ecc-p256", process=False, config=None)``
  makes a server with its own directory for one test: in-process (fast,
  ``reload()`` is immediate) or as a process (``reload()`` sends SIGHUP and
  waits for it to take effect). ``config`` edits the YAML before start.
* ``fresh_est_server`` — ``est_server_factory()`` with the defaults.

Every server object is a :class:`RunningEstServer`: ``url(label, op)``,
``secret`` (the IDevID Secret-Value), ``tls_ca`` / ``manufacturer_ca`` /
``operator_ca`` paths, ``configure(label, **settings)`` / ``edit_config(fn)``
and ``issued()`` (the issued-certificate log).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tpmid.server import EstServer, init_server_dir
from tpmid.server.ca import IssueLog
from tpmid.server.state import est_url

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
_LISTENING = re.compile(r"^listening on https://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)/",
                        re.MULTILINE)

ConfigEdit = Callable[[dict[str, Any]], None]


@dataclass
class RunningEstServer:
    """A started reference EST server and what a client needs to talk to it."""

    dir: Path
    host: str
    port: int
    secret: str = field(repr=False)
    tls_ca: Path
    manufacturer_ca: Path
    operator_ca: Path
    server: EstServer | None = None  # in-process
    process: subprocess.Popen[bytes] | None = None  # `tpmid est-server run`

    def url(self, label: str | None = None, operation: str | None = None) -> str:
        """``https://127.0.0.1:PORT/.well-known/est[/label][/operation]``."""
        return est_url(self.host, self.port, label, operation)

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    def config(self) -> dict[str, Any]:
        """The parsed config file (a copy; edit with :meth:`edit_config`)."""
        return yaml.safe_load(self.config_path.read_text())

    def edit_config(self, edit: ConfigEdit) -> None:
        """Apply ``edit`` to the YAML document, write it back, and reload the server."""
        data = self.config()
        edit(data)
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.reload()

    def configure(self, label: str, **settings: Any) -> None:
        """Set keys of one label (``pending=2``, ``faults={...}``) and reload."""
        self.edit_config(lambda d: d["labels"][label].update(settings))

    def reload(self) -> None:
        """Make the server re-read its config (SIGHUP for a process)."""
        if self.server is not None:
            self.server.reload()
            return
        assert self.process is not None
        log = self.dir / "run.log"
        before = log.read_text().count("configuration reloaded")
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while log.read_text().count("configuration reloaded") <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not reload; log:\n{log.read_text()[-2000:]}")
            time.sleep(0.02)

    def issued(self) -> list[dict[str, Any]]:
        """The issued-certificate log (JSON Lines) as a list of records."""
        return IssueLog(self.dir / "issued.jsonl").records()

    def stop(self) -> int | None:
        """Stop gracefully; for a process return its exit code."""
        if self.server is not None:
            self.server.stop()
            return None
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def _start_process(dir: Path, extra_args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    out = open(dir / "run.stdout", "wb")  # noqa: SIM115 - owned by the child
    err = open(dir / "run.log", "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "tpmid.cli", "est-server", "run", "--dir", str(dir),
             "--port", "0", *extra_args],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        out.close()
        err.close()


def _wait_listening(proc: subprocess.Popen[bytes], dir: Path) -> tuple[str, int]:
    deadline = time.monotonic() + START_TIMEOUT
    stdout = dir / "run.stdout"
    while True:
        m = _LISTENING.search(stdout.read_text(errors="replace"))
        if m:
            return m.group("host").strip("[]"), int(m.group("port"))
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log = (dir / "run.log").read_text(errors="replace")[-3000:]
            raise AssertionError(
                f"tpmid est-server run did not start (exit {proc.returncode}):\n{log}")
        time.sleep(0.02)


def start_est_server(dir: Path, *, alg: str = "ecc-p256", process: bool = False,
                     config: ConfigEdit | None = None,
                     clock: Callable[[], datetime] | None = None,
                     prepare: Callable[[Path], None] | None = None) -> RunningEstServer:
    """Initialise ``dir`` and start a server on a free loopback port.

    ``clock`` (in-process servers only) runs the server's CAs on an injected clock.
    ``prepare(dir)`` may change the server directory (its CA files) before the start.
    """
    res = init_server_dir(dir, alg=alg)
    if prepare is not None:
        prepare(res.dir)
    if config is not None:
        data = yaml.safe_load(res.config_path.read_text())
        config(data)
        res.config_path.write_text(yaml.safe_dump(data, sort_keys=False))

    def running(host: str, port: int, server: EstServer | None = None,
                proc: subprocess.Popen[bytes] | None = None) -> RunningEstServer:
        return RunningEstServer(
            dir=res.dir, host=host, port=port, secret=res.secret, tls_ca=res.tls_ca_path,
            manufacturer_ca=res.manufacturer_ca_path, operator_ca=res.operator_ca_path,
            server=server, process=proc)

    if not process:
        srv = EstServer(res.dir, port=0, clock=clock).start()
        return running(srv.host, srv.port, server=srv)
    proc = _start_process(res.dir)
    host, port = _wait_listening(proc, res.dir)
    return running(host, port, proc=proc)


@pytest.fixture(scope="session")
def est_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEstServer]:
    """One `tpmid est-server run` process per worker; read-only use."""
    srv = start_est_server(tmp_path_factory.mktemp("est-server"), process=True)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def est_server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningEstServer]]:
    """Make servers with their own directories for one test; all stopped afterwards."""
    started: list[RunningEstServer] = []

    def factory(*, alg: str = "ecc-p256", process: bool = False,
                config: ConfigEdit | None = None,
                clock: Callable[[], datetime] | None = None) -> RunningEstServer:
        srv = start_est_server(tmp_path / f"est-server-{len(started)}", alg=alg,
                               process=process, config=config, clock=clock)
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
