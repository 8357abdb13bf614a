"""``tpmid provision`` on simulated devices: real swtpm, real reference EST server, real CLI.

Every test drives the ``tpmid provision`` command in a subprocess (as a factory
image would) or the library function, against its own swtpm and a reference
EST server on loopback. Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

from tests.support.wiring import clients
from tests.tpm.helpers import run_tool
from tpmid.config import parse_config
from tpmid.lifecycle.provision import provision
from tpmid.manifest import ProvisionRecord, read_manifest
from tpmid.server.ca import load_ca
from tpmid.store import Store
from tpmid.testing.estserver import RunningEstServer
from tpmid.testing.swtpm import Swtpm, manufacture
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import create_persistent_idevid, evict_persistent
from tpmid.tpm.templates import idevid_template, public_key_from_tpm

REPO = Path(__file__).resolve().parents[2]
HANDLE = 0x81020000
NV_INDEX = 0x01800100
SECRET_ENV = "TPMID_TEST_IDEVID_SECRET"
STATION = "line-7"

ServerFactory = Callable[..., RunningEstServer]


# --------------------------------------------------------------------------- helpers


@dataclass
class Device:
    """One simulated device: its TPM, its disk (store) and its config file."""

    sim: Swtpm
    dir: Path
    config: Path

    @property
    def store(self) -> Path:
        return self.dir / "store"


def _config_data(device_dir: Path, sim: Swtpm, srv: RunningEstServer, *,
                 issuer_anchors: bool = True, kind: str = "persistent") -> dict[str, Any]:
    est: dict[str, Any] = {
        "url": srv.url("idevid"),
        "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}},
    }
    if issuer_anchors:
        est["issuer_anchors"] = [str(srv.manufacturer_ca)]
    return {
        "tpm": {"tcti": sim.tcti},
        "store": {"dir": str(device_dir / "store")},
        "trust": {"est_anchors": [str(srv.tls_ca)]},
        "identities": {"idevid": {
            "key": {"kind": kind, "handle": HANDLE, "template": "H-2"},
            "subject": {"cn": "sensor-{serial}", "o": "ACME Devices"},
            "san": {"hardware_module_name": True},
            "est": est,
        }},
    }


def make_device(dir: Path, sim: Swtpm, srv: RunningEstServer, **kw: Any) -> Device:
    dir.mkdir(parents=True, exist_ok=True)
    config = dir / "config.yaml"
    config.write_text(yaml.safe_dump(_config_data(dir, sim, srv, **kw)))
    return Device(sim=sim, dir=dir, config=config)


def _env(device: Device, secret: str | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TPMID_CONFIG": str(device.config),
           "PYTHONDONTWRITEBYTECODE": "1"}
    if secret is not None:
        env[SECRET_ENV] = secret
    return env


def provision_cmd(device: Device, manifest: Path, *args: str, json_out: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "tpmid.cli", "provision", "--station", STATION,
           "--manifest", str(manifest), *args]
    return [*cmd, "--json"] if json_out else cmd


def run_provision(device: Device, manifest: Path, secret: str | None, *args: str,
                  json_out: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(provision_cmd(device, manifest, *args, json_out=json_out),
                          env=_env(device, secret), cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def json_record(proc: subprocess.CompletedProcess[str]) -> ProvisionRecord:
    """The one JSON object ``--json`` prints, parsed and validated."""
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line, got:\n{proc.stdout}\n{proc.stderr}"
    return ProvisionRecord.from_json(lines[0])


@dataclass(frozen=True)
class TpmState:
    """What a test compares to prove the TPM's IDevID was left untouched."""

    persistent: tuple[int, ...]
    nv: tuple[int, ...]
    idevid_public: bytes | None


def tpm_state(sim: Swtpm) -> TpmState:
    with TpmConnection(sim.tcti) as tpm:
        persistent = tuple(tpm.persistent_handles())
        public = None
        if HANDLE in persistent:
            tr = tpm.esapi.tr_from_tpmpublic(HANDLE)
            try:
                pub, _, _ = tpm.esapi.read_public(tr)
                public = bytes(pub.marshal())
            finally:
                tpm.esapi.tr_close(tr)
        return TpmState(persistent, tuple(tpm.nv_indices()), public)


def stored_cert(device: Device) -> x509.Certificate | None:
    current = Store(device.store).current("idevid")
    return current.cert if current else None


def cert_der_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture
def server(est_server_factory: ServerFactory) -> RunningEstServer:
    """A reference EST server for this test (in-process, free to reconfigure)."""
    return est_server_factory()


@pytest.fixture
def device(swtpm: Swtpm, server: RunningEstServer, tmp_path: Path) -> Device:
    """A factory-fresh simulated device configured for ``server``."""
    return make_device(tmp_path / "device", swtpm, server)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    share = tmp_path / "station-share"
    share.mkdir()
    return share / "manifest.jsonl"


# --------------------------------------------------------------------------- the line


@pytest.fixture
def eight_devices(tpm_template: Path, tmp_path: Path, server: RunningEstServer
                  ) -> Iterator[list[Device]]:
    """Eight distinct TPMs (own endorsement seeds, so own EKs), each running."""
    ca = tpm_template / "localca"
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda i: manufacture(tmp_path / f"tpm{i}", ca_dir=ca), range(8)))
    sims: list[Swtpm] = []
    try:
        for d in dirs:
            sims.append(Swtpm(d).start())
        yield [make_device(tmp_path / f"device{i}", sim, server) for i, sim in enumerate(sims)]
    finally:
        for sim in sims:
            sim.stop()


def _run_all(devices: list[Device], manifest: Path, secret: str, serials: list[str],
             json_out: bool) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen(provision_cmd(d, manifest, "--serial", s, json_out=json_out),
                              env=_env(d, secret), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for d, s in zip(devices, serials, strict=True)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_eight_devices_provisioned_concurrently_get_unique_identities_and_one_record_each(
        eight_devices: list[Device], server: RunningEstServer, manifest: Path) -> None:
    serials = [f"SN-{1000 + i}" for i in range(8)]
    results = _run_all(eight_devices, manifest, server.secret, serials, json_out=True)
    for r in results:
        assert r.returncode == 0, r.stderr

    records = read_manifest(manifest)
    assert len(records) == 8
    assert all(r.outcome == "provisioned" and r.result == "PASS" for r in records)
    assert sorted(r.device_serial or "" for r in records) == serials
    for field in ("ek_fingerprint", "idevid_key_sha256", "idevid_cert_sha256",
                  "idevid_cert_serial"):
        assert len({getattr(r, field) for r in records}) == 8, field
    assert all(r.station == STATION and r.idevid_handle == "0x81020000" for r in records)
    assert all(len(r.ek_certificates) == 2 for r in records)
    # Each device's --json output is exactly its manifest line.
    by_serial = {r.device_serial: r for r in records}
    for r in results:
        printed = json_record(r)
        assert printed == by_serial[printed.device_serial]
    # Each device's store holds the certificate the manifest names, for its own TPM key.
    for d, s in zip(eight_devices, serials, strict=True):
        cert = stored_cert(d)
        assert cert is not None
        assert cert_der_sha256(cert) == by_serial[s].idevid_cert_sha256
        assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == s
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"sensor-{s}"
    assert len(server.issued()) == 8

    # Second pass over the same devices: verify and report, no enrollment.
    again = _run_all(eight_devices, manifest, server.secret, serials, json_out=False)
    for r in again:
        assert r.returncode == 0, r.stderr
        assert "PASS" in r.stdout and "already-provisioned" in r.stdout
    records = read_manifest(manifest)
    assert len(records) == 16
    for rec in records[8:]:
        assert rec.outcome == "already-provisioned"
        assert rec.idevid_cert_sha256 == by_serial[rec.device_serial].idevid_cert_sha256
    assert len(server.issued()) == 8  # no EST request on the second pass


# --------------------------------------------------------------------------- failures


def _wrong_secret(srv: RunningEstServer) -> str:
    return "not-the-" + srv.secret[:4]


@dataclass(frozen=True)
class Fault:
    secret: Callable[[RunningEstServer], str]
    arrange: Callable[[RunningEstServer], object]
    exit_code: int
    error_code: str


FAULTS = {
    "wrong-secret": Fault(_wrong_secret, lambda srv: None, 5, "EstAuthError"),
    "server-down": Fault(lambda srv: srv.secret, lambda srv: srv.stop(), 4, "EstTransportError"),
    "certificate-for-wrong-key": Fault(
        lambda srv: srv.secret,
        lambda srv: srv.configure("idevid", faults={"wrong_key": True,
                                                    "operations": ["simpleenroll"]}),
        6, "VerificationError"),
}


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_failure_on_a_fresh_device_has_its_own_exit_code_and_leaves_the_tpm_as_found(
        fault: str, device: Device, server: RunningEstServer, manifest: Path) -> None:
    f = FAULTS[fault]
    before = tpm_state(device.sim)
    f.arrange(server)
    proc = run_provision(device, manifest, f.secret(server), "--serial", "SN-F1")
    assert proc.returncode == f.exit_code, proc.stderr

    [rec] = read_manifest(manifest)
    assert rec.outcome == "fail" and rec.result == "FAIL"
    assert (rec.error_code, rec.exit_code) == (f.error_code, f.exit_code)
    assert rec.failed_step == "enrolling over EST"
    assert rec.device_serial == "SN-F1" and rec.ek_fingerprint
    assert json_record(proc) == rec
    # The key this run created was removed again; no certificate was stored.
    assert rec.idevid_key_action == "removed-after-failure"
    assert tpm_state(device.sim) == before
    assert stored_cert(device) is None
    for text in (proc.stdout, proc.stderr, manifest.read_text()):
        assert server.secret not in text and _wrong_secret(server) not in text


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_failed_forced_reenrollment_keeps_the_existing_idevid_and_certificate(
        fault: str, device: Device, server: RunningEstServer, manifest: Path) -> None:
    first = run_provision(device, manifest, server.secret, "--serial", "SN-F2")
    assert first.returncode == 0, first.stderr
    before, cert_before = tpm_state(device.sim), stored_cert(device)
    assert before.idevid_public is not None and cert_before is not None

    f = FAULTS[fault]
    f.arrange(server)
    proc = run_provision(device, manifest, f.secret(server), "--serial", "SN-F2", "--force")
    assert proc.returncode == f.exit_code, proc.stderr
    rec = read_manifest(manifest)[-1]
    assert (rec.outcome, rec.error_code, rec.exit_code) == ("fail", f.error_code, f.exit_code)
    assert rec.idevid_key_action == "kept"
    assert tpm_state(device.sim) == before
    assert stored_cert(device) == cert_before


def test_station_sees_numbered_steps_and_a_framed_fail_line(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    proc = run_provision(device, manifest, _wrong_secret(server), "--serial", "SN-H1",
                         json_out=False)
    assert proc.returncode == 5
    steps = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert steps[0].startswith("[1/7] configuration ... ok  credentials resolved")
    assert steps[1].startswith("[2/7] reading EK ... ok")
    assert steps[2].startswith("[3/7] IDevID key ... created")
    assert steps[3] == "[4/7] enrolling over EST ... FAILED"
    assert steps[-1].startswith("[7/7] manifest ... appended")
    lines = proc.stdout.splitlines()
    assert lines[0] == lines[2] == "=" * 72
    assert lines[1].startswith("FAIL  SN-H1  EstAuthError (exit 5)")
    assert "tpmid: error:" in proc.stderr


def test_missing_secret_is_a_config_error_recorded_in_the_manifest(
        device: Device, manifest: Path) -> None:
    before = tpm_state(device.sim)
    proc = run_provision(device, manifest, None, "--serial", "SN-C1")
    assert proc.returncode == 2
    rec = json_record(proc)
    assert (rec.error_code, rec.outcome) == ("ConfigError", "fail")
    assert SECRET_ENV in (rec.error or "")
    # Found before anything touched the TPM (pre-flight), not after the key was made.
    assert rec.failed_step == "configuration"
    assert rec.idevid_key_action is None and rec.ek_fingerprint is None
    assert read_manifest(manifest) == [rec]
    assert tpm_state(device.sim) == before


def test_missing_config_file_still_leaves_a_record(device: Device, manifest: Path) -> None:
    device.config.unlink()
    proc = run_provision(device, manifest, "x", "--serial", "SN-C2")
    assert proc.returncode == 2
    [rec] = read_manifest(manifest)
    assert (rec.error_code, rec.failed_step, rec.device_serial) == (
        "ConfigError", "configuration", "SN-C2")


def test_unreachable_tpm_is_a_tpm_fault_with_a_record(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    device.sim.stop()
    proc = run_provision(device, manifest, server.secret, "--serial", "SN-T1")
    assert proc.returncode == 3
    rec = json_record(proc)
    assert (rec.error_code, rec.failed_step) == ("TpmError", "reading EK")
    assert read_manifest(manifest) == [rec]


def test_file_key_is_refused_for_an_idevid(
        device: Device, swtpm: Swtpm, server: RunningEstServer, manifest: Path) -> None:
    data = yaml.safe_load(device.config.read_text())
    data["identities"]["idevid"]["key"] = {"kind": "file", "alg": "ecc-p256"}
    device.config.write_text(yaml.safe_dump(data))
    proc = run_provision(device, manifest, server.secret, "--serial", "SN-C3")
    assert proc.returncode == 2
    assert "endorsement hierarchy" in (json_record(proc).error or "")


@pytest.mark.parametrize("source", ["env", "file", "stdin"])
def test_bootstrap_secret_from_any_source_is_used_but_never_written_to_the_device(
        source: str, device: Device, server: RunningEstServer, manifest: Path,
        tmp_path: Path) -> None:
    data = yaml.safe_load(device.config.read_text())
    ref: dict[str, Any] = {"env": SECRET_ENV}
    if source == "file":
        secret_file = tmp_path / "secret"  # outside the device's disk, as on a station
        secret_file.write_text(server.secret + "\n")
        secret_file.chmod(0o600)
        ref = {"file": str(secret_file)}
    elif source == "stdin":
        ref = {"stdin": True}
    data["identities"]["idevid"]["est"]["auth"]["headers"]["Secret-Value"] = ref
    device.config.write_text(yaml.safe_dump(data))
    proc = subprocess.run(provision_cmd(device, manifest, "--serial", "SN-K1"),
                          env=_env(device, server.secret if source == "env" else None),
                          input=server.secret + "\n" if source == "stdin" else None,
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json_record(proc).outcome == "provisioned"
    written = [p for p in device.dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "cert.pem" for p in written)
    for p in [*written, manifest]:
        assert server.secret.encode() not in p.read_bytes(), p
    assert server.secret not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- idempotence


def _swap_in_foreign_key(sim: Swtpm) -> bytes:
    """Replace the IDevID at HANDLE by another key of the same template (owner hierarchy)."""
    with TpmConnection(sim.tcti) as tpm:
        evict_persistent(tpm, HANDLE)
        esapi = tpm.esapi
        handle, public, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), idevid_template("H-2"), ESYS_TR.OWNER)
        try:
            esapi.tr_close(esapi.evict_control(ESYS_TR.OWNER, handle, HANDLE))
        finally:
            esapi.flush_context(handle)
        return bytes(public.marshal())


def test_tpm_key_that_does_not_match_its_certificate_is_reported_never_fixed(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    assert run_provision(device, manifest, server.secret, "--serial", "SN-M1").returncode == 0
    cert = stored_cert(device)
    foreign = _swap_in_foreign_key(device.sim)
    before = tpm_state(device.sim)
    assert before.idevid_public == foreign

    proc = run_provision(device, manifest, server.secret)
    assert proc.returncode == 6
    rec = json_record(proc)
    assert (rec.error_code, rec.failed_step) == ("IdentityMismatchError", "proving the identity")
    assert "does not certify" in (rec.error or "")

    # --force re-enrolls, but never by destroying a key it did not create.
    forced = run_provision(device, manifest, server.secret, "--serial", "SN-M1", "--force")
    assert forced.returncode == 3
    refused = json_record(forced)
    assert refused.error_code == "KeyMismatchError"
    assert "never replaces a key" in (refused.hint or "")
    assert tpm_state(device.sim) == before
    assert stored_cert(device) == cert
    assert len(server.issued()) == 1


def test_stored_certificate_without_its_tpm_key_is_reported_and_force_recreates_the_key(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    first = json_record(run_provision(device, manifest, server.secret, "--serial", "SN-G1"))
    with TpmConnection(device.sim.tcti) as tpm:  # as TPM2_Clear would
        evict_persistent(tpm, HANDLE)
    proc = run_provision(device, manifest, server.secret)
    assert proc.returncode == 6
    rec = json_record(proc)
    assert rec.error_code == "IdentityMismatchError" and "no key at 0x81020000" in (rec.error or "")
    assert rec.idevid_cert_sha256 == first.idevid_cert_sha256
    assert tpm_state(device.sim).idevid_public is None  # reported, not silently re-created

    forced = json_record(run_provision(device, manifest, server.secret, "--serial", "SN-G1",
                                       "--force"))
    assert (forced.outcome, forced.idevid_key_action) == ("provisioned", "created")
    # The TCG template re-derives the same key from the endorsement seed.
    assert forced.idevid_key_sha256 == first.idevid_key_sha256


def test_expired_idevid_certificate_fails_the_check_instead_of_passing(
        swtpm: Swtpm, server: RunningEstServer, tmp_path: Path, manifest: Path) -> None:
    """The clock is the injected ``now`` seam; the certificate is real."""
    cfg = parse_config(_config_data(tmp_path, swtpm, server), "test")
    with TpmConnection(swtpm.tcti) as tpm:
        ok = provision(cfg, store=Store(cfg.store.dir), tpm=tpm,
                       clients=clients(cfg, {SECRET_ENV: server.secret}), serial="SN-X1",
                       station_id=STATION, manifest_path=manifest)
        assert ok.outcome == "provisioned" and ok.idevid_cert_not_after
        later = datetime.fromisoformat(ok.idevid_cert_not_after).replace(year=2099)
        rec = provision(cfg, store=Store(cfg.store.dir), tpm=tpm, clients=clients(cfg, {}),
                        station_id=STATION, manifest_path=manifest, now=lambda: later)
    assert (rec.outcome, rec.error_code, rec.exit_code) == ("fail", "VerificationError", 6)
    assert rec.failed_step == "proving the identity"
    assert len(server.issued()) == 1


def test_rerun_with_another_serial_is_a_mismatch_not_a_new_identity(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    assert run_provision(device, manifest, server.secret, "--serial", "SN-S1").returncode == 0
    proc = run_provision(device, manifest, server.secret, "--serial", "SN-S2")
    assert proc.returncode == 6
    assert "carries serial 'SN-S1', not 'SN-S2'" in (json_record(proc).error or "")
    assert len(server.issued()) == 1


def test_force_reenrolls_a_provisioned_device_with_the_same_key(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    first = json_record(run_provision(device, manifest, server.secret, "--serial", "SN-R1"))
    second = json_record(run_provision(device, manifest, server.secret, "--serial", "SN-R1",
                                       "--force"))
    assert (first.outcome, second.outcome) == ("provisioned", "provisioned")
    assert second.idevid_key_action == "kept"
    assert second.idevid_key_sha256 == first.idevid_key_sha256
    assert second.idevid_cert_sha256 != first.idevid_cert_sha256
    assert len(server.issued()) == 2


def test_ek_derived_idevid_is_provisioned_without_persisting_anything(
        swtpm: Swtpm, server: RunningEstServer, tmp_path: Path, manifest: Path) -> None:
    """Library call (as an embedding application would make), not the CLI."""
    cfg = parse_config(_config_data(tmp_path, swtpm, server, kind="ek-derived"), "test")
    lines: list[str] = []
    before = tpm_state(swtpm)
    with TpmConnection(swtpm.tcti) as tpm:
        rec = provision(cfg, store=Store(cfg.store.dir), tpm=tpm,
                        clients=clients(cfg, {SECRET_ENV: server.secret}), serial="SN-E1",
                        station_id=STATION, manifest_path=manifest, progress=lines.append)
        assert tpm.transient_handles() == []
    assert (rec.outcome, rec.idevid_kind, rec.idevid_handle) == ("provisioned", "ek-derived", None)
    assert tpm_state(swtpm) == before
    assert [line[:5] for line in lines] == [f"[{i}/7]" for i in range(1, 8)]
    assert read_manifest(manifest) == [rec]


# --------------------------------------------------------------------------- NV and adoption


def test_certificate_kept_in_nv_lets_a_wiped_disk_adopt_the_identity_back(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    first = json_record(run_provision(device, manifest, server.secret, "--serial", "SN-N1",
                                      "--write-nv", hex(NV_INDEX)))
    assert first.outcome == "provisioned" and first.nv_index == "0x01800100"
    cert = stored_cert(device)
    assert cert is not None
    # Read it back with tpm2-tools, independently of tpmid.
    out = device.dir / "nv.der"
    run_tool(device.sim, "tpm2_nvread", hex(NV_INDEX), "-o", str(out))
    assert out.read_bytes() == cert.public_bytes(serialization.Encoding.DER)

    shutil.rmtree(device.store)  # the disk is re-imaged
    server.stop()  # adoption with issuer_anchors needs no server at all
    adopted = run_provision(device, manifest, None, "--adopt", "--cert-nv", hex(NV_INDEX))
    assert adopted.returncode == 0, adopted.stderr
    rec = json_record(adopted)
    assert (rec.outcome, rec.device_serial) == ("adopted", "SN-N1")
    assert rec.idevid_cert_sha256 == first.idevid_cert_sha256
    assert stored_cert(device) == cert

    again = json_record(run_provision(device, manifest, None))
    assert again.outcome == "already-provisioned"
    assert [r.outcome for r in read_manifest(manifest)] == [
        "provisioned", "adopted", "already-provisioned"]


def test_write_nv_never_overwrites_an_index_holding_other_data(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    run_tool(device.sim, "tpm2_nvdefine", hex(NV_INDEX), "-C", "o", "-s", "16",
             "-a", "ownerread|ownerwrite|authread")
    run_tool(device.sim, "tpm2_nvwrite", hex(NV_INDEX), "-C", "o", "-i", "-",
             stdin=b"vendor-data-0123")
    proc = run_provision(device, manifest, server.secret, "--serial", "SN-N2",
                         "--write-nv", hex(NV_INDEX))
    assert proc.returncode == 2
    assert json_record(proc).failed_step == "TPM NV copy"
    out = run_tool(device.sim, "tpm2_nvread", hex(NV_INDEX))
    assert out.stdout == "vendor-data-0123"


def _vendor_provision(device: Device, server: RunningEstServer, *, for_own_key: bool,
                      serial: str) -> x509.Certificate:
    """Play the TPM vendor: persist the IDevID, certify it, store the cert padded in NV."""
    with TpmConnection(device.sim.tcti) as tpm:
        created = create_persistent_idevid(tpm, "H-2", HANDLE)
    key = (public_key_from_tpm(created.public) if for_own_key
           else ec.generate_private_key(ec.SECP256R1()).public_key())
    ca = load_ca("manufacturer", server.manufacturer_ca,
                 server.dir / "private" / "manufacturer-ca.key")
    cert = ca.issue(public_key=key,  # type: ignore[arg-type]
                    subject=x509.Name([
                        x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
                        x509.NameAttribute(NameOID.COMMON_NAME, f"vendor-{serial}")]),
                    profile="idevid", lifetime=86400 * 365, now=datetime.now(UTC))
    der = cert.public_bytes(serialization.Encoding.DER)
    padded = device.dir / "vendor-nv.bin"
    padded.write_bytes(der + b"\xff" * (1024 - len(der)))
    run_tool(device.sim, "tpm2_nvdefine", hex(NV_INDEX), "-C", "o", "-s", "1024",
             "-a", "ownerread|ownerwrite|authread|no_da")
    run_tool(device.sim, "tpm2_nvwrite", hex(NV_INDEX), "-C", "o", "-i", str(padded))
    return cert


@pytest.mark.parametrize("anchors", ["issuer_anchors", "cacerts"])
def test_vendor_provisioned_idevid_is_adopted_after_checking_it(
        anchors: str, swtpm: Swtpm, server: RunningEstServer, tmp_path: Path,
        manifest: Path) -> None:
    device = make_device(tmp_path / "device", swtpm, server,
                         issuer_anchors=anchors == "issuer_anchors")
    cert = _vendor_provision(device, server, for_own_key=True, serial="V-1")
    proc = run_provision(device, manifest, None, "--adopt", "--cert-nv", hex(NV_INDEX))
    assert proc.returncode == 0, proc.stderr
    rec = json_record(proc)
    assert (rec.outcome, rec.device_serial, rec.idevid_key_action) == ("adopted", "V-1", "adopted")
    assert stored_cert(device) == cert
    assert server.issued() == []


def test_adopting_a_vendor_certificate_for_another_key_fails_and_stores_nothing(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    _vendor_provision(device, server, for_own_key=False, serial="V-2")
    before = tpm_state(device.sim)
    proc = run_provision(device, manifest, None, "--adopt", "--cert-nv", hex(NV_INDEX))
    assert proc.returncode == 6
    rec = json_record(proc)
    assert (rec.error_code, rec.failed_step) == ("IdentityMismatchError", "proving the identity")
    assert stored_cert(device) is None
    assert tpm_state(device.sim) == before


def test_adopt_without_cert_nv_is_a_usage_error_with_a_record(
        device: Device, manifest: Path) -> None:
    proc = run_provision(device, manifest, None, "--cert-nv", hex(NV_INDEX))
    assert proc.returncode == 2
    assert "--cert-nv only goes with --adopt" in (json_record(proc).error or "")
    assert len(read_manifest(manifest)) == 1


def test_json_output_is_exactly_one_object_equal_to_the_manifest_line(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    proc = run_provision(device, manifest, server.secret, "--serial", "SN-J1")
    assert proc.returncode == 0
    assert proc.stdout.count("\n") == 1
    assert json.loads(proc.stdout) == json.loads(manifest.read_text())
    assert proc.stdout == manifest.read_text()


def test_provisioned_idevid_names_this_tpm_in_its_hardware_module_name(
        device: Device, server: RunningEstServer, manifest: Path) -> None:
    """The RFC 4108 hardwareModuleName in the issued IDevID is the one the TPM's own EK
    yields (computed here independently, on a connection of its own)."""
    from tpmid.csr import OID_HARDWARE_MODULE_NAME, hardware_module_name, parse_hardware_module_name
    from tpmid.store import Store
    from tpmid.tpm.connection import PT_MANUFACTURER
    from tpmid.tpm.ek import primary_ek, read_eks

    proc = run_provision(device, manifest, server.secret, "--serial", "HW-0001")
    assert proc.returncode == 0, proc.stderr
    cur = Store(device.store).current("idevid")
    assert cur is not None
    san = cur.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [n.value for n in san if isinstance(n, x509.OtherName)
             and n.type_id.dotted_string == OID_HARDWARE_MODULE_NAME]
    assert len(names) == 1
    with TpmConnection(device.sim.tcti) as tpm:
        ek = primary_ek(read_eks(tpm))
        expected = hardware_module_name(
            ek.cert_der, ek.public_key_der,
            tpm_manufacturer=tpm.properties(PT_MANUFACTURER, 1).get(PT_MANUFACTURER))
    assert parse_hardware_module_name(names[0]) == expected
