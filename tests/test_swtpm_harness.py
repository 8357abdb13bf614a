"""The simulated-TPM harness itself: manufacturing, ports, power cycle."""

from __future__ import annotations

import subprocess
from pathlib import Path

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


SCRIPTS = Path(__file__).resolve().parent.parent / "swtpm"


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_run_on_an_unmanufactured_dir_prints_nothing_on_stdout_and_says_why_on_stderr(
        tmp_path: Path) -> None:
    # So that `tcti=$(swtpm/run DIR)` never captures an error message as a TCTI.
    proc = _script("run", str(tmp_path / "nothing"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "no manufactured TPM" in proc.stderr and "swtpm/manufacture" in proc.stderr


def test_stop_without_a_running_swtpm_fails_on_stderr(tmp_path: Path) -> None:
    proc = _script("stop", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "no swtpm runs" in proc.stderr


def test_manufacture_says_what_it_made_and_run_prints_only_the_tcti(tmp_path: Path) -> None:
    d = tmp_path / "dev1"
    made = _script("manufacture", str(d))
    assert made.returncode == 0, made.stderr
    assert "EK RSA-2048  persistent 0x81010001, certificate in NV 0x01C00002" in made.stdout
    assert "EK ECC P-384 persistent 0x81010016, certificate in NV 0x01C00016" in made.stdout
    assert str(d / "localca" / "issuercert.pem") in made.stdout
    run = _script("run", str(d))
    try:
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("swtpm:host=127.0.0.1,port=") and run.stdout.count("\n") == 1
        assert (d / "tcti").read_text() == run.stdout
    finally:
        stop = _script("stop", str(d))
    assert stop.returncode == 0, stop.stderr
    assert _script("stop", str(d)).returncode == 1
