"""Helpers of scripts/package (standard library only; run with Debian's /usr/bin/python3).

  prune VENV PREFIX               leave tpmid's test support and pytest plugin out of a venv
  copyright VENV PREFIX YEARS OUT /usr/share/doc/tpmid/copyright: tpmid and what its venv bundles
  changelog VERSION MAINT OUT     changelog.gz of this native package (gzip -9n)
  manpage HELPFILE VERSION OUT    tpmid.1.gz from `tpmid --help`
"""

from __future__ import annotations

import csv
import email.parser
import email.utils
import gzip
import io
import os
import shutil
import sys
import time
from pathlib import Path

NOT_SHIPPED = "tpmid/testing/"  # test support: tpmid[testing] from PyPI, never on a device


def _site_packages(venv: Path) -> Path:
    (sp,) = venv.glob("lib/python3*/site-packages")
    return sp


def prune(venv: Path, prefix: str) -> None:
    """Remove tpmid.testing, its pytest11 entry point and their RECORD lines; no byte-code.

    Also ``direct_url.json`` (PEP 610), which names the build's temporary wheel file.
    """
    sp = _site_packages(venv)
    shutil.rmtree(sp / NOT_SHIPPED, ignore_errors=True)
    (dist,) = sp.glob("tpmid-*.dist-info")
    (dist / "direct_url.json").unlink(missing_ok=True)
    eps = dist / "entry_points.txt"
    if eps.exists():
        sections, keep = [], True
        for line in eps.read_text().splitlines():
            if line.startswith("["):
                keep = line.strip() != "[pytest11]"
            if keep:
                sections.append(line)
        eps.write_text("\n".join(sections).strip() + "\n")
    record = dist / "RECORD"
    rows = [r for r in csv.reader(record.read_text().splitlines())
            if r and not r[0].startswith(NOT_SHIPPED) and not r[0].endswith("/direct_url.json")]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(
        [r[0], "", ""] if r[0].endswith(("RECORD", "entry_points.txt")) else r for r in rows)
    record.write_text(out.getvalue())
    for cache in list(venv.rglob("__pycache__")):
        shutil.rmtree(cache)
    # A device runs tpmid and its Python; not pip, activate scripts or the
    # dependencies' own command-line tools.
    bin_dir = venv / "bin"
    for entry in bin_dir.iterdir():
        if entry.name != "tpmid" and not entry.name.startswith("python"):
            entry.unlink()
        elif entry.is_symlink() and os.readlink(entry).startswith("/"):
            # bin/python3.11 -> /usr/bin/python3.11, made relative (Debian policy 10.5).
            target = os.readlink(entry)
            entry.unlink()
            entry.symlink_to(os.path.relpath(target, f"{prefix}/bin"))


def copyright(venv: Path, prefix: str, years: str, out: Path) -> None:
    """A copyright file naming tpmid's licence and every bundled distribution's."""
    lines = [
        "tpmid: hardware-backed TPM 2.0 device identities (IDevID, LDevID, Edge CA) over EST",
        "",
        f"Copyright {years} the tpmid authors",
        "",
        "tpmid is licensed under the Apache License, Version 2.0.",
        "On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.",
        "",
        "The package bundles tpmid's Python dependencies in its private virtual",
        f"environment ({prefix}); each keeps its licence",
        "files in its .dist-info directory there. Bundled distributions:",
        "",
    ]
    parser = email.parser.HeaderParser()
    for dist in sorted(_site_packages(venv).glob("*.dist-info")):
        meta = parser.parsestr((dist / "METADATA").read_text(errors="replace"))
        licence = (meta.get("License-Expression") or "").strip()
        if not licence:
            classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                           if c.startswith("License ::")]
            first = (meta.get("License") or "").strip().splitlines()
            licence = ", ".join(classifiers) or (first[0][:80] if first else "see its licence files")
        lines.append(f"  {meta['Name']} {meta['Version']}: {licence}")
    out.write_text("\n".join(lines) + "\n")


def changelog(version: str, maintainer: str, out: Path) -> None:
    """A one-entry Debian changelog for a package built from a checkout."""
    date = email.utils.formatdate(time.time(), localtime=False)
    text = (f"tpmid ({version}) unstable; urgency=medium\n\n"
            f"  * Built by scripts/package from the tpmid source tree.\n\n"
            f" -- {maintainer}  {date}\n")
    _gzip(text.encode(), out)


def manpage(help_file: Path, version: str, out: Path) -> None:
    """tpmid(1): the synopsis and the command list of ``tpmid --help``."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("-", "\\-").replace("'", "\\(aq")

    text = help_file.read_text()
    roff = [
        f'.TH TPMID 1 "" "tpmid {version}" "User Commands"',
        ".SH NAME",
        "tpmid \\- TPM 2.0 device identities (IDevID, LDevID, Edge CA) enrolled over EST",
        ".SH SYNOPSIS",
        ".B tpmid",
        "[\\fIglobal options\\fR] \\fICOMMAND\\fR ... [\\fIglobal options\\fR]",
        ".SH DESCRIPTION",
        "Every private key stays inside the TPM. The options and commands below are the",
        "output of \\fBtpmid \\-\\-help\\fR; every command has its own \\fB\\-\\-help\\fR.",
        ".PP",
        ".nf",
        *(esc(line) for line in text.splitlines()),
        ".fi",
        ".SH FILES",
        "/etc/tpmid/config.yaml, /var/lib/tpmid, /lib/systemd/system/tpmid.service",
        ".SH SEE ALSO",
        "/usr/share/doc/tpmid/cli.md, /usr/share/doc/tpmid/field-operation.md",
    ]
    _gzip(("\n".join(roff) + "\n").encode(), out)


def _gzip(data: bytes, out: Path) -> None:
    # -9n: no name or time stamp in the header, so the file is reproducible.
    with open(out, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0,
                                             compresslevel=9) as gz:
        gz.write(data)


def main(argv: list[str]) -> int:
    cmd, *args = argv
    if cmd == "prune":
        prune(Path(args[0]), args[1])
    elif cmd == "copyright":
        copyright(Path(args[0]), args[1], args[2], Path(args[3]))
    elif cmd == "changelog":
        changelog(args[0], args[1], Path(args[2]))
    elif cmd == "manpage":
        manpage(Path(args[0]), args[1], Path(args[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
