"""``tpmid est-server``: the reference CA and EST server (init, run, label, hash-secret).

A lab server for tests and demos; it listens on loopback unless told otherwise.
``label`` changes a label of a running server (:mod:`tpmid.server.lab`).
See ``docs/est-server.md``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.errors import ConfigError

_AUTH_NOTES = {
    "idevid": "Secret-Value header",
    "ldevid": "client certificate: IDevID or LDevID; subject serialNumber: the client's",
    "edgeca": "client certificate: LDevID; subject serialNumber: the client's",
}


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} does not exist (0 to 65535; 0 picks a "
                                         "free one)")
    return port


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``est-server init|run|label|hash-secret``."""
    p = sub.add_parser("est-server", help="reference CA and EST server for tests and demos",
                       description="A small, strict RFC 7030 EST server with its own CAs "
                       "(manufacturer, operator, TLS). See docs/est-server.md.")
    s = p.add_subparsers(dest="est_server_command", metavar="SUBCOMMAND", required=True)

    i = s.add_parser("init", help="create the CAs, TLS certificate, config and IDevID secret")
    i.add_argument("--dir", required=True, type=Path, help="server directory to create")
    i.add_argument("--alg", default="ecc-p256", choices=("ecc-p256", "ecc-p384", "rsa-2048"),
                   help="key algorithm of the CAs and the TLS certificate (default ecc-p256)")
    i.add_argument("--secret-out", type=Path, metavar="FILE",
                   help="also write the IDevID Secret-Value to FILE (mode 0600)")
    i.add_argument("--tls-from", metavar="LABEL", choices=("idevid", "ldevid", "edgeca"),
                   help="issue the server's TLS certificate from this label's CA instead of a "
                   "TLS CA of its own, so that a client pinning that root (est.pin) can "
                   "bootstrap /cacerts")
    i.set_defaults(func=cmd_init)

    r = s.add_parser("run", help="serve EST over HTTPS until SIGTERM (SIGHUP re-reads config)")
    r.add_argument("--dir", required=True, type=Path, help="server directory (from init)")
    r.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; loopback only unless "
                   "--allow-remote)")
    r.add_argument("--port", default=8443, type=_port,
                   help="TCP port (default 8443; 0 picks a free port and prints it)")
    r.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (this is a lab server)")
    r.set_defaults(func=cmd_run)

    lab = s.add_parser(
        "label", help="show or change a label of a (running) server: lifetime, pending, faults",
        description="Change one label's certificate lifetime, pending answers or fault knobs. "
        "The change is checked as the server will read it, saved in DIR/lab.yaml (on top of "
        "config.yaml) and, if a server runs for DIR, applied to it at once (SIGHUP, then "
        "this command waits until the server confirms). Without options: show the label.",
        epilog="Faults: status=N, retry_after=D, retry_after_header=TEXT, delay=D, trickle=D, "
        "drop, reset, malformed_body, wrong_content_type, wrong_key, foreign_issuer, expired, "
        "oversize=BYTES, subject=DN, operations=OP[,OP], times=N. Durations: 30s, 10m, 2h, "
        "7day. See docs/est-server.md.")
    lab.add_argument("name", metavar="NAME", help="the label (idevid, ldevid, edgeca, ...)")
    lab.add_argument("--dir", required=True, type=Path, help="server directory (from init)")
    lab.add_argument("--lifetime", metavar="DURATION",
                     help="lifetime of the certificates it issues (10m, 7day, 20y)")
    lab.add_argument("--pending", metavar="N", type=_count,
                     help="answer the first N requests per CSR key with 202 (0: never)")
    lab.add_argument("--retry-after", metavar="DURATION",
                     help="Retry-After sent with those 202 answers")
    lab.add_argument("--fault", metavar="KNOB[=VALUE]", action="append", default=[],
                     help="switch a fault on (repeatable): status=503, delay=2s, drop, ...")
    lab.add_argument("--clear-faults", action="store_true",
                     help="switch every fault of the label off (before any --fault)")
    lab.add_argument("--reset", action="store_true",
                     help="drop all lab overrides of the label (back to config.yaml)")
    lab.set_defaults(func=cmd_label)

    h = s.add_parser("hash-secret",
                     help="read a secret from stdin, print its salted hash for config.yaml")
    h.set_defaults(func=cmd_hash_secret)

    register_rollover(s)


def cmd_init(ctx: Ctx) -> int | None:
    """Create a server directory and show its trust anchors and the secret (once)."""
    from tpmid.server.state import init_server_dir
    from tpmid.store.fsio import atomic_write
    args = ctx.args
    res = init_server_dir(args.dir, alg=args.alg, tls_from=args.tls_from)
    if args.secret_out:
        out = args.secret_out.resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, (res.secret + "\n").encode(), 0o600)
    data: dict[str, Any] = {
        "dir": str(res.dir),
        "alg": res.alg,
        "tls_ca": str(res.tls_ca_path),
        "manufacturer_ca": str(res.manufacturer_ca_path),
        "operator_ca": str(res.operator_ca_path),
        "config": str(res.config_path),
        "fingerprints": res.fingerprints,
        "urls": res.urls(),
        "idevid_secret": res.secret,
        "secret_file": str(args.secret_out) if args.secret_out else None,
        "tls_from": res.tls_from,
    }

    def human(d: dict[str, Any]) -> str:
        lines = [
            f"EST server initialised in {d['dir']} ({d['alg']})",
            f"TLS CA (clients trust it for the server's TLS, e.g. curl --cacert): {d['tls_ca']}",
            *([f"  = the CA of label {d['tls_from']}: a client pinning its fingerprint "
               "(est.pin) can bootstrap /cacerts"] if d["tls_from"] else []),
            "CA fingerprints (SHA-256):",
            *(f"  {name:<13} {fp}" for name, fp in d["fingerprints"].items()),
            f"Config: {d['config']}",
            f"URLs (after: tpmid est-server run --dir {d['dir']}):",
            *(f"  {label:<7} {url}   ({_AUTH_NOTES.get(label, '')})"
              for label, url in d["urls"].items()),
            f"IDevID Secret-Value (shown once; the server keeps only a salted hash): "
            f"{d['idevid_secret']}",
        ]
        if d["secret_file"]:
            lines.append(f"The secret was also written to {d['secret_file']} (mode 0600).")
        return "\n".join(lines)

    ctx.emit(data, human)
    return None


class _Signals:
    """What the signal handlers saw; plain flags, read by the main loop."""

    stop = False
    reload = False


def cmd_run(ctx: Ctx) -> int | None:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads config.yaml and lab.yaml."""
    from tpmid.server.lab import ServerRun
    from tpmid.server.server import EstServer
    from tpmid.server.state import ServerPaths
    args = ctx.args
    logging.getLogger("tpmid.server").setLevel(logging.DEBUG if args.verbose >= 2
                                               else logging.INFO)
    seen = _Signals()

    def on_stop(*_: object) -> None:
        seen.stop = True

    def on_reload(*_: object) -> None:
        seen.reload = True

    handlers = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_reload}
    previous = {sig: signal.signal(sig, h) for sig, h in handlers.items()}
    # Held before the config is read, so a lab command never races the first read.
    run = ServerRun(ServerPaths(args.dir.resolve()))
    try:
        run.claim()
        server = EstServer(args.dir, host=args.host, port=args.port,
                           allow_remote=args.allow_remote)
        try:
            server.start()
            # run.json first: whoever reads "listening on" may drive the server at once
            # (lab commands, the test fixture), and they find it through run.json.
            run.listening(server.base_url)
            _announce(ctx, server)
            # The handlers only set flags (no locks inside a signal handler); a short
            # sleep is interrupted by each signal and bounds how long a reload waits.
            while not seen.stop:
                time.sleep(0.05)
                if seen.reload:
                    seen.reload = False
                    try:
                        server.reload()
                        run.reloaded(None)
                    except ConfigError as e:
                        logging.getLogger("tpmid.server").error(
                            "config not reloaded, keeping the previous one: %s", e.message)
                        run.reloaded(e.message)
        finally:
            server.stop()
    finally:
        run.close()
        for sig, h in previous.items():
            signal.signal(sig, h)
    return None


def _announce(ctx: Ctx, server: Any) -> None:
    labels = sorted(server.app.config.labels)
    data = {
        "dir": str(server.state.paths.dir),
        "listening": server.base_url,
        "port": server.port,
        "tls_ca": str(server.state.paths.ca_cert("tls")),
        "fingerprints": server.state.fingerprints(),
        "urls": {label: server.url(label) for label in labels},
        "default_label": server.app.config.default_label,
    }

    def human(d: dict[str, Any]) -> str:
        return "\n".join([
            f"EST server for {d['dir']}",
            f"TLS CA: {d['tls_ca']}",
            "CA fingerprints (SHA-256):",
            *(f"  {name:<13} {fp}" for name, fp in d["fingerprints"].items()),
            "Labels:",
            *(f"  {label:<7} {url}" for label, url in d["urls"].items()),
            f"  (label-less {server.url()} -> {d['default_label'] or 'none'})",
            # The fixture and scripts parse this line; keep its shape.
            f"listening on {d['listening']}",
        ])

    ctx.emit(data, human)
    sys.stdout.flush()


def cmd_label(ctx: Ctx) -> int | None:
    """Show or change one label; a running server applies the change before this returns."""
    from tpmid.render import format_duration as duration
    from tpmid.server.lab import LabChange, label_summary, parse_fault, update_label

    args = ctx.args
    faults = dict(parse_fault(text) for text in args.fault)
    change = LabChange(lifetime=args.lifetime, pending=args.pending,
                       retry_after=args.retry_after, faults=faults,
                       clear_faults=args.clear_faults, reset=args.reset)
    result = update_label(args.dir, args.name, change)
    data = {
        **label_summary(result.label),
        "changed": result.changed,
        "overrides": dict(result.overrides),
        "lab_file": str(result.lab_file),
        "server": ({"pid": result.server.pid, "url": result.server.url}
                   if result.server else None),
    }

    def human(d: dict[str, Any]) -> str:
        faults = ", ".join(k if v is True else f"{k}={','.join(v) if isinstance(v, list) else v}"
                           for k, v in d["faults"].items())
        lines = [
            f"label {d['label']} ({d['profile']} profile, {d['ca']} CA)",
            f"  lifetime:     {duration(d['lifetime_s'])}",
            f"  pending:      {d['pending']}"
            + (f" (Retry-After {duration(d['retry_after_s'])})" if d["pending"] else ""),
            f"  faults:       {faults or 'none'}",
            f"  lab.yaml:     {', '.join(sorted(d['overrides'])) or 'no overrides'}",
        ]
        if d["changed"]:
            lines.append(f"applied to the running server (pid {d['server']['pid']}, "
                         f"{d['server']['url']})" if d["server"] else
                         f"saved in {d['lab_file']}; no server runs for this directory, the "
                         "change applies when it starts")
        elif d["server"]:
            lines.append(f"server running (pid {d['server']['pid']}, {d['server']['url']})")
        return "\n".join(lines)

    ctx.emit(data, human)
    return None


def cmd_hash_secret(ctx: Ctx) -> int | None:
    """Print the salted hash of the secret read from stdin (for secret_value/basic ``hash``)."""
    from tpmid.server.auth import hash_secret
    secret = ctx.read_stdin().strip()
    if not secret:
        raise ConfigError("expected the secret on standard input, got an empty line")
    ctx.emit({"hash": hash_secret(secret)}, lambda d: d["hash"])
    return None


# --------------------------------------------------------------------------- rollover


def register_rollover(s: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``est-server rollover LABEL [--finish | --replace]`` (RFC 7030 §4.1.3)."""
    r = s.add_parser(
        "rollover", help="replace the CA of a label, linked by RFC 7030 key-update certificates",
        description="Replace the CA behind LABEL (and every label that uses it) with a new "
        "root. /cacerts then serves the new root with OldWithOld, OldWithNew and NewWithOld "
        "(RFC 7030 §4.1.3); client certificates of the old CA are accepted until --finish. "
        "A running server for DIR applies the change at once (SIGHUP, then this command "
        "waits until the server confirms). See docs/est-server.md.")
    r.add_argument("label", metavar="LABEL",
                   help="the label whose CA rolls over (or a CA name: operator, manufacturer, tls)")
    r.add_argument("--dir", required=True, type=Path, help="server directory (from init)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--finish", action="store_true",
                      help="end the overlap: refuse client certificates of the old CA")
    mode.add_argument("--replace", action="store_true",
                      help="replace the CA outright: no key-update certificates, no overlap "
                      "(devices must be given the new root)")
    add_json_flag(r)
    r.set_defaults(func=cmd_rollover)


def cmd_rollover(ctx: Ctx) -> int | None:
    """Roll the CA of a label over, or end the overlap of the last rollover.

    A running server for the directory applies the change before this returns
    (SIGHUP, confirmed), as ``est-server label`` does.
    """
    from tpmid.render import name as render_name
    from tpmid.server.lab import change_and_reload
    from tpmid.server.rollover import finish_overlap, rollover_ca

    args = ctx.args

    def applied(server: Any) -> str:
        return (f"applied to the running server (pid {server.pid}, {server.url})" if server
                else "no server runs for this directory: it applies when the server starts")

    if args.finish:
        (ca, _state), server = change_and_reload(
            args.dir, lambda paths: finish_overlap(paths.dir, args.label))
        ctx.emit({"ca": ca, "overlap": False,
                  "server": {"pid": server.pid, "url": server.url} if server else None},
                 f"the overlap of the {ca} CA has ended: client certificates of its previous "
                 f"root are refused from now on\n{applied(server)}")
        return None
    res, server = change_and_reload(
        args.dir, lambda paths: rollover_ca(paths.dir, args.label, replace=bool(args.replace)))
    data: dict[str, Any] = {
        "ca": res.ca, "generation": res.generation, "labels": list(res.labels),
        "old": render_name(res.old.subject), "new": render_name(res.new.subject),
        "fingerprints": res.fingerprints, "key_update_certificates": len(res.links),
        "tls_certificate_reissued": res.tls_reissued, "overlap": not args.replace,
        "server": {"pid": server.pid, "url": server.url} if server else None,
    }

    def human(d: dict[str, Any]) -> str:
        lines = [f"rolled the {d['ca']} CA over (generation {d['generation']}; labels "
                 f"{', '.join(d['labels']) or 'none'})",
                 f"  old root: {d['old']}  SHA-256 {d['fingerprints']['old']}",
                 f"  new root: {d['new']}  SHA-256 {d['fingerprints']['new']}"]
        if d["overlap"]:
            lines += ["  /cacerts now serves the new root with OldWithOld, OldWithNew and "
                      "NewWithOld (RFC 7030 §4.1.3);",
                      "  client certificates of the old CA are accepted until "
                      f"`tpmid est-server rollover {args.label} --dir {args.dir} --finish`"]
        else:
            lines.append("  replaced outright: no key-update certificates; devices must be "
                         "given the new root (est.issuer_anchors)")
        if d["tls_certificate_reissued"]:
            lines.append("  the TLS server certificate was re-issued by the new CA"
                         + (" (served with NewWithOld)" if d["overlap"] else ""))
        lines.append(applied(server))
        return "\n".join(lines)

    ctx.emit(data, human)
    return None
