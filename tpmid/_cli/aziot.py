"""``tpmid aziot import`` and ``tpmid aziot export``: Azure IoT Edge's config.toml and tpmid's."""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.errors import ConfigError

if TYPE_CHECKING:
    from tpmid.aziot import ImportResult
    from tpmid.lifecycle.aziot import Export

EXIT_NOT_MAPPED = 1
DEFAULT_EXPORT = Path("/etc/tpmid/aziot-config.toml")
EXPORT_MARK = "# Written by `tpmid aziot export`"
IMPORT_MARK = "# Written by `tpmid aziot import`"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "aziot", help="Azure IoT Edge: import its EST config, export its config for tpmid's keys",
        description="Move an Azure IoT Edge device from IoT Edge's own EST client to tpmid "
        "(import) and make IoT Edge use tpmid's LDevID and Edge CA through PKCS#11 (export). "
        "See docs/iot-edge.md.")
    s = p.add_subparsers(dest="aziot_command", metavar="SUBCOMMAND", required=True)

    im = s.add_parser(
        "import", help="a tpmid config from IoT Edge's config.toml, with a report on every key",
        description="Read IoT Edge's config.toml (its [cert_issuance.est], "
        "[provisioning.attestation.identity_cert] and [edge_ca] EST settings, [aziot_keys], "
        "[tpm]) and write the tpmid config that enrolls the same identities with TPM keys. "
        "Every key of the file is reported as mapped (to what) or not mapped (why, and what to "
        "do instead). Secrets are never copied: the config names files for them. Exit 0 when "
        "everything was mapped, 1 when something was not, 2 for a file that is not valid TOML.")
    im.add_argument("toml", metavar="CONFIG.toml", help="IoT Edge's config "
                    "(usually /etc/aziot/config.toml)")
    im.add_argument("--out", "-o", metavar="FILE",
                    help="write the tpmid config to FILE (mode 0600; the report goes to stdout). "
                    "Default: the config on stdout, the report on stderr")
    im.add_argument("--force", action="store_true",
                    help="replace FILE even if it exists")
    im.add_argument("--serial", metavar="S",
                    help="device serial number: the serialNumber of every identity's subject "
                    "(as in the IDevID's; EST servers may bind subjects to it)")
    im.add_argument("--store", metavar="DIR",
                    help="store.dir of the new config (default: /var/lib/tpmid)")
    im.add_argument("--secrets-dir", metavar="DIR",
                    help="where the config expects the EST password and the PKCS#11 PINs, one "
                    "0600 file each (default: /etc/tpmid)")
    im.add_argument("--no-pkcs11", action="store_true",
                    help="leave out the pkcs11 section (then IoT Edge cannot use the keys)")
    add_json_flag(im)
    im.set_defaults(func=cmd_import)

    ex = s.add_parser(
        "export", help="the IoT Edge config.toml fragment that uses tpmid's identities",
        description="Write the [provisioning.attestation] (method x509, identity_cert = the "
        "LDevID's fullchain.pem, identity_pk = its PKCS#11 URI), [edge_ca] (cert, pk) and "
        "[aziot_keys] (pkcs11_lib_path, pkcs11_base_slot) that make IoT Edge use the "
        "identities tpmid keeps instead of its own EST client. Checks that every file and "
        "URI it names exists and that the token is in step. The URIs carry the token's user "
        "PIN (pin-value), so the file is written with mode 0600.")
    ex.add_argument("--out", "-o", metavar="FILE",
                    help=f"where to write the fragment (default: {DEFAULT_EXPORT}; '-' for "
                    "stdout). A file not written by this command is not replaced without --force")
    ex.add_argument("--force", action="store_true",
                    help="replace FILE even if this command did not write it")
    ex.add_argument("--ldevid", metavar="NAME",
                    help="the identity IoT Edge authenticates with (default: the one linked "
                    "identity with profile device)")
    ex.add_argument("--edge-ca", metavar="NAME",
                    help="the Edge CA identity (default: the one linked identity with "
                    "profile ca, if any)")
    ex.add_argument("--registration-id", metavar="ID",
                    help="DPS registration id (default: the LDevID's common name)")
    add_json_flag(ex)
    ex.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------- import


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist",
                          hint="give the path of IoT Edge's config (usually "
                          "/etc/aziot/config.toml)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text, so not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None


def _refuse_overwrite(path: Path, force: bool, *, own_mark: str | None = None) -> None:
    """An existing file is kept unless --force, or it starts with ``own_mark`` (ours)."""
    if force or not path.exists():
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        first = ""
    if own_mark is None or not first.startswith(own_mark):
        raise ConfigError(f"{path} exists; it is left as it is",
                          hint="choose another --out, or add --force to replace it")


def _write_private(path: Path, text: str) -> None:
    from tpmid.store.fsio import atomic_write

    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: {path.parent} does not exist")
    atomic_write(path, text.encode(), 0o600)


def _owner(path: Path) -> str:
    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _import_report(r: ImportResult, source: str) -> str:
    lines = [f"IoT Edge config {source}:"]

    def where(line: int | None) -> str:
        return f"line {line}" if line is not None else "-"

    mapped = [f for f in r.findings if f.status == "mapped"]
    if mapped:
        lines.append("mapped:")
        lines += [f"  {where(f.line):>8}  {f.key} -> {f.detail}" for f in mapped]
    missing = r.not_mapped()
    if missing:
        lines.append("NOT MAPPED:")
        for f in missing:
            lines.append(f"  {where(f.line):>8}  {f.key}: {f.detail}")
            if f.remedy:
                lines.append(f"            instead: {f.remedy}")
    if r.decisions:
        lines.append("tpmid chose:")
        lines += [f"  - {d}" for d in r.decisions]
    if r.actions:
        lines.append("still to do:")
        lines += [f"  - {a}" for a in r.actions]
    lines.append("every key was mapped" if r.clean else
                 f"{len(missing)} key(s) not mapped (exit {EXIT_NOT_MAPPED})")
    return "\n".join(lines)


def cmd_import(ctx: Ctx) -> int:
    """``tpmid aziot import CONFIG.toml``."""
    import yaml

    from tpmid.aziot import DEFAULT_SECRETS_DIR, import_aziot
    from tpmid.config import DEFAULT_STORE_DIR, parse_config

    a = ctx.args
    src = Path(a.toml)
    result = import_aziot(_read_text(src), str(src), serial=a.serial,
                          store_dir=Path(a.store) if a.store else DEFAULT_STORE_DIR,
                          secrets_dir=Path(a.secrets_dir) if a.secrets_dir
                          else DEFAULT_SECRETS_DIR,
                          pkcs11=not a.no_pkcs11)
    out = Path(a.out) if a.out else None
    # What is written must be a config tpmid accepts.
    try:
        parse_config(result.config, str(out or "the imported config"))
    except ConfigError as e:
        raise ConfigError(f"{src}: the tpmid config made from it is refused: {e.message}",
                          hint="fix that value in the IoT Edge config and import again") from None
    text = (f"{IMPORT_MARK} from {src}; report: `tpmid aziot import {src}`.\n"
            + yaml.safe_dump(result.config, sort_keys=False))
    report = _import_report(result, str(src))
    if out is not None:
        _refuse_overwrite(out, a.force)
        _write_private(out, text)
        report += f"\nwrote {out} (mode 0600)"
    rc = 0 if result.clean else EXIT_NOT_MAPPED
    if ctx.json:
        ctx.emit({**result.to_json(), "out": str(out) if out else None})
    elif out is not None:
        print(report)
    else:
        sys.stdout.write(text)
        print(report, file=sys.stderr)
    return rc


# ------------------------------------------------------------------------------- export


def _export_report(e: Export, dest: str, owner: str | None) -> str:
    lines = [f"registration_id: {e.registration_id}"]
    for name, path in e.certificates.items():
        lines.append(f"{name}: {path}")
        lines.append(f"  key: {e.uris[name]}?pin-value=...")
    if owner is not None:
        lines.append(f"wrote {dest} (mode 0600, owner {owner}): it holds the token's user PIN "
                     "(pin-value); keep it that way")
    else:
        lines.append("the fragment above holds the token's user PIN (pin-value)")
    lines.append("IoT Edge's key service (aziot-keyd) needs in its environment: "
                 + " ".join(f"{k}={v}" for k, v in e.environment().items()))
    lines.append("merge the fragment into /etc/aziot/config.toml, then `iotedge config apply` "
                 "(docs/iot-edge.md)")
    return "\n".join(lines)


def cmd_export(ctx: Ctx) -> int:
    """``tpmid aziot export``."""
    from tpmid.lifecycle.aziot import prepare_export
    from tpmid.wiring.pkcs11 import token_mirror

    a = ctx.args
    if a.out == "-" and ctx.json:
        raise ConfigError("--json and --out - both want standard output",
                          hint="write the fragment to a file with --out")
    rt = ctx.runtime()
    mirror = token_mirror(rt)
    if mirror is None:
        raise ConfigError(f"{rt.config.source} has no pkcs11 section: IoT Edge can use tpmid's "
                          "keys only through PKCS#11",
                          hint="add a top-level pkcs11 section (docs/config.md), then run "
                          "`tpmid pkcs11 sync` and export again")
    export = prepare_export(rt.config, rt.existing_store(), mirror, rt.secret,
                            ldevid=a.ldevid, edge_ca=a.edge_ca,
                            registration_id=a.registration_id)
    dest = a.out or str(DEFAULT_EXPORT)
    if dest == "-":
        sys.stdout.write(export.text)
        sys.stdout.flush()
        print(_export_report(export, dest, None), file=sys.stderr)
        return 0
    path = Path(dest)
    _refuse_overwrite(path, a.force, own_mark=EXPORT_MARK)
    _write_private(path, export.text)
    owner = _owner(path)
    data: dict[str, Any] = {**export.to_json(), "out": str(path), "mode": "0600", "owner": owner,
            "root_owned": os.stat(path).st_uid == 0}
    ctx.emit(data, lambda _: _export_report(export, dest, owner))
    return 0
