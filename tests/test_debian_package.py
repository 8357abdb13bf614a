"""The Debian package for devices (``scripts/package``), checked without touching the host.

The package is built once per test session (the first xdist worker builds, the
others wait for it). Its archive is inspected with ``dpkg-deb -c/-I/-e/-x`` in
temporary directories; the extracted ``/usr/bin/tpmid`` runs inside a private mount
namespace where ``/usr/lib/tpmid`` is the extracted tree; and the package is
installed, reinstalled and purged with ``dpkg`` inside a throwaway root: an overlay of
``/`` whose writes go to a temporary directory, entered with ``chroot`` in a mount
namespace of its own (its maintainer scripts create the ``tpmid`` user there, in the
overlay's ``/etc/passwd``, never the host's).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tpmid.testing.swtpm import Swtpm

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/usr/lib/tpmid"
TOOLS = ("dpkg-deb", "dpkg-shlibdeps", "lintian", "unshare", "chroot", "systemd-analyze")

pytestmark = pytest.mark.slow


def _namespace_problem() -> str | None:
    """Why this host cannot run the isolated steps (None: it can)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (scripts/setup installs them)"
    if os.geteuid() != 0:
        return "installing into a throwaway root needs root (chroot, overlay mounts)"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"mount namespaces are not permitted here: {probe.stderr.strip()}"
    return None


PROBLEM = _namespace_problem()
needs_namespaces = pytest.mark.skipif(PROBLEM is not None, reason=f"Debian package: {PROBLEM}")


@dataclass(frozen=True)
class Package:
    deb: Path
    lintian: Path


def _shared_dir(tmp_path_factory: pytest.TempPathFactory, config: pytest.Config) -> Path:
    """A directory all xdist workers of this session share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Package:
    """``scripts/package`` run once for the whole session."""
    if PROBLEM is not None:
        pytest.skip(f"Debian package: {PROBLEM}")
    shared = _shared_dir(tmp_path_factory, pytestconfig)
    out = shared / "debian-package"
    with open(shared / "debian-package.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failed = out / "FAILED"
        if failed.exists():
            pytest.fail(f"scripts/package failed (in another worker):\n{failed.read_text()}")
        if not list(out.glob("tpmid_*.deb")):
            proc = subprocess.run([str(ROOT / "scripts" / "package"), "--out", str(out)],
                                  capture_output=True, text=True, timeout=1200, check=False)
            if proc.returncode != 0:
                out.mkdir(parents=True, exist_ok=True)
                failed.write_text(proc.stderr[-6000:])
                pytest.fail(f"scripts/package failed:\n{proc.stderr[-6000:]}")
    (deb,) = out.glob("tpmid_*.deb")
    return Package(deb, deb.with_suffix(".lintian.txt"))


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True).stdout


@dataclass(frozen=True)
class Entry:
    mode: str
    owner: str
    target: str | None


@pytest.fixture(scope="module")
def contents(package: Package) -> dict[str, Entry]:
    """``dpkg-deb -c``: path -> mode, owner, symlink target."""
    out: dict[str, Entry] = {}
    for line in dpkg_deb("-c", str(package.deb)).splitlines():
        mode, owner, _size, _date, _time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        out[path.removeprefix("./").rstrip("/") or "/"] = Entry(mode, owner, target or None)
    return out


@pytest.fixture(scope="module")
def control(package: Package) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in dpkg_deb("-f", str(package.deb)).splitlines():
        if not line.startswith(" "):
            key, _, value = line.partition(": ")
            fields[key] = value
    return fields


@pytest.fixture(scope="module")
def scripts(package: Package, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The control archive (maintainer scripts, conffiles) extracted with ``dpkg-deb -e``."""
    d = tmp_path_factory.mktemp("control")
    subprocess.run(["dpkg-deb", "-e", str(package.deb), str(d / "DEBIAN")], check=True)
    return d / "DEBIAN"


# --------------------------------------------------------------------------- the archive


def test_lintian_reports_no_errors(package: Package) -> None:
    report = package.lintian.read_text()
    assert not [line for line in report.splitlines() if line.startswith("E: ")], report


def test_depends_come_from_shlibdeps_and_swtpm_is_only_suggested(control: dict[str, str]) -> None:
    depends = [d.strip().split()[0] for d in control["Depends"].split(",")]
    assert {"adduser", "tpm-udev", "libc6", "libtss2-esys-3.0.2-0", "libtss2-tctildr0"} <= set(depends)
    assert any(re.fullmatch(r"python3\.\d+", d) for d in depends)
    assert not [d for d in depends if "swtpm" in d or "pytest" in d]
    assert "swtpm" in control["Suggests"]
    # PKCS#11 access (IoT Edge) is optional: recommended, never a dependency.
    assert [r.strip() for r in control["Recommends"].split(",")] == [
        "libtpm2-pkcs11-1", "libtpm2-pkcs11-tools"]
    assert not [d for d in depends if "pkcs11" in d]
    assert control["Package"] == "tpmid" and control["Architecture"] != "all"


EXPECTED = {
    # path: (mode, owner, symlink target)
    "usr/bin/tpmid": ("lrwxrwxrwx", "root/root", "../lib/tpmid/bin/tpmid"),
    "usr/lib/tpmid/bin/tpmid": ("-rwxr-xr-x", "root/root", None),
    "usr/lib/tpmid/pyvenv.cfg": ("-rw-r--r--", "root/root", None),
    "lib/systemd/system/tpmid.service": ("-rw-r--r--", "root/root", None),
    "etc/tpmid": ("drwxr-x---", "root/root", None),  # root:tpmid once postinst ran
    "etc/tpmid/config.yaml.example": ("-rw-r--r--", "root/root", None),
    "var/lib/tpmid": ("drwx------", "root/root", None),  # tpmid:tpmid once postinst ran
    "usr/share/doc/tpmid/copyright": ("-rw-r--r--", "root/root", None),
    "usr/share/doc/tpmid/changelog.gz": ("-rw-r--r--", "root/root", None),
    "usr/share/doc/tpmid/field-operation.md": ("-rw-r--r--", "root/root", None),
    "usr/share/doc/tpmid/README.md": ("-rw-r--r--", "root/root", None),
    "usr/share/man/man1/tpmid.1.gz": ("-rw-r--r--", "root/root", None),
}


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_layout_modes_and_owners(contents: dict[str, Entry], path: str) -> None:
    entry = contents.get(path)
    assert entry is not None, f"{path} is not in the package"
    assert (entry.mode, entry.owner, entry.target) == EXPECTED[path]


def test_nothing_is_writable_by_others_and_everything_is_root_owned(
        contents: dict[str, Entry]) -> None:
    assert {e.owner for e in contents.values()} == {"root/root"}
    assert not [p for p, e in contents.items() if e.target is None and e.mode[8] == "w"]
    assert not [p for p, e in contents.items() if e.target is None and e.mode[5] == "w"]


def test_no_test_support_benchmarks_pip_or_bytecode(contents: dict[str, Entry]) -> None:
    site = [p for p in contents if "/site-packages/" in p]
    assert any(p.endswith("site-packages/tpmid/cli.py") for p in site)
    assert any(p.endswith("site-packages/tpmid/server/lab.py") for p in site)
    unwanted = [p for p in contents if "/tpmid/testing" in p or "/tests/" in p.replace(
        "site-packages/certifi/tests", "") or "bench" in p or "/pip/" in p or "__pycache__" in p
        or p.endswith(".pyc") or "site-packages/pytest" in p or "/setuptools/" in p]
    assert unwanted == []


def test_the_unit_names_what_the_package_installs(package: Package, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(package.deb), str(tmp_path)], check=True)
    unit = (tmp_path / "lib/systemd/system/tpmid.service").read_text()
    assert "ExecStart=/usr/bin/tpmid --config /etc/tpmid/config.yaml daemon" in unit
    assert "Documentation=file:///usr/share/doc/tpmid/field-operation.md" in unit
    assert "StateDirectory=tpmid" in unit and "StateDirectoryMode=0700" in unit
    for path in ("usr/bin/tpmid", "usr/share/doc/tpmid/field-operation.md"):
        assert (tmp_path / path).exists(), path
    entry_points = next(tmp_path.glob("usr/lib/tpmid/lib/python3*/site-packages/"
                                      "tpmid-*.dist-info/entry_points.txt")).read_text()
    assert "pytest11" not in entry_points and "tpmid = tpmid.cli:main" in entry_points


def test_maintainer_scripts(scripts: Path) -> None:
    assert (scripts / "conffiles").read_text().split() == ["/etc/tpmid/config.yaml.example"]
    for name in ("postinst", "prerm", "postrm"):
        path = scripts / name
        assert os.access(path, os.X_OK), name
        subprocess.run(["sh", "-n", str(path)], check=True)
        assert "@PREFIX@" not in path.read_text()
    postinst = (scripts / "postinst").read_text()
    assert "adduser --system --group --home /var/lib/tpmid" in postinst
    assert "getent passwd tpmid" in postinst  # idempotent
    assert "adduser --quiet tpmid tss" in postinst
    assert "deluser" not in (scripts / "postrm").read_text()  # the user is kept on purge


# --------------------------------------------------------------------------- running it


def _in_namespace(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "-m", "/bin/sh", "-euc", script],
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
                          capture_output=True, text=True, timeout=600, check=False)


@needs_namespaces
def test_the_extracted_tpmid_runs_from_its_final_path(package: Package, tmp_path: Path) -> None:
    x = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(package.deb), str(x)], check=True)
    # /usr/lib/tpmid exists only in this namespace: an overlay of /usr/lib (writes to
    # tmp_path) gives it a mount point, and the extracted venv is bound there.
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    proc = _in_namespace(
        'mount -t overlay overlay -o "lowerdir=/usr/lib,upperdir=$T/upper,workdir=$T/work" /usr/lib\n'
        'mkdir -p /usr/lib/tpmid && mount --bind "$T/x/usr/lib/tpmid" /usr/lib/tpmid\n'
        '"$T/x/usr/bin/tpmid" --version\n', T=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("tpmid ")


@pytest.fixture
def throwaway_root(tmp_path: Path) -> Iterator[Path]:
    """Directories for an overlay of / (the host's root stays untouched)."""
    for d in ("upper", "work", "root"):
        (tmp_path / d).mkdir()
    yield tmp_path


ROOT_SCRIPT = r"""
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/upper,workdir=$T/work" "$T/root"
mount -t proc proc "$T/root/proc"
mount --bind /dev "$T/root/dev"
mount -t tmpfs tmpfs "$T/root/run"        # no host systemd or sockets in there
mount -t tmpfs tmpfs "$T/root/tmp"
cp "$DEB" "$T/root/tmp/tpmid.deb"
chroot "$T/root" /bin/sh -euc '
    if getent passwd tpmid >/dev/null; then echo "tpmid user before install"; exit 1; fi
    dpkg -i /tmp/tpmid.deb >/dev/null
    echo "version: $(tpmid --version)"
    echo "user: $(id -nG tpmid)"
    echo "modes: $(stat -c "%a %U:%G" /var/lib/tpmid) $(stat -c "%a %U:%G" /etc/tpmid)"
    echo "bytecode: $(find /usr/lib/tpmid -name "*.pyc" | wc -l)"
    systemd-analyze verify --man=no /lib/systemd/system/tpmid.service
    echo "verify: $?"
    install -o root -g tpmid -m 0640 /etc/tpmid/config.yaml.example /etc/tpmid/config.yaml
    runuser -u tpmid -- tpmid status --json > /tmp/status.json && echo "status: ok"
    runuser -u tpmid -- tpmid --tcti "$TCTI" tpm ek --json > /tmp/ek.json && echo "tpm: ok"
    dpkg -i /tmp/tpmid.deb >/dev/null && echo "reinstall: ok"
    echo "users: $(getent passwd tpmid | wc -l)"
    touch /var/lib/tpmid/identity-data
    dpkg --purge tpmid >/dev/null
    yn() { if test -e "$1"; then echo yes; else echo no; fi; }
    echo "after purge: user=$(getent passwd tpmid | cut -d: -f1) bin=$(yn /usr/bin/tpmid)" \
         "venv=$(yn /usr/lib/tpmid) store=$(ls /var/lib/tpmid)" \
         "example=$(yn /etc/tpmid/config.yaml.example)"
'
cp "$T/root/tmp/status.json" "$T/root/tmp/ek.json" "$T/" 2>/dev/null || true
"""


@needs_namespaces
def test_install_reinstall_and_purge_in_a_throwaway_root(
        package: Package, throwaway_root: Path, swtpm: Swtpm) -> None:
    passwd_before = Path("/etc/passwd").read_text()
    proc = _in_namespace(ROOT_SCRIPT, T=str(throwaway_root), DEB=str(package.deb),
                         TCTI=swtpm.tcti)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert lines["version"].startswith("tpmid ")
    assert "tss" in lines["user"].split()
    assert lines["modes"] == "700 tpmid:tpmid 750 root:tpmid"
    assert int(lines["bytecode"]) > 100  # compiled by postinst
    assert lines["verify"] == "0"
    assert lines["status"] == "ok" and lines["tpm"] == "ok" and lines["reinstall"] == "ok"
    assert lines["users"] == "1"  # the second postinst added no second user
    assert lines["after purge"] == ("user=tpmid bin=no venv=no store=identity-data "
                                    "example=no")
    ek = json.loads((throwaway_root / "ek.json").read_text())
    assert ek["device_fingerprint"]
    # The host never saw any of it.
    assert Path("/etc/passwd").read_text() == passwd_before
    assert not Path(PREFIX).exists()
