"""``tpmid renew`` and ``tpmid daemon``: keeping identities renewed."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
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
        "renew", help="renew one identity now if due (or with --force)",
        description="Renew identity NAME as the daemon would: a new TPM key (renew.rotate_key), "
        "a CSR signed by the TPM, simplereenroll authenticated with the current certificate "
        "(or the bootstrap identity when it has expired), verification, commit. Without "
        "--force nothing happens unless the renewal policy says it is due.",
    )
    p.add_argument("name", metavar="NAME", help="identity from the config file")
    p.add_argument("--force", action="store_true", help="renew even if not due")
    p.add_argument("--chain", action="store_true",
                   help="then renew the identities that authenticate with NAME (e.g. the Edge CA)")
    add_json_flag(p)
    p.set_defaults(func=cmd_renew)

    d = sub.add_parser(
        "daemon", help="keep every file-key identity renewed (foreground; for systemd)",
        description="Recover interrupted work from the store's journal, then sleep until the "
        "next renewal of any identity, renew it, and repeat. SIGHUP reloads the config, "
        "SIGTERM/SIGINT stop. Exits non-zero only for a bad config at start.",
    )
    d.set_defaults(func=cmd_daemon)


def _engine(ctx: Ctx, open_tpm: TpmOpener) -> RenewalEngine:
    """The renewal engine of the current config, renewing through ``open_tpm``."""
    from tpmid.lifecycle.renew import RenewalEngine

    rt = ctx.runtime()

    def make_clients() -> EstClientFactory:
        from tpmid.wiring.est import EstClients  # the HTTP stack, at the first renewal

        return EstClients(rt.config, rt.secret)

    return RenewalEngine(config=rt.config, store=rt.store(), open_tpm=open_tpm,
                         make_clients=make_clients, hook_environment=rt.hook_environment)


def _recover(engine: RenewalEngine) -> None:
    """Start-up recovery: settle the journal, then free TPM slots that dead runs left."""
    from tpmid.store import recover

    recover(engine.store)  # logs each action itself
    with engine.open_tpm() as tpm:
        stale = tpm.flush_stale_transients()
        if stale.flushed:
            log.warning("recovery: %s", stale.describe())


def _summary(results: list[Any]) -> list[dict[str, Any]]:
    return [r.summary() for r in results]


def cmd_renew(ctx: Ctx) -> int:
    """``tpmid renew NAME [--force] [--chain]``."""
    from tpmid.wiring.tpm import tpm_opener

    name = ctx.args.name
    ctx.config().identity(name)  # a clear error for an unknown name
    # The TPM (and the host TPM lock) is taken for each piece of TPM work and given
    # back before the network is used (tpmid.tpm.lease).
    engine = _engine(ctx, tpm_opener(ctx.runtime()))
    now = utcnow()
    _recover(engine)
    decision = engine.plan(name, now)
    if not ctx.args.force and decision.when > now:
        ctx.emit({"identity": name, "renewed": False, "next": decision.when.isoformat(),
                  "reason": decision.reason},
                 f"{describe_decision(decision, name)}; not due (use --force to renew now)")
        return 0
    ctx.progress(f"renewing {name} ...")
    results = engine.renew_chain(name, now) if ctx.args.chain else [engine.renew(name, now)]

    def human(rows: list[dict[str, Any]]) -> str:
        return "\n".join(
            f"renewed {r['identity']} ({r['operation']}, version {r['version']}): "
            f"{r['subject']}, serial {r['serial']}, until {r['not_after']}" for r in rows)

    ctx.emit(_summary(results), human)
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
    from tpmid.lifecycle.renew import managed_identities
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
        new = _engine(ctx, tpm_opener(ctx.runtime()))
        new.follow_chains = True
        new.retire_due_keys()
        return new

    daemon = Daemon(make_planner=make_planner, now=utcnow)
    def stop(*_: object) -> None:
        daemon.request_stop()
        cancel.request()  # cuts a network, TPM or lock wait short (tpmid.cancel)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    _notify("READY=1\nSTATUS=renewing " + (", ".join(names) or "nothing"))
    try:
        return daemon.run()
    finally:
        _notify("STOPPING=1")
