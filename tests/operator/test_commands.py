"""Conventions operators bring from certbot, step and iotedge (issue 11).

`tpmid renew` without NAME renews what is due, in dependency order; `--dry-run`
says what would happen without the TPM, the store or the server; `tpmid check`
on a device that was never provisioned sends the operator to `tpmid provision`.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from tests.faults.conftest import IDEVID_HANDLE, Field
from tpmid.tpm.connection import TpmConnection


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def test_renew_without_a_name_renews_what_is_due_in_dependency_order(field: Field) -> None:
    field.server.configure("ldevid", lifetime="8s")
    field.edit(lambda d: d["identities"]["ldevid"].update(renew={"threshold": "60%"}))
    assert field.cli("renew", "ldevid", "--force")[0] == 0  # a certificate due in ~5 s
    versions = {n: field.current(n).version for n in ("ldevid", "edge-ca")}
    time.sleep(5.5)  # past 60 % and the 5 s minimum gap between renewals
    rc, out, err = field.cli("renew")
    assert rc == 0, err
    assert field.current("ldevid").version != versions["ldevid"]
    assert field.current("edge-ca").version == versions["edge-ca"]
    assert "renewed ldevid" in out and "edge-ca: next renewal" in out and "not due" in out

    issued = len(field.server.issued())
    rc, out, err = field.cli("renew", "--force", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["identity"] for r in rows] == ["ldevid", "edge-ca"]  # the LDevID first
    assert all(r["renewed"] for r in rows)
    assert [r["label"] for r in field.server.issued()[issued:]] == ["ldevid", "edgeca"]


def test_renew_dry_run_touches_neither_tpm_nor_store_nor_server(field: Field) -> None:
    before = _tree(field.store_dir)
    issued = len(field.server.issued())
    field.sim.stop()  # a dry run must not need the TPM
    rc, out, err = field.cli("renew", "--dry-run", "--force")
    assert rc == 0, err
    assert "ldevid: would renew now via simplereenroll (authenticated with the current " \
           "certificate)" in out
    assert "edge-ca: would renew now via simpleenroll (a CA certificate renews with " \
           "simpleenroll, authenticated by ldevid)" in out
    rc, out, _ = field.cli("renew", "--dry-run")
    assert rc == 0 and "ldevid: not due" in out
    assert _tree(field.store_dir) == before
    assert len(field.server.issued()) == issued


def test_check_on_a_device_never_provisioned_points_at_tpmid_provision(
        field_device: Field) -> None:
    with TpmConnection(field_device.sim.tcti) as tpm:
        tpm.evict(IDEVID_HANDLE)  # a factory-fresh TPM
    rc, out, _ = field_device.cli("check", "--no-est")
    assert rc == 1
    assert "idevid: key: persistent H-2 at 0x81020000: no key and no certificate: the " \
           "device has not been provisioned" in out
    hints = [line for line in out.splitlines() if "hint:" in line]
    assert hints and all("TPM2_Clear" not in h for h in hints)
    assert any("tpmid provision" in h for h in hints)
    assert not any(marker in h for h in hints for marker in ("NAME", "<", ">"))


def test_a_retry_checks_the_server_before_it_makes_a_new_tpm_key(
        field: Field, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tpmid")
    with socket.socket() as s:  # a port nobody listens on: the server is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # est.csrattrs: ignore, so the first attempt makes its key before it meets the dead
    # server (under follow it already stops at /csrattrs, before any TPM work).
    field.edit(lambda d: d["identities"]["ldevid"]["est"].update(
        url=f"https://127.0.0.1:{port}/.well-known/est/ldevid", csrattrs="ignore"))
    assert field.cli("renew", "ldevid", "--force")[0] == 4  # first attempt: a key, then down
    assert field.cli("renew", "ldevid", "--force")[0] == 4  # the retry: checked first
    assert caplog.text.count("created a new ecc-p256 key in the TPM") == 1
    assert "checking that https://127.0.0.1" in caplog.text
