"""``tpmid renew`` and ``tpmid daemon``: keeping identities renewed."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.clock import utcnow
from tpmid.errors import ConfigError, TpmidError
from tpmid.render import describe_decision

if TYPE_CHECKING:
    from tpmid.lifecycle.enroll import EstClientFactory
    from tpmid.lifecycle.renew import RenewalEngine
    from tpmid.tpm.connection import TpmOpener

log = logging.getLogger("tpmid.daemon")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "renew", help="renew the identities that are due (or NAME; --force: now)",
        description="Renew as the daemon would: a new TPM key (renew.rotate_key), a CSR signed "
        "by the TPM, simplereenroll authenticated with the current certificate (or the "
        "bootstrap identity when it has expired or its key is lost), verification, commit. "
        "Without NAME every identity tpmid renews is considered, in dependency order (the "
        "LDevID before the Edge CA), like `certbot renew`. Without --force nothing happens "
        "unless the renewal policy says it is due. --dry-run shows what would happen without "
        "touching the TPM, the store or the server.",
    )
    p.add_argument("name", metavar="NAME", nargs="?",
                   help="identity from the config file (default: all that tpmid renews)")
    p.add_argument("--force", action="store_true", help="renew even if not due")
    p.add_argument("--chain", action="store_true",
                   help="then renew the identities that authenticate with NAME (e.g. the Edge CA)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be renewed, and how; change nothing")
    add_json_flag(p)
    p.set_defaults(func=cmd_renew)

    d = sub.add_parser(
        "daemon", help="keep every file-key identity renewed (foreground; for systemd)",
        description="Recover interrupted work from the store's journal, then sleep until the "
        "next renewal of any identity, renew it, and repeat. SIGHUP reloads the config, "
        "SIGTERM/SIGINT stop. Exits non-zero only for a bad config at start.",
    )
    d.set_defaults(func=cmd_daemon)


def _engine(ctx: Ctx, open_tpm: TpmOpener,
            progress: Callable[[str], None] | None = None) -> RenewalEngine:
    """The renewal engine of the current config, renewing through ``open_tpm``.

    ``progress`` receives a line whenever a renewal has to wait (a 202 Accepted).
    """
    from tpmid.lifecycle.renew import RenewalEngine
    from tpmid.wiring.pkcs11 import token_mirror

    rt = ctx.runtime()

    def make_clients() -> EstClientFactory:
        from tpmid.wiring.est import EstClients  # the HTTP stack, at the first renewal

        return EstClients(rt.config, rt.secret, progress=progress)

    return RenewalEngine(config=rt.config, store=rt.store(), open_tpm=open_tpm,
                         make_clients=make_clients, hook_environment=rt.hook_environment,
                         mirror=token_mirror(rt))


def _recover(engine: RenewalEngine) -> None:
    """Start-up recovery: settle the journal, then free TPM slots that dead runs left."""
    from tpmid.store import recover

    recover(engine.store)  # logs each action itself
    with engine.open_tpm() as tpm:
        stale = tpm.flush_stale_transients()
        if stale.flushed:
            log.warning("recovery: %s", stale.describe())
    _sync_token(engine)


def _sync_token(engine: RenewalEngine) -> None:
    """The PKCS#11 token made what the recovered store says (tpmid.lifecycle.pkcs11)."""
    from tpmid.lifecycle.pkcs11 import TokenMirror
    from tpmid.tpm.lease import TpmLease

    mirror = engine.mirror
    if not isinstance(mirror, TokenMirror):
        return
    try:
        with TpmLease(engine.open_tpm) as lease:
            for line in mirror.sync(lease.tpm, engine.store):
                log.warning("recovery: PKCS#11 token: %s", line)
    except TpmidError as e:
        log.error("recovery: the PKCS#11 token is not in step (%s); `tpmid pkcs11 sync` "
                  "repairs it", e)


def _summary(results: list[Any]) -> list[dict[str, Any]]:
    return [r.summary() for r in results]


def _renewed_text(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"renewed {r['identity']} ({r['operation']}, version {r['version']}): "
        f"{r['subject']}, serial {r['serial']}, until {r['not_after']}" for r in rows)


def cmd_renew(ctx: Ctx) -> int:
    """``tpmid renew [NAME] [--force] [--chain] [--dry-run]``."""
    from tpmid.lifecycle.plan import managed_identities
    from tpmid.wiring.tpm import tpm_opener

    name = ctx.args.name
    config = ctx.config()
    if name is not None:
        config.identity(name)  # a clear error for an unknown name
    if ctx.args.dry_run:
        return _dry_run(ctx, [name] if name else managed_identities(config))
    # The TPM (and the host TPM lock) is taken for each piece of TPM work and given
    # back before the network is used (tpmid.tpm.lease).
    engine = _engine(ctx, tpm_opener(ctx.runtime()), ctx.progress)
    now = utcnow()
    _recover(engine)
    if name is None:
        return _renew_all(ctx, engine, now)
    decision = engine.plan(name, now)
    if not ctx.args.force and decision.when > now:
        ctx.emit({"identity": name, "renewed": False, "next": decision.when.isoformat(),
                  "reason": decision.reason},
                 f"{describe_decision(decision, name)}; not due (use --force to renew now)")
        return 0
    ctx.progress(f"renewing {name} ...")
    results = engine.renew_chain(name, now) if ctx.args.chain else [engine.renew(name, now)]
    ctx.emit(_summary(results), _renewed_text)
    return 0


def _renew_all(ctx: Ctx, engine: RenewalEngine, now: datetime) -> int:
    """Every identity tpmid renews, in dependency order; failures reported, the rest goes on."""
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    rc = 0
    for name in engine.identities():
        decision = engine.plan(name, utcnow())
        if not ctx.args.force and decision.when > utcnow():
            rows.append({"identity": name, "renewed": False, "next": decision.when.isoformat(),
                         "reason": decision.reason})
            lines.append(f"{describe_decision(decision, name)}; not due")
            continue
        ctx.progress(f"renewing {name} ...")
        try:
            result = engine.renew(name, now)
        except TpmidError as e:
            rows.append({"identity": name, "renewed": False, "error": e.message,
                         "hint": e.hint, "exit_code": e.exit_code})
            lines.append(f"{name}: renewal FAILED: {e.message}"
                         + (f"\n  hint: {e.hint}" if e.hint else ""))
            rc = rc or e.exit_code
            continue
        rows.append({**result.summary(), "renewed": True})
        lines.append(_renewed_text([result.summary()]))
    ctx.emit(rows, "\n".join(lines) or "no identity is renewed by tpmid (none has est and a "
             "key file)")
    return rc


def _dry_run(ctx: Ctx, names: list[str]) -> int:
    """What ``tpmid renew`` would do, from the config and the store only (nothing changes)."""
    from tpmid.lifecycle.plan import plan_renewal
    from tpmid.lifecycle.renew import RenewalEngine
    from tpmid.policy import AttemptState

    rt = ctx.runtime()
    store = rt.existing_store()
    now = utcnow()
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    for name in names:
        ident = rt.config.identity(name)
        if store is None:
            current, attempt = None, AttemptState()
            due, reason, when = True, "not enrolled yet", now
        else:
            try:
                current = store.current(name)
            except TpmidError:
                current = None
            attempt = store.load_state(name)
            decision = plan_renewal(rt.config, store, name, now)
            due, reason, when = decision.when <= now, decision.reason, decision.when
        reenroll, self_auth, how = RenewalEngine._method(ident, current, now, attempt)
        op = "simplereenroll" if reenroll else "simpleenroll"
        go = due or ctx.args.force
        rows.append({"identity": name, "would_renew": go, "due": due, "when": when.isoformat(),
                     "reason": reason, "operation": op, "how": how})
        lines.append(f"{name}: would renew now via {op} ({how}); {reason}" if go else
                     f"{name}: not due ({reason}); next {when.isoformat()}")
    ctx.emit(rows, "\n".join(lines) or "no identity is renewed by tpmid")
    return 0


def _notify(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd: %s", e)


def cmd_daemon(ctx: Ctx) -> int:
    """``tpmid daemon``: the renewal loop with signal handling."""
    from tpmid import cancel
    from tpmid.lifecycle.daemon import Daemon
    from tpmid.lifecycle.plan import managed_identities
    from tpmid.wiring.tpm import tpm_opener

    if ctx.args.verbose == 0:
        logging.getLogger("tpmid").setLevel(logging.INFO)  # a daemon logs its decisions
    open_tpm = tpm_opener(ctx.runtime())  # a bad config fails here, before anything else
    engine = _engine(ctx, open_tpm)
    try:
        _recover(engine)
        engine.check_keys()  # after TPM2_Clear: restore IDevIDs, renew lost keys at once
    except ConfigError:
        raise
    except TpmidError as e:
        # A TPM or store outage at boot must not stop the daemon; renewals retry.
        log.error("start-up recovery incomplete: %s", e)
    names = managed_identities(ctx.config())
    log.info("tpmid daemon started (pid %d); managing %s", os.getpid(),
             ", ".join(names) or "no identities (none has est + kind: file)")

    def make_planner() -> RenewalEngine:
        ctx.forget_config()  # re-read the file on every (re)load
        # A renewal that waits (202 Accepted) says so in systemd's status line too.
        new = _engine(ctx, tpm_opener(ctx.runtime()),
                      progress=lambda line: _notify(f"STATUS={line}"))
        new.follow_chains = True
        new.retire_due_keys()
        return new

    daemon = Daemon(make_planner=make_planner, now=utcnow,
                    status=lambda line: _notify(f"STATUS={line}"))

    def stop(*_: object) -> None:
        daemon.request_stop()
        cancel.request()  # cuts a network, TPM or lock wait short (tpmid.cancel)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    _notify("READY=1\nSTATUS=started; managing " + (", ".join(names) or "nothing"))
    try:
        return daemon.run()
    finally:
        _notify("STOPPING=1")
