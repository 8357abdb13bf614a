"""``tpmid est cacerts|csrattrs URL`` and ``tpmid enroll NAME``.

Each command is one library call (:mod:`tpmid.lifecycle.enroll`); this module
only parses arguments, resolves secrets with the injected environment and
renders the result. See ``docs/cli.md`` (sections ``est`` and ``enroll``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.render import name as render_name
from tpmid.render import serial as render_serial

if TYPE_CHECKING:
    from cryptography import x509


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``est`` (cacerts, csrattrs) and ``enroll``."""
    est = sub.add_parser("est", help="query an EST server (RFC 7030) directly",
                         description="Query an EST server directly. The server is authenticated "
                         "with --trusted-certs (explicit trust anchors, RFC 7030 §3.6.1), "
                         "trust.est_anchors from the config, or --pin (pinned /cacerts "
                         "bootstrap, RFC 7030 §4.1.1).")
    esub = est.add_subparsers(dest="est_command", metavar="COMMAND", required=True)
    for op, helptext in (("cacerts", "fetch the CA certificates of an EST label"),
                         ("csrattrs", "fetch the CSR attributes an EST label asks for")):
        p = esub.add_parser(op, help=helptext, description=helptext)
        p.add_argument("url", metavar="URL",
                       help="label URL, e.g. https://127.0.0.1:8443/.well-known/est/idevid")
        p.add_argument("--trusted-certs", metavar="FILE", type=Path, action="append", default=[],
                       help="PEM file with the CA of the server's TLS certificate (repeatable)")
        p.add_argument("--pin", metavar="SHA256",
                       help="SHA-256 fingerprint of the EST root: bootstrap without a trust "
                       "anchor (the server's TLS certificate must chain to that root)")
        p.add_argument("--system-store", action="store_true",
                       help="also trust the system's CA store (implicit trust anchors)")
        p.add_argument("--allow-http", action="store_true",
                       help="allow a plain http:// URL (lab servers only)")
        if op == "cacerts":
            p.add_argument("--out", metavar="FILE", type=Path,
                           help="write the certificates as PEM to FILE (0644)")
        add_json_flag(p)
        p.set_defaults(func=cmd_cacerts if op == "cacerts" else cmd_csrattrs)

    p = sub.add_parser("enroll", help="enroll one identity from the config over EST",
                       description="Enroll identity NAME: create or open its TPM key, send a "
                       "TPM-signed CSR to its EST label, verify the issued certificate and "
                       "store it with its chain.")
    p.add_argument("name", metavar="NAME", help="identity name in the config")
    p.add_argument("--reenroll", action="store_true",
                   help="simplereenroll, authenticated with the identity's current certificate")
    p.add_argument("--serverkeygen", action="store_true",
                   help="let the EST server generate the key (RFC 7030 §4.4) and import it into "
                   "the TPM (as est.serverkeygen: true; key-file identities only)")
    add_json_flag(p)
    p.set_defaults(func=cmd_enroll)


# --------------------------------------------------------------------------- est


def _trust_args(ctx: Ctx) -> dict[str, Any]:
    args = ctx.args
    trusted = list(args.trusted_certs)
    system = bool(args.system_store)
    if not trusted and not args.pin and not system:
        # No flag: fall back to the config's trust section, if there is a config.
        cfg = ctx.config(required=False)
        trusted = list(cfg.trust.est_anchors)
        system = cfg.trust.use_system_store
    return {"trusted_certs": trusted, "pin": args.pin, "use_system_store": system,
            "allow_http": bool(args.allow_http)}


def _cert_info(c: x509.Certificate) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    from tpmid.est.verify import fingerprint_sha256

    return {
        "subject": render_name(c.subject),
        "issuer": render_name(c.issuer),
        "serial": f"{render_serial(c.serial_number)}",
        "not_before": c.not_valid_before_utc.isoformat(),
        "not_after": c.not_valid_after_utc.isoformat(),
        "sha256_fingerprint": fingerprint_sha256(c),
        "pem": c.public_bytes(serialization.Encoding.PEM).decode(),
    }


def cmd_cacerts(ctx: Ctx) -> int:
    """``tpmid est cacerts URL``."""
    from tpmid.store import atomic_write
    from tpmid.wiring.est import fetch_cacerts

    result = fetch_cacerts(ctx.args.url, **_trust_args(ctx))
    infos = [_cert_info(c) for c in result.certificates]
    if ctx.args.out is not None:
        atomic_write(ctx.args.out, "".join(i["pem"] for i in infos).encode(), 0o644)
        ctx.progress(f"wrote {len(infos)} certificate(s) to {ctx.args.out}")

    def human(data: dict[str, Any]) -> str:
        lines = [f"# {data['url']} (server authenticated by {data['server_auth']})"]
        for i in data["certificates"]:
            lines += [f"# subject:  {i['subject']}", f"# issuer:   {i['issuer']}",
                      f"# validity: {i['not_before']} .. {i['not_after']}",
                      f"# sha256:   {i['sha256_fingerprint']}"]
            if ctx.args.out is None:
                lines.append(i["pem"].rstrip())
        return "\n".join(lines)

    ctx.emit({"url": result.url, "server_auth": result.server_auth, "certificates": infos},
             human)
    return 0


def cmd_csrattrs(ctx: Ctx) -> int:
    """``tpmid est csrattrs URL``."""
    from tpmid.est.csrattrs import oid_name
    from tpmid.wiring.est import fetch_csrattrs

    result = fetch_csrattrs(ctx.args.url, **_trust_args(ctx))
    attrs = []
    for a in result.attributes:
        oid = a.oid.dotted_string
        entry: dict[str, Any] = {"oid": oid, "name": oid_name(oid)}
        if a.is_attribute:
            entry["values"] = [{"oid": v, "name": oid_name(v)} for v in a.value_oids]
            entry["other_values"] = len(a.values or ()) - len(a.value_oids)
        attrs.append(entry)

    def human(data: dict[str, Any]) -> str:
        if not data["attributes"]:
            return f"{data['url']}: no CSR attributes requested"
        lines = []
        for e in data["attributes"]:
            text = f"{e['oid']} ({e['name'] or '?'})"
            if "values" in e:
                vals = ", ".join(f"{v['oid']} ({v['name'] or '?'})" for v in e["values"])
                text += f": {vals}" if vals else ""
                if e["other_values"]:
                    text += f" [+{e['other_values']} non-OID value(s)]"
            lines.append(text)
        return "\n".join(lines)

    ctx.emit({"url": result.url, "server_auth": result.server_auth, "attributes": attrs}, human)
    return 0


# --------------------------------------------------------------------------- enroll


def cmd_enroll(ctx: Ctx) -> int:
    """``tpmid enroll NAME``."""
    from tpmid.lifecycle.enroll import enroll_identity
    from tpmid.tpm.lease import TpmLease
    from tpmid.wiring.est import EstClients
    from tpmid.wiring.pkcs11 import token_mirror
    from tpmid.wiring.tpm import tpm_opener

    rt = ctx.runtime()
    name = ctx.args.name
    ident = rt.config.identity(name)
    ctx.progress(f"enrolling {name} ({rt.key(name).describe()}) at "
                 f"{ident.est.url if ident.est else '(no est.url)'}")
    # The TPM is borrowed only while it works, never across the network.
    result = enroll_identity(rt.config, name, store=rt.store(),
                             lease=TpmLease(tpm_opener(rt)),
                             clients=EstClients(rt.config, rt.secret, progress=ctx.progress),
                             reenroll=bool(ctx.args.reenroll),
                             serverkeygen=bool(ctx.args.serverkeygen), mirror=token_mirror(rt))

    def human(d: dict[str, Any]) -> str:
        lines = [
            f"enrolled {d['identity']} ({d['operation']}, version {d['version']})",
            f"  subject:     {d['subject']}",
            f"  issuer:      {d['issuer']}",
            f"  serial:      {d['serial']}",
            f"  not after:   {d['not_after']}",
            f"  sha256:      {d['sha256_fingerprint']}",
            f"  certificate: {d['cert_path']}",
            f"  chain:       {d['chain_path']}",
            f"  full chain:  {d['fullchain_path']}",
        ]
        if d["key_path"]:
            lines.append(f"  key file:    {d['key_path']}"
                         + (" (server-generated, imported into the TPM)"
                            if d.get("key_origin") else ""))
        if d["subject_rewritten"]:
            lines.append(f"  NOTE: the server rewrote the subject (requested "
                         f"{d['requested_subject']}); accepted by est.accept_rewritten_subject")
        return "\n".join(lines)

    ctx.emit(result.summary(), human)
    return 0
