"""The simulated-TPM harness itself: manufacturing, ports, power cycle."""

from __future__ import annotations

import subprocess

from tpmid.testing.swtpm import Swtpm


def _tools(sim: Swtpm, *args: str) -> str:
    return subprocess.run(
        list(args), env={"TPM2TOOLS_TCTI": sim.tcti, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    ).stdout


def test_manufactured_tpm_has_persistent_eks_and_ek_certificates(swtpm: Swtpm) -> None:
    handles = _tools(swtpm, "tpm2_getcap", "handles-persistent")
    assert "0x81010001" in handles and "0x81010016" in handles
    nv = _tools(swtpm, "tpm2_getcap", "handles-nv-index").lower()
    assert "0x1c00002" in nv and "0x1c00016" in nv
    assert (swtpm.ca_dir / "issuercert.pem").exists()


def test_each_fresh_tpm_gets_its_own_ports(swtpm: Swtpm, tpm_template, tmp_path) -> None:
    from tpmid.testing.swtpm import copy_state

    with Swtpm(copy_state(tpm_template, tmp_path / "second")).start() as other:
        assert {other.port, other.ctrl_port}.isdisjoint({swtpm.port, swtpm.ctrl_port})


def test_power_cycle_requires_startup_again(swtpm: Swtpm) -> None:
    _tools(swtpm, "tpm2_getrandom", "--hex", "4")
    swtpm.power_cycle()
    proc = subprocess.run(
        ["tpm2_getrandom", "--hex", "4"], env={"TPM2TOOLS_TCTI": swtpm.tcti, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode != 0 and "0x100" in proc.stderr
    _tools(swtpm, "tpm2_startup", "-c")
    assert len(_tools(swtpm, "tpm2_getrandom", "--hex", "4").strip()) == 8
