"""What the installed package contains: the library, its test support and pytest plugin, no dev tooling."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("tpm2_pytss", "cryptography", "cryptography.x509", "requests", "yaml", "tpmid.server",
         "tpmid.testing.swtpm", "tpmid.testing.estserver")


@pytest.fixture(scope="module")
def wheel_names(tpmid_wheel: Path) -> list[str]:
    with zipfile.ZipFile(tpmid_wheel) as z:
        return z.namelist()


@pytest.fixture(scope="module")
def wheel_metadata(tpmid_wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(tpmid_wheel) as z:
        return {n.rsplit("/", 1)[1]: z.read(n).decode() for n in z.namelist()
                if ".dist-info/" in n and n.endswith(("METADATA", "entry_points.txt"))}


def test_wheel_holds_no_benchmark_or_loopback_code(wheel_names: list[str]) -> None:
    modules = [n for n in wheel_names if n.startswith("tpmid/")]
    assert "tpmid/cli.py" in modules
    assert not [n for n in modules if "bench" in n or "loopback" in n]
    assert not [n for n in wheel_names if n.startswith("tests/")]


def test_wheel_ships_the_documented_test_support(wheel_names: list[str]) -> None:
    assert {"tpmid/testing/swtpm.py", "tpmid/testing/tpmproxy.py", "tpmid/testing/plugin.py",
            "tpmid/testing/estserver.py"} <= set(wheel_names)


def test_wheel_registers_the_pytest_plugin_and_the_testing_extra(
        wheel_metadata: dict[str, str]) -> None:
    entry_points = wheel_metadata["entry_points.txt"]
    assert "[pytest11]\ntpmid = tpmid.testing.plugin" in entry_points
    metadata = wheel_metadata["METADATA"]
    assert "Provides-Extra: testing" in metadata
    assert "Requires-Dist: pytest-xdist>=3; extra == \"testing\"" in metadata


def test_the_installed_plugin_is_the_one_pytest_loads() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "tpmid"]
    assert ep.value == "tpmid.testing.plugin"


@pytest.mark.parametrize("module", ["tpmid.testing", "tpmid.testing.swtpm",
                                    "tpmid.testing.tpmproxy", "tpmid.testing.plugin"])
def test_test_support_imports_nothing_heavy(module: str) -> None:
    heavy = [m for m in HEAVY if m != module]
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert proc.stdout.strip() == "[]"


def test_a_pytest_run_that_uses_no_tpmid_fixture_imports_nothing_heavy(tmp_path: Path) -> None:
    # The entry point loads the plugin into every pytest run where tpmid is installed.
    (tmp_path / "test_other.py").write_text(
        "import sys\n\n"
        "def test_nothing_heavy_was_imported(request):\n"
        "    assert request.config.pluginmanager.hasplugin('tpmid')\n"
        f"    assert [m for m in {HEAVY!r} if m in sys.modules] == []\n"
        "    assert 'swtpm' not in request.fixturenames\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
