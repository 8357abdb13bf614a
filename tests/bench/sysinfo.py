"""What the benchmark ran on: machine facts and the versions of everything measured.

Each fact is read from the system the way an operator would check it
(``nproc``, ``/proc/cpuinfo``, ``uname``, ``dpkg-query``, the tools' own
``--version``), so that a number in ``docs/benchmarks.md`` can be reproduced
on the same stack. A fact that cannot be read is reported as ``"unknown"``,
never guessed.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata

UNKNOWN = "unknown"

# Debian packages whose versions the report names (package -> label).
DEBIAN_PACKAGES = {
    "swtpm": "swtpm",
    "libtss2-esys-3.0.2-0": "libtss2 (tpm2-tss)",
    "tpm2-tools": "tpm2-tools",
    "openssl": "openssl",
    "tpm2-openssl": "tpm2-openssl",
    "curl": "curl",
}


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def debian_version(package: str) -> str:
    """The installed version of a Debian package (``dpkg-query``), or ``unknown``."""
    out = _run(["dpkg-query", "-W", "-f=${Version}", package])
    return out or UNKNOWN


def cpu_model() -> str:
    """The first ``model name`` of ``/proc/cpuinfo``, or ``unknown``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or UNKNOWN


def _python_package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return UNKNOWN


@dataclass(frozen=True)
class SystemInfo:
    """Machine, software versions and the time of the run."""

    date: str
    nproc: int
    cpu_model: str
    kernel: str
    os_release: str
    versions: dict[str, str]

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {"date": self.date, "nproc": self.nproc, "cpu_model": self.cpu_model,
                "kernel": self.kernel, "os": self.os_release, "versions": dict(self.versions)}


def _os_release() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return UNKNOWN


def collect() -> SystemInfo:
    """Read the machine facts and versions now."""
    from tpmid import __version__

    versions: dict[str, str] = {
        "python": platform.python_version(),
        "tpmid": __version__,
    }
    for package, label in DEBIAN_PACKAGES.items():
        versions[label] = debian_version(package)
    # The tools' own view, in case a locally built binary shadows the package.
    curl = (_run(["curl", "--version"]).split() or [UNKNOWN])
    tls = next((w for w in curl if w.startswith("OpenSSL/")), "")
    versions["curl (binary)"] = f"{curl[1] if len(curl) > 1 else UNKNOWN} {tls}".strip()
    versions["openssl (binary)"] = (_run(["openssl", "version"]) or UNKNOWN).split(" (")[0]
    versions["tpm2-pytss"] = _python_package("tpm2-pytss")
    versions["cryptography"] = _python_package("cryptography")
    return SystemInfo(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # What `nproc` prints: the CPUs this process may run on.
        nproc=len(os.sched_getaffinity(0)),
        cpu_model=cpu_model(),
        kernel=platform.release(),
        os_release=_os_release(),
        versions=versions,
    )
