"""What the installed package contains: the library and its test support, no dev tooling."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = out.glob("tpmid-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_holds_no_benchmark_or_loopback_code(wheel_names: list[str]) -> None:
    modules = [n for n in wheel_names if n.startswith("tpmid/")]
    assert "tpmid/cli.py" in modules
    assert not [n for n in modules if "bench" in n or "loopback" in n]
    assert not [n for n in wheel_names if n.startswith("tests/")]


def test_wheel_ships_the_documented_test_support(wheel_names: list[str]) -> None:
    assert {"tpmid/testing/swtpm.py", "tpmid/testing/tpmproxy.py"} <= set(wheel_names)


@pytest.mark.parametrize("module", ["tpmid.testing", "tpmid.testing.swtpm",
                                    "tpmid.testing.tpmproxy"])
def test_test_support_imports_nothing_heavy(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('tpm2_pytss', 'cryptography', 'requests', 'yaml') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert proc.stdout.strip() == "[]"
