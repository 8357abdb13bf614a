"""``docs/tpmid.service``: the systemd unit has the required settings and passes ``systemd-analyze``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "docs" / "tpmid.service"

REQUIRED = {
    ("Service", "Type"): "notify",
    ("Service", "ExecStart"): "/usr/bin/tpmid --config /etc/tpmid/config.yaml daemon",
    ("Service", "ExecReload"): "/bin/kill -HUP $MAINPID",
    ("Service", "Restart"): "on-failure",
    ("Service", "User"): "tpmid",
    ("Service", "SupplementaryGroups"): "tss",
    ("Service", "ProtectSystem"): "strict",
    ("Service", "ReadWritePaths"): "/var/lib/tpmid",
    ("Service", "NoNewPrivileges"): "yes",
    ("Service", "PrivateTmp"): "yes",
    ("Service", "ProtectHome"): "yes",
    ("Service", "RestrictAddressFamilies"): "AF_UNIX AF_INET AF_INET6",
    ("Service", "DeviceAllow"): "/dev/tpmrm0 rw",
    ("Service", "CapabilityBoundingSet"): "",
    ("Install", "WantedBy"): "multi-user.target",
}


def parse_unit(text: str) -> dict[tuple[str, str], list[str]]:
    """systemd's unit syntax: sections, ``Key=value`` lines, ``#``/``;`` comments, repeats kept."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        assert "=" in line, f"not a Key=value line: {raw!r}"
        assert not line.endswith("\\"), "no continuation lines, keep it greppable"
        key, value = line.split("=", 1)
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


@pytest.mark.parametrize(("where", "value"), REQUIRED.items(),
                         ids=[f"{s}.{k}" for s, k in REQUIRED])
def test_unit_sets_the_required_value(where: tuple[str, str], value: str) -> None:
    settings = parse_unit(UNIT.read_text())
    assert settings.get(where) == [value], f"{where}: {settings.get(where)}"


def test_unit_never_grants_private_devices_or_capabilities_that_would_defeat_the_sandbox() -> None:
    settings = parse_unit(UNIT.read_text())
    # PrivateDevices=yes would hide /dev/tpmrm0; ambient capabilities would undo
    # the empty bounding set.
    assert ("Service", "PrivateDevices") not in settings
    assert settings.get(("Service", "AmbientCapabilities"), [""]) == [""]
    assert settings[("Service", "DevicePolicy")] == ["closed"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on a copy whose ExecStart names this checkout's real
    ``tpmid`` entry point (``/usr/bin/tpmid`` is not installed here; verify insists
    that the program exists)."""
    tpmid = Path(sys.executable).with_name("tpmid")
    assert tpmid.exists(), "the project's console script is missing from the venv"
    copy = tmp_path / "tpmid.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/tpmid", str(tpmid)))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60, check=False)
    about_unit = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if "tpmid.service" in line]
    assert proc.returncode == 0, proc.stderr
    assert about_unit == [], "\n".join(about_unit)
