"""``tpmid provision``: create, certify, prove and record a device's IDevID on the line.

One library call (:func:`tpmid.lifecycle.provision.provision`). Progress lines
go to stderr, the result to stdout: a framed PASS/FAIL block for the person at
the station, or with ``--json`` exactly one JSON object, the manifest record.
Exit codes are those of the failure (docs/manufacturing.md): 0 pass or already
provisioned, 2 config, 3 TPM, 4 EST server, 5 EST auth, 6 verification, 7 store.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from tpmid.manifest import ProvisionRecord

ENV_STATION = "TPMID_STATION"
ENV_MANIFEST = "TPMID_MANIFEST"
_RULE = "=" * 72


def _nv_index(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an NV index such as 0x01800100"
                                         ) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``provision``."""
    p = sub.add_parser(
        "provision", help="provision this device's IDevID on the manufacturing line",
        description="Read the EK, create (or verify) the IDevID key in the TPM, enroll it "
        "over EST with the bootstrap credentials, prove the issued certificate, store it "
        "and append one record to the manifest. Running it again on a provisioned device "
        "only verifies and reports (no EST request).",
        epilog="Exit codes: 0 PASS (provisioned, already provisioned or adopted), 2 config, "
        "3 TPM, 4 EST server unreachable or failing, 5 EST authentication, 6 verification "
        "(including a TPM key that does not match its certificate), 7 store or manifest. "
        "See docs/manufacturing.md.",
    )
    p.add_argument("--identity", metavar="NAME", default="idevid",
                   help="identity of the config to provision (default: idevid)")
    p.add_argument("--serial", metavar="S",
                   help="device serial: the subject's serialNumber and {serial} in its CN "
                   "(default: subject.serial_number of the config)")
    p.add_argument("--station", metavar="ID",
                   help=f"station id for the manifest (default: ${ENV_STATION}, else the host "
                   "name)")
    p.add_argument("--manifest", metavar="FILE", type=Path,
                   help=f"JSON Lines file to append the record to (default: ${ENV_MANIFEST}; "
                   "none if unset)")
    p.add_argument("--force", action="store_true",
                   help="enroll again even if the device is provisioned (never replaces a key)")
    p.add_argument("--write-nv", metavar="INDEX", type=_nv_index,
                   help="also keep the certificate in this TPM NV index (e.g. 0x01800100)")
    p.add_argument("--adopt", action="store_true",
                   help="adopt a vendor-provisioned IDevID: the key at key.handle and its "
                   "certificate in --cert-nv, instead of enrolling")
    p.add_argument("--cert-nv", metavar="INDEX", type=_nv_index,
                   help="with --adopt: the NV index holding the IDevID certificate")
    add_json_flag(p)
    p.set_defaults(func=cmd_provision)


def _human(record: ProvisionRecord, manifest: Path | None) -> str:
    r = record
    who = r.device_serial or "(no serial)"
    if r.ok:
        head = f"PASS  {who}  {r.outcome}"
        placement = " ".join(x for x in (r.idevid_kind, r.idevid_template, r.idevid_handle) if x)
        lines = [
            f"  identity:     {r.identity} ({placement})",
            f"  certificate:  serial {r.idevid_cert_serial}",
            f"  subject:      {r.idevid_cert_subject}",
            f"  issuer:       {r.idevid_cert_issuer}",
            f"  not after:    {r.idevid_cert_not_after}",
            f"  cert sha256:  {r.idevid_cert_sha256}",
            f"  EK sha256:    {r.ek_fingerprint}",
        ]
        if r.nv_index:
            lines.append(f"  NV copy:      {r.nv_index}")
    else:
        head = f"FAIL  {who}  {r.error_code} (exit {r.exit_code}) at {r.failed_step}"
        lines = [f"  error:        {r.error}"]
        if r.hint:
            lines.append(f"  next step:    {r.hint}")
        if r.idevid_key_action:
            lines.append(f"  IDevID key:   {r.idevid_key_action}")
    lines.append(f"  manifest:     {manifest if manifest else 'not written (no --manifest)'}")
    lines.append(f"  time:         {r.duration_s:.2f} s, station {r.station}")
    return "\n".join([_RULE, head, _RULE, *lines])


def _finish(ctx: Ctx, record: ProvisionRecord, manifest: Path | None) -> int:
    if not record.ok:
        # Diagnostics on stderr in both modes, as tpmid.cli does for every error.
        print(f"tpmid: error: {record.error}", file=sys.stderr)
        if record.hint:
            print(f"tpmid: hint: {record.hint}", file=sys.stderr)
    if ctx.json:
        print(record.to_json(), flush=True)
    else:
        print(_human(record, manifest), flush=True)
    return record.exit_code


def cmd_provision(ctx: Ctx) -> int:
    """``tpmid provision``: see the module docstring."""
    from tpmid.lifecycle.provision import provision, record_failure
    from tpmid.wiring.est import EstClients
    from tpmid.wiring.tpm import tpm_opener

    args = ctx.args
    station = args.station or ctx.environ.get(ENV_STATION) or socket.gethostname()
    manifest_arg = args.manifest or ctx.environ.get(ENV_MANIFEST)
    manifest = Path(manifest_arg) if manifest_arg else None
    common = {"station_id": station, "manifest_path": manifest, "identity": args.identity,
              "serial": args.serial, "progress": ctx.progress}
    try:
        if args.cert_nv is not None and not args.adopt:
            raise ConfigError("--cert-nv only goes with --adopt",
                              hint="to keep the certificate in NV after enrolling, use --write-nv")
        if args.adopt and args.write_nv is not None:
            raise ConfigError("--adopt reads the certificate from NV (--cert-nv); it cannot be "
                              "combined with --write-nv")
        rt = ctx.runtime()
        store = rt.store()
        # The config's key.cert_nv is the default NV index of the certificate copy.
        configured_nv = rt.config.identity(args.identity).key.cert_nv
    except (ConfigError, StoreError) as e:
        return _finish(ctx, record_failure(e, **common), manifest)
    nv_index = args.cert_nv if args.adopt else args.write_nv
    if nv_index is None:
        nv_index = configured_nv
    record = provision(
        rt.config,
        store=store,
        tpm=tpm_opener(rt),
        clients=EstClients(rt.config, rt.secret, progress=ctx.progress),
        force=bool(args.force),
        nv_index=nv_index,
        adopt=bool(args.adopt),
        **common,
    )
    return _finish(ctx, record, manifest)
