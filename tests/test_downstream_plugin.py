"""The pytest plugin outside this tree: docs/testing.md's example, run as another project would.

tpmid's wheel is built from this checkout and installed with the ``testing`` extra
into a fresh virtual environment (dependencies from the package index, through
pip's cache); the example test file is copied out of docs/testing.md into an
empty project and run there with pytest and pytest-xdist. It starts a swtpm and a
reference EST server through the plugin and enrolls an LDevID.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"
_EXAMPLE = re.compile(r"<!-- downstream-example: (?P<path>\S+) -->\n```python\n(?P<code>.*?)```",
                      re.DOTALL)


def example() -> tuple[str, str]:
    """(path, code) of the example file in docs/testing.md."""
    m = _EXAMPLE.search(DOC.read_text())
    assert m, "docs/testing.md lost its <!-- downstream-example: PATH --> python block"
    return m.group("path"), m.group("code")


def test_the_documented_example_is_a_complete_test_file() -> None:
    path, code = example()
    assert path.startswith("tests/test_") and path.endswith(".py")
    compile(code, path, "exec")
    assert "def test_" in code and "est_server_factory" in code and "tpm_proxy" in code


@pytest.mark.slow
def test_the_documented_example_passes_in_a_fresh_venv_with_the_wheel_and_testing_extra(
        tpmid_wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8"}
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CACHE_DIR",
                 "PIP_CONFIG_FILE", "XDG_CACHE_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    install = subprocess.run(
        [python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
         f"tpmid[testing] @ {tpmid_wheel.as_uri()}"],
        capture_output=True, text=True, env=env, timeout=900, check=False)
    assert install.returncode == 0, install.stdout + install.stderr

    project = tmp_path / "downstream"
    path, code = example()
    (project / path).parent.mkdir(parents=True)
    (project / path).write_text(code)
    (project / "pytest.ini").write_text("[pytest]\n")
    where = subprocess.run([python, "-c", "import tpmid; print(tpmid.__file__)"],
                           capture_output=True, text=True, env=env, cwd=project, check=True)
    assert where.stdout.startswith(str(venv)), "tpmid must come from the wheel, not the checkout"

    run = subprocess.run([python, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, env=env, cwd=project, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert "2 passed" in run.stdout
