"""``tpmid status``, ``tpmid check`` and ``tpmid reset``: field operation.

Each command is one library call (:mod:`tpmid.lifecycle.status`,
:mod:`tpmid.lifecycle.check`); this module parses arguments, wires the TPM and
the clock, and renders the result. See ``docs/cli.md`` (sections ``status``,
``check``, ``reset``) and ``docs/field-operation.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tpmid._cli import add_json_flag
from tpmid._cli.context import Ctx
from tpmid.clock import utcnow
from tpmid.errors import TpmidError
from tpmid.render import describe_age, iso

if TYPE_CHECKING:
    from tpmid.lifecycle.check import CheckResult
    from tpmid.lifecycle.reset import ResetItem
    from tpmid.lifecycle.status import IdentityStatus

EXIT_FAILED_CHECK = 1  # a check failed, or reset has something to do and no --yes


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status``, ``check`` and ``reset``."""
    p = sub.add_parser(
        "status", help="per-identity certificate, renewal and key status (no TPM needed)",
        description="Show each identity's state (ok, renew-due, expired, missing, "
        "not-yet-valid, damaged), certificate, next renewal, key placement, last attempt and "
        "work in flight. Reads the store only: works while the daemon holds the TPM. Exits 1 "
        "when an identity's current version is damaged.")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these identities")
    add_json_flag(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "check", help="check TPM, keys, certificates, EST servers, clock and permissions",
        description="Run every check a working device must pass: TPM reachable, keys present "
        "with the expected attributes, certificates valid, chained and matching their keys, "
        "EST servers reachable and trusted, clock plausible, config and key directories "
        "private. Exit 0 when all pass, 1 otherwise.")
    p.add_argument("--no-est", action="store_true",
                   help="skip the EST server checks (no network traffic)")
    add_json_flag(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "reset", help="remove issued identities from the store, to enroll from scratch",
        description="Remove the stored certificates, key files, journal and attempt state "
        "of NAME (default: every identity). Sealed secrets (tpmid secret) are never removed. "
        "IDevIDs (persistent or ek-derived keys) are kept "
        "unless --include-idevid, which also evicts a persistent IDevID key. Without --yes "
        "only lists what would be removed and exits 1. Stop the daemon first.")
    p.add_argument("names", nargs="*", metavar="NAME", help="identities to reset (default: all)")
    p.add_argument("--yes", action="store_true", help="really remove")
    p.add_argument("--include-idevid", action="store_true",
                   help="also remove IDevIDs and evict a persistent IDevID key from the TPM")
    add_json_flag(p)
    p.set_defaults(func=cmd_reset)


# --------------------------------------------------------------------------- status


def _status_block(s: IdentityStatus, now: datetime) -> str:
    rows: list[tuple[str, str]] = []
    if s.subject is not None:
        rows += [("subject", s.subject), ("issuer", s.issuer or "?"),
                 ("serial", f"{s.serial} (version {s.version})")]
        assert s.not_before is not None and s.not_after is not None
        ends = "expired" if s.not_after <= now else "expires"
        rows.append(("valid", f"{iso(s.not_before)} .. {iso(s.not_after)} "
                              f"({s.lifetime_elapsed or 0:.0f}% elapsed, {ends} "
                              f"{describe_age(s.not_after, now)})"))
    renewal = s.next_renewal_text()
    if s.next_renewal is not None and s.next_renewal.action in ("renew-at", "retry-at"):
        renewal += f" [{describe_age(s.next_renewal.when, now)}]"
    rows.append(("next renewal", renewal))
    key = s.key_description
    if s.key_path is not None:
        key += f", {s.key_path}"
    rows.append(("key", key))
    if s.public_key_sha256:
        rows.append(("public key", f"SHA-256 {s.public_key_sha256}"))
    if s.attempt is not None and s.attempt.last_attempt is not None:
        a = s.attempt
        last = s.attempt.last_attempt
        when = f"{iso(last)} ({describe_age(last, now)})"
        if a.last_error:
            rows.append(("last attempt", f"{when} FAILED ({a.failures} failure"
                                         f"{'s' if a.failures != 1 else ''}): {a.last_error}"))
        elif a.retry_after is not None:
            rows.append(("last attempt", f"{when} pending, server Retry-After "
                                         f"{a.retry_after:g} s"))
        else:
            rows.append(("last attempt", f"{when} succeeded"))
    if s.pending is not None:
        p = s.pending
        extra = f", server Retry-After {p.retry_after:g} s" if p.retry_after is not None else ""
        since = f" since {iso(p.started)}" if p.started else ""
        rows.append(("in flight", f"{p.operation} ({p.method or '?'}), phase {p.phase}"
                                  f"{extra}{since}"))
    if s.problem:
        rows.append(("problem", s.problem))
    if s.hint and (s.problem or s.state in ("missing", "damaged")):
        rows.append(("hint", s.hint))
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{s.name}: {s.state}"]
    lines += [f"  {k + ':':<{width}} {v}" for k, v in rows]
    return "\n".join(lines)


def cmd_status(ctx: Ctx) -> int:
    """``tpmid status [NAME ...]``."""
    from tpmid.lifecycle.status import collect_status

    rt = ctx.runtime()
    cfg = rt.config
    now = utcnow()
    records = collect_status(cfg, rt.existing_store(), now=now, names=ctx.args.names)
    data = {"now": iso(now), "store": str(cfg.store.dir),
            "identities": [r.to_json() for r in records]}

    def human(_: Any) -> str:
        if not records:
            return f"{cfg.source}: no identities configured"
        return "\n\n".join(_status_block(r, now) for r in records)

    ctx.emit(data, human)
    return EXIT_FAILED_CHECK if any(r.state == "damaged" for r in records) else 0


# --------------------------------------------------------------------------- check


def render_checks(results: Sequence[CheckResult]) -> str:
    """One line per check (✔ ok / ✘ FAIL / - skip), hints indented below, a summary last."""
    lines: list[str] = []
    for r in results:
        mark = "✔ ok  " if r.ok else ("- skip" if r.skipped else "✘ FAIL")
        lines.append(f"{mark}  {r.name}: {r.detail}")
        if r.hint and not r.ok:
            lines.append(f"          hint: {r.hint}")
    failed = sum(1 for r in results if not r.ok and not r.skipped)
    skipped = sum(1 for r in results if r.skipped)
    if failed or skipped:
        lines.append(f"\n{failed} of {len(results)} checks failed"
                     + (f", {skipped} skipped" if skipped else ""))
    else:
        lines.append(f"\nall {len(results)} checks passed")
    return "\n".join(lines)


def cmd_check(ctx: Ctx) -> int:
    """``tpmid check``: exit 0 when everything passes, 1 otherwise."""
    from tpmid.lifecycle.check import all_passed, run_checks
    from tpmid.wiring.est import fetch_cacerts
    from tpmid.wiring.tpm import tpm_opener

    # Required (the file exists, so its permissions can be checked), and loaded even
    # when insecure: check reports that as a failed check instead of refusing.
    cfg = ctx.config(refuse_insecure=False)
    rt = ctx.runtime()
    results = run_checks(cfg, open_store=rt.existing_store, open_tpm=tpm_opener(rt),
                         now=utcnow(), config_path=ctx.config_path,
                         fetch_cacerts=None if ctx.args.no_est else fetch_cacerts)
    if cfg.pkcs11 is not None:
        from tpmid.lifecycle.pkcs11 import token_checks
        from tpmid.wiring.pkcs11 import token_mirror

        mirror = token_mirror(rt)
        assert mirror is not None
        try:
            store = rt.existing_store()
        except TpmidError:
            store = None
        results += token_checks(mirror, store)
    ctx.emit([r.to_json() for r in results], lambda _: render_checks(results))
    return 0 if all_passed(results) else EXIT_FAILED_CHECK


# --------------------------------------------------------------------------- reset


def _reset_line(item: ResetItem) -> str:
    what: list[str] = []
    if item.versions:
        what.append(f"certificate version{'s' if len(item.versions) > 1 else ''} "
                    f"{', '.join(item.versions)}")
    if item.pending:
        what.append(item.pending)
    what += [str(p) for p in item.paths]
    if item.evict_handle is not None:
        what.append(f"persistent key {item.evict_handle:#010x} in the TPM")
    text = f"  {item.name}: " + ("; ".join(what) or "nothing stored")
    if item.note:
        text += f"\n    ({item.note})"
    return text


def _reset_text(sealed: list[str], items: Sequence[ResetItem], applied: bool) -> str:
    remove = [i for i in items if i.action == "remove"]
    keep = [i for i in items if i.action == "keep"]
    lines: list[str] = []
    if applied:
        for i in remove:
            lines.append(f"reset {i.name}: " + ("; ".join(i.done) or "nothing to do"))
    elif remove:
        lines.append("tpmid reset would remove:")
        lines += [_reset_line(i) for i in remove]
    else:
        lines.append("nothing to remove")
    if keep:
        lines.append("kept:")
        lines += [f"  {i.name}: {i.note}" for i in keep]
    if sealed:
        lines.append(f"sealed secrets are never reset: {', '.join(sealed)} kept "
                     "(`tpmid secret remove` deletes one)")
    if remove and not applied:
        lines.append("re-run with --yes to remove them (stop the daemon first: "
                     "systemctl stop tpmid)")
    return "\n".join(lines)


def cmd_reset(ctx: Ctx) -> int:
    """``tpmid reset [--yes] [--include-idevid] [NAME ...]``."""
    from tpmid.lifecycle.reset import apply_reset, plan_reset
    from tpmid.wiring.tpm import tpm_opener

    rt = ctx.runtime()
    cfg = rt.config
    store = rt.existing_store()
    items = plan_reset(cfg, store, ctx.args.names, include_idevid=ctx.args.include_idevid)
    # Sealed secrets (<store>/sealed) are the device's bootstrap credentials, not identities.
    sealed = rt.sealed_secrets().names()
    to_remove = any(i.action == "remove" for i in items)
    if not ctx.args.yes or not to_remove:
        ctx.emit({"applied": False, "identities": [i.to_json() for i in items],
                  "sealed_secrets_kept": sealed},
                 lambda _: _reset_text(sealed, items, applied=False))
        return EXIT_FAILED_CHECK if to_remove else 0
    done = apply_reset(cfg, store, items, open_tpm=tpm_opener(rt))
    ctx.emit({"applied": True, "identities": [i.to_json() for i in done],
              "sealed_secrets_kept": sealed},
             lambda _: _reset_text(sealed, done, applied=True))
    return 0
