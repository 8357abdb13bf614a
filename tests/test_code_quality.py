"""The house rules that tools can check: typed (mypy) and linted (ruff)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def test_library_is_mypy_clean() -> None:
    proc = _run("mypy", "tpmid")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_code_and_tests_are_ruff_clean() -> None:
    proc = _run("ruff", "check", "tpmid", "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
