"""A device in the field and the ways the world can misbehave around it.

A :class:`Field` is a real swtpm with a persistent H-2 IDevID, a store and a
config file for ``idevid`` (Secret-Value), ``ldevid`` (key file, mTLS with the
IDevID) and ``edge-ca`` (key file, CA profile, mTLS with the LDevID), enrolled
against a reference EST server of its own (in-process, so faults are switched
with :meth:`Field.fault` and take effect at once). ``tpmid`` runs in-process
(:meth:`Field.cli`) or as a real process (:meth:`Field.run`).

After a fault, :meth:`Field.assert_identity_intact` checks what a device must
never lose: the current certificate is the one from before, its key still signs
in the TPM, and the signature verifies with the certificate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from tests.support.wiring import enroll
from tpmid.cli import main
from tpmid.config import Config, parse_config
from tpmid.store import Store, StoredIdentity
from tpmid.testing.estserver import RunningEstServer
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import HierarchyPasswords, TpmConnection
from tpmid.tpm.identity import identity_key

REPO = Path(__file__).resolve().parents[2]
SECRET_ENV = "TPMID_TEST_EST_SECRET"
IDEVID_HANDLE = 0x81020000
NAMES = ("idevid", "ldevid", "edge-ca")


@dataclass
class Field:
    """One device in the field (see the module docstring)."""

    sim: Swtpm
    server: RunningEstServer
    dir: Path
    data: dict[str, Any]
    capsys: pytest.CaptureFixture[str]
    before: dict[str, StoredIdentity] = field(default_factory=dict)

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

    @property
    def env(self) -> dict[str, str]:
        return {SECRET_ENV: self.server.secret}

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.data, sort_keys=False))
        self.config_path.chmod(0o600)

    def edit(self, edit: Callable[[dict[str, Any]], None]) -> None:
        edit(self.data)
        self.write_config()

    def enroll_all(self) -> Field:
        with TpmConnection(self.sim.tcti) as tpm:
            for name in NAMES:
                enroll(self.config, name, tpm=tpm, secrets=self.env)
        self.remember()
        return self

    def remember(self) -> None:
        """Note the current versions: what a fault must not take away."""
        for name in NAMES:
            cur = self.store.current(name)
            if cur is not None:
                self.before[name] = cur

    def current(self, name: str) -> StoredIdentity:
        cur = self.store.current(name)
        assert cur is not None, f"{name} has no current version"
        return cur

    def fault(self, label: str, **faults: Any) -> None:
        """Switch faults on for one label of the server (``{}`` switches them off)."""
        self.server.configure(label, faults=faults)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """``tpmid --config FILE ARGS`` in this process: (exit code, stdout, stderr)."""
        self.capsys.readouterr()
        saved = dict(os.environ)
        os.environ.update(self.env if env is None else env)
        try:
            rc = main(["--config", str(self.config_path), *args])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        out, err = self.capsys.readouterr()
        return rc, out, err

    def run(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """``tpmid --config FILE ARGS`` as a real process (``env``: extra variables)."""
        return subprocess.run(
            [sys.executable, "-m", "tpmid.cli", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout, cwd=REPO,
            env={**os.environ, **self.env, **(env or {})}, **kw)

    def state(self, name: str) -> dict[str, Any]:
        path = self.store_dir / "state" / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def assert_identity_intact(self, name: str) -> StoredIdentity:
        """The version from before the fault is current, and its key signs in the TPM."""
        cur = self.current(name)
        assert cur.version == self.before[name].version, (
            f"{name}: version {cur.version} is current, expected {self.before[name].version}")
        assert cur.cert == self.before[name].cert
        assert_key_signs(self, name, cur)
        return cur


def assert_key_signs(f: Field, name: str, cur: StoredIdentity, *, owner: bytes = b"") -> None:
    """The TPM key of ``name`` signs, and the signature verifies with ``cur``'s certificate."""
    key = identity_key(f.config.identity(name))
    with TpmConnection(f.sim.tcti, HierarchyPasswords(owner=owner)) as tpm, \
            key.open(tpm, cur.key_file) as loaded:
        h = hashes.SHA256() if loaded.hash_name == "sha256" else hashes.SHA384()
        digest = hashes.Hash(h)
        digest.update(b"still mine")
        value = digest.finalize()
        sig = loaded.sign_digest(value)
    public = cur.cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(sig, value, ec.ECDSA(Prehashed(h)))
    assert isinstance(cur.cert, x509.Certificate)


def field_data(sim: Swtpm, srv: RunningEstServer, store: Path) -> dict[str, Any]:
    """The config document of a :class:`Field`."""
    return {
        "tpm": {"tcti": sim.tcti},
        "store": {"dir": str(store)},
        "trust": {"est_anchors": [str(srv.tls_ca)]},
        "identities": {
            "idevid": {
                "key": {"kind": "persistent", "template": "H-2", "handle": IDEVID_HANDLE},
                "subject": {"cn": "IDevID", "serial_number": "FIELD-0001"},
                "est": {"url": srv.url("idevid"),
                        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}},
                        "issuer_anchors": [str(srv.manufacturer_ca)]},
            },
            "ldevid": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": "field-device", "serial_number": "FIELD-0001"},
                "est": {"url": srv.url("ldevid"), "auth": {"client": "idevid"}},
            },
            "edge-ca": {
                "key": {"kind": "file", "alg": "ecc-p256"},
                "subject": {"cn": "field-device Edge CA", "serial_number": "FIELD-0001"},
                "profile": "ca",
                "est": {"url": srv.url("edgeca"), "auth": {"client": "ldevid"}},
            },
        },
    }


@pytest.fixture
def field_device(swtpm: Swtpm, est_server_factory: Callable[..., RunningEstServer],
                 tmp_path: Path, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[Field]:
    """A device with an EST server of its own; nothing enrolled yet (the IDevID key exists)."""
    monkeypatch.delenv("TPMID_TCTI", raising=False)
    monkeypatch.delenv("TPMID_CONFIG", raising=False)
    srv = est_server_factory()
    d = tmp_path / "device"
    d.mkdir(mode=0o755)
    with TpmConnection(swtpm.tcti) as tpm:
        tpm.persist_idevid("H-2", IDEVID_HANDLE)
    f = Field(swtpm, srv, d, field_data(swtpm, srv, d / "store"), capsys)
    f.write_config()
    yield f


@pytest.fixture
def field(field_device: Field) -> Field:
    """:func:`field_device` with idevid, ldevid and edge-ca enrolled."""
    return field_device.enroll_all()
