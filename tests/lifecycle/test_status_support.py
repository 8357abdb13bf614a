"""Shared set-up for the status, check and reset tests (no tests here).

A :class:`Device` is a real swtpm with a persistent H-2 IDevID, a store and a
config file (0600) for three identities against a real reference EST server on
loopback: ``idevid`` (persistent key, Secret-Value), ``ldevid`` (key file, mutual
TLS with the IDevID) and ``edgeca`` (key file, CA profile, mutual TLS with the
LDevID). ``enroll_all()`` enrolls them with the library; ``cli(...)`` runs
``tpmid`` in-process with that config.

Fixtures (import the ``*_fixture`` functions; the tests name them ``device``,
``own_server_device`` and ``enrolled``): a device against the worker's shared
EST server, one with a server of its own, and a device with all three enrolled.

Imported by ``tests/lifecycle/test_status*.py``, ``test_check*.py`` and ``test_reset*.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.est.test_client_support import SECRET_ENV, transient_handles
from tests.support.wiring import enroll
from tpmid.cli import main
from tpmid.config import Config, parse_config
from tpmid.lifecycle.enroll import EnrollResult
from tpmid.store import Store, StoredIdentity
from tpmid.testing.estserver import RunningEstServer
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import create_persistent_idevid

IDEVID_HANDLE = 0x81020000
NAMES = ("idevid", "ldevid", "edgeca")


@dataclass
class Device:
    """One simulated device: TPM, store directory, config file, EST server."""

    sim: Swtpm
    server: RunningEstServer
    dir: Path
    data: dict[str, Any]
    capsys: pytest.CaptureFixture[str]
    enrolled: dict[str, EnrollResult] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def store_dir(self) -> Path:
        return self.dir / "store"

    @property
    def config(self) -> Config:
        return parse_config(self.data, str(self.config_path))

    @property
    def store(self) -> Store:
        return Store(self.store_dir)

    def current(self, name: str) -> StoredIdentity:
        cur = self.store.current(name)
        assert cur is not None, f"{name} is not enrolled"
        return cur

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.data, sort_keys=False))
        self.config_path.chmod(0o600)

    def edit(self, edit: Callable[[dict[str, Any]], None]) -> None:
        """Change the config data and rewrite the file."""
        edit(self.data)
        self.write_config()

    def enroll(self, name: str) -> EnrollResult:
        with TpmConnection(self.sim.tcti) as tpm:
            result = enroll(self.config, name, tpm=tpm, secrets={SECRET_ENV: self.server.secret})
        self.enrolled[name] = result
        return result

    def enroll_all(self) -> Device:
        for name in NAMES:
            self.enroll(name)
        return self

    def cli(self, *args: str) -> tuple[int, str, str]:
        """Run ``tpmid --config FILE ARGS`` in this process; (exit code, stdout, stderr)."""
        self.capsys.readouterr()
        rc = main(["--config", str(self.config_path), *args])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def cli_json(self, *args: str) -> tuple[int, Any]:
        rc, out, _ = self.cli(*args, "--json")
        return rc, json.loads(out)

    def transients(self) -> list[int]:
        return transient_handles(self.sim.tcti)


def device_data(sim: Swtpm, srv: RunningEstServer, store: Path) -> dict[str, Any]:
    """The config document of a :class:`Device`."""
    return {
        "tpm": {"tcti": sim.tcti},
        "store": {"dir": str(store)},
        "trust": {"est_anchors": [str(srv.tls_ca)]},
        "identities": {
            "idevid": {
                "key": {"kind": "persistent", "template": "H-2", "handle": IDEVID_HANDLE},
                "subject": {"cn": "IDevID", "serial_number": "STATUS-0001"},
                "est": {"url": srv.url("idevid"),
                        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}}},
            },
            "ldevid": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                # The IDevID's serial: the server's ldevid/edgeca labels bind to it.
                "subject": {"cn": "status-device", "serial_number": "STATUS-0001"},
                "est": {"url": srv.url("ldevid"), "auth": {"client": "idevid"}},
            },
            "edgeca": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": "status-device Edge CA", "serial_number": "STATUS-0001"},
                "profile": "ca",
                "est": {"url": srv.url("edgeca"), "auth": {"client": "ldevid"}},
            },
        },
    }


def make_device(sim: Swtpm, srv: RunningEstServer, dir: Path,
                capsys: pytest.CaptureFixture[str]) -> Device:
    """A device whose TPM holds the IDevID key; nothing enrolled yet."""
    dir.mkdir(parents=True, exist_ok=True)
    dir.chmod(0o755)
    with TpmConnection(sim.tcti) as tpm:
        create_persistent_idevid(tpm, "H-2", IDEVID_HANDLE)
    dev = Device(sim, srv, dir, device_data(sim, srv, dir / "store"), capsys)
    dev.write_config()
    return dev


@pytest.fixture(name="device")
def device_fixture(swtpm: Swtpm, est_server: RunningEstServer, tmp_path: Path,
           capsys: pytest.CaptureFixture[str],
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Device]:
    """A fresh device against the worker's shared (read-only) EST server."""
    monkeypatch.delenv("TPMID_TCTI", raising=False)
    monkeypatch.delenv("TPMID_CONFIG", raising=False)
    yield make_device(swtpm, est_server, tmp_path / "device", capsys)


@pytest.fixture(name="own_server_device")
def own_server_device_fixture(swtpm: Swtpm, est_server_factory: Callable[..., RunningEstServer],
                      tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> Iterator[Device]:
    """A fresh device with an EST server of its own (free to reconfigure or stop)."""
    monkeypatch.delenv("TPMID_TCTI", raising=False)
    monkeypatch.delenv("TPMID_CONFIG", raising=False)
    yield make_device(swtpm, est_server_factory(), tmp_path / "device", capsys)


@pytest.fixture(name="enrolled")
def enrolled_fixture(device: Device) -> Device:
    """:func:`device` with idevid, ldevid and edgeca enrolled."""
    return device.enroll_all()
