"""The reference EST server (``tpmid est-server``) started for a test, and a device config for it.

* :func:`start_est_server` initialises a server directory and starts the server
  on a free loopback port, in this process (fast; :meth:`RunningEstServer.reload`
  is immediate) or as a real ``tpmid est-server run`` process.
* :class:`RunningEstServer` is what a test gets: URLs, the IDevID secret, the CA
  files, the issued-certificate log, and ways to change the server while it runs
  (``configure``/``edit_config`` rewrite ``config.yaml`` and reload).
* :func:`device_config` is a tpmid config document for a device that enrolls
  against such a server with a given TPM.

The pytest fixtures over these (``est_server``, ``est_server_factory``,
``fresh_est_server``) are in :mod:`tpmid.testing.plugin`; see ``docs/testing.md``.
Unlike the plugin, this module imports the reference server (and with it
``cryptography`` and ``yaml``) when loaded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tpmid.server import EstServer, init_server_dir
from tpmid.server.ca import IssueLog
from tpmid.server.config import LabelConfig
from tpmid.server.lab import LabChange, reload_running, update_label
from tpmid.server.state import ServerPaths, est_url

START_TIMEOUT = 30.0
SECRET_ENV = "TPMID_TEST_EST_SECRET"
_LISTENING = re.compile(r"^listening on https://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)/",
                        re.MULTILINE)

ConfigEdit = Callable[[dict[str, Any]], None]
LabelOverrides = Mapping[str, Mapping[str, Any]]


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
        """``DIR/config.yaml``."""
        return self.dir / "config.yaml"

    def config(self) -> dict[str, Any]:
        """The parsed config file (a copy; edit with :meth:`edit_config`)."""
        data: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        return data

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
        """Make the server re-read its config (SIGHUP for a process, waiting until it did)."""
        if self.server is not None:
            self.server.reload()
            return
        assert self.process is not None
        if reload_running(ServerPaths(self.dir)) is None:
            raise AssertionError(f"the server process of {self.dir} is not running "
                                 f"(exit {self.process.poll()})")

    def lab(self, label: str, *, lifetime: str | None = None, pending: int | None = None,
            retry_after: str | None = None, faults: Mapping[str, Any] | None = None,
            clear_faults: bool = False, reset: bool = False) -> LabelConfig:
        """Change ``label`` as ``tpmid est-server label`` does; return its new settings.

        Checked, saved in ``DIR/lab.yaml`` and applied before this returns (a process
        server is signalled and confirms; an in-process one reloads).
        """
        change = LabChange(lifetime=lifetime, pending=pending, retry_after=retry_after,
                           faults=dict(faults or {}), clear_faults=clear_faults, reset=reset)
        result = update_label(self.dir, label, change)
        if self.server is not None and change.changes_anything:
            self.server.reload()
        return result.label

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


def tpmid_command(*args: str) -> list[str]:
    """``tpmid ARGS`` with the interpreter running the tests (its tpmid, its venv)."""
    return [sys.executable, "-m", "tpmid.cli", *args]


def _start_process(dir: Path, extra_args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    out = open(dir / "run.stdout", "wb")  # noqa: SIM115 - owned by the child
    err = open(dir / "run.log", "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            tpmid_command("est-server", "run", "--dir", str(dir), "--port", "0", *extra_args),
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=dir,
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


def override_labels(data: dict[str, Any], labels: LabelOverrides) -> None:
    """Merge per-label settings into a server config document (``faults`` merged too)."""
    for name, settings in labels.items():
        if name not in data["labels"]:
            raise KeyError(f"the server has no label {name!r} "
                           f"(labels: {', '.join(sorted(data['labels']))})")
        label = data["labels"][name]
        for key, value in settings.items():
            if key == "faults" and isinstance(value, Mapping):
                label["faults"] = {**(label.get("faults") or {}), **value}
            else:
                label[key] = value


def start_est_server(dir: Path, *, alg: str = "ecc-p256", process: bool = False,
                     labels: LabelOverrides | None = None,
                     config: ConfigEdit | None = None,
                     clock: Callable[[], datetime] | None = None,
                     init_args: Mapping[str, Any] | None = None) -> RunningEstServer:
    """Initialise ``dir`` and start a server on a free loopback port.

    ``labels`` overrides settings per label (``{"ldevid": {"lifetime": "10min",
    "pending": 1}}``); ``config`` edits the whole YAML document before start;
    ``clock`` (in-process servers only) runs the server's CAs on an injected clock.
    ``init_args`` go to :func:`tpmid.server.init_server_dir` (``tls_from="ldevid"``).
    """
    res = init_server_dir(dir, alg=alg, **dict(init_args or {}))
    if labels or config is not None:
        data = yaml.safe_load(res.config_path.read_text())
        if labels:
            override_labels(data, labels)
        if config is not None:
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
    if clock is not None:
        raise ValueError("an injected clock needs an in-process server (process=False)")
    proc = _start_process(res.dir)
    host, port = _wait_listening(proc, res.dir)
    return running(host, port, proc=proc)


def device_config(server: RunningEstServer, *, tcti: str, store: Path,
                  serial: str = "TEST-0001", idevid_handle: int = 0x81020000,
                  secret_env: str = SECRET_ENV, edge_ca: bool = False) -> dict[str, Any]:
    """A tpmid config document for a device enrolling against ``server`` with the TPM at ``tcti``.

    Identities: ``idevid`` (persistent H-2 key at ``idevid_handle``, enrolled or
    provisioned with the server's Secret-Value from ``$secret_env``), ``ldevid``
    (a TPM key file, mutual TLS with the IDevID) and, with ``edge_ca``, ``edge-ca``
    (a CA certificate, mutual TLS with the LDevID). Subjects carry ``serial``, as
    the server's ``client-serial`` subject policy requires. Write it with mode 0600
    (tpmid refuses a config file others can change) and run tpmid with
    ``{secret_env: server.secret}`` in its environment.
    """
    identities: dict[str, Any] = {
        "idevid": {
            "key": {"kind": "persistent", "template": "H-2", "handle": idevid_handle},
            "subject": {"cn": "IDevID", "serial_number": serial},
            "est": {"url": server.url("idevid"),
                    "auth": {"headers": {"Secret-Value": {"env": secret_env}}},
                    "issuer_anchors": [str(server.manufacturer_ca)]},
        },
        "ldevid": {
            "key": {"kind": "file", "alg": "ecc-p256"},
            "subject": {"cn": f"device-{serial}", "serial_number": serial},
            "est": {"url": server.url("ldevid"), "auth": {"client": "idevid"}},
        },
    }
    if edge_ca:
        identities["edge-ca"] = {
            "key": {"kind": "file", "alg": "ecc-p256"},
            "subject": {"cn": f"device-{serial} Edge CA", "serial_number": serial},
            "profile": "ca",
            "est": {"url": server.url("edgeca"), "auth": {"client": "ldevid"}},
        }
    return {
        "tpm": {"tcti": tcti},
        "store": {"dir": str(store)},
        "trust": {"est_anchors": [str(server.tls_ca)]},
        "identities": identities,
    }


def write_device_config(path: Path, document: Mapping[str, Any]) -> Path:
    """Write a tpmid config document to ``path`` with mode 0600; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(dict(document), sort_keys=False))
    os.chmod(path, 0o600)
    return path
