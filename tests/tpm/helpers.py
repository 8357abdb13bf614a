"""Helpers shared by the TPM tests (and tests/test_csr.py)."""

from __future__ import annotations

import os
import subprocess

from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection


def transient_objects(sim: Swtpm) -> list[int]:
    """Transient handles loaded in ``sim``, seen through a new connection."""
    with TpmConnection(sim.tcti) as conn:
        return conn.transient_handles()


def run_tool(sim: Swtpm, *args: str, check: bool = True, env: dict[str, str] | None = None,
             stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run tpm2-tools / openssl against ``sim`` (TPM2TOOLS_TCTI and TPM2OPENSSL_TCTI set)."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TPM2TOOLS_TCTI": sim.tcti,
                "TPM2OPENSSL_TCTI": sim.tcti, **(env or {})}
    proc = subprocess.run(list(args), env=full_env, capture_output=True, check=False,
                          input=stdin)
    out = subprocess.CompletedProcess(proc.args, proc.returncode,
                                      proc.stdout.decode(errors="replace"),
                                      proc.stderr.decode(errors="replace"))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{out.stderr}")
    return out
