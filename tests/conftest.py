"""tpmid's own suite runs on tpmid's pytest plugin (:mod:`tpmid.testing.plugin`).

The plugin, loaded through its ``pytest11`` entry point, provides the simulated
TPMs (``tpm_template``, ``swtpm``, ``worker_swtpm``), the counting proxy
(``tpm_proxy``) and the reference EST server (``est_server``,
``est_server_factory``, ``fresh_est_server``): the same fixtures a downstream
project gets (docs/testing.md), so every CI run exercises them. Fixtures that only
tpmid's own tests need live in the conftest of their folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin("tpmid"):
        raise pytest.UsageError(
            "tpmid's pytest plugin is not loaded (entry point pytest11 'tpmid'): "
            "run scripts/setup, which installs the project into .venv")
    missing = [t for t in ("swtpm", "swtpm_setup", "tpm2_readpublic", "openssl") if not shutil.which(t)]
    if missing:
        raise pytest.UsageError(
            f"missing tools {', '.join(missing)}: run scripts/test (it installs them)"
        )


ROOT = Path(__file__).resolve().parent.parent
# What a wheel is built from: a copy, so that concurrent builds (xdist workers, the
# Debian package test) never share setuptools' build/ directory in the checkout.
WHEEL_SOURCES = ("tpmid", "pyproject.toml", "README.md")


def build_wheel(out: Path, python: str = sys.executable) -> Path:
    """Build tpmid's wheel from a copy of the checkout's sources into ``out``; return it."""
    src = out / "src"
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run(
        [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = out.glob("tpmid-*.whl")
    return wheel


@pytest.fixture(scope="session")
def tpmid_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tpmid's wheel, built once per worker from this checkout."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))
