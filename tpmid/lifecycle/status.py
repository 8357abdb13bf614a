"""What ``tpmid status`` knows about each identity, read from the store.

:func:`collect_status` builds one :class:`IdentityStatus` per configured identity
from the config, the store (current certificate, attempt state, journal) and the
renewal policy (:func:`~tpmid.lifecycle.plan.plan_renewal`). It never opens the
TPM and never writes: status must work while the daemon holds the TPM (no
resource manager) and on a read-only root file system.

The state of an identity, in order of precedence:

``damaged``        the current version cannot be read (certificate or key file truncated
                   or missing, or the current link lost while versions exist); the next
                   ``tpmid renew`` or the daemon falls back to the newest intact version
                   or enrolls again (``tpmid status`` exits 1)
``missing``        no current certificate in the store (never enrolled, or reset)
``not-yet-valid``  now < notBefore (RFC 5280 §4.1.2.5)
``expired``        now > notAfter
``renew-due``      an auto-renewed identity whose renewal is due now or is being
                   retried (the policy answers ``renew-now`` or ``retry-at``)
``ok``             otherwise
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes

from tpmid.certfiles import spki_sha256
from tpmid.config import Config
from tpmid.errors import StoreError, TpmidError
from tpmid.lifecycle.plan import managed_identities, plan_renewal
from tpmid.policy import AttemptState, Decision
from tpmid.render import format_duration, iso
from tpmid.render import name as render_name
from tpmid.render import serial as render_serial
from tpmid.store import JournalEntry, Store, StoredIdentity
from tpmid.tpm.identity import identity_key

log = logging.getLogger(__name__)

State = Literal["ok", "renew-due", "expired", "missing", "not-yet-valid", "damaged"]
STATES: tuple[str, ...] = ("ok", "renew-due", "expired", "missing", "not-yet-valid", "damaged")


def _iso(t: datetime | None) -> str | None:
    return iso(t) if t is not None else None


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class IdentityStatus:
    """Everything ``tpmid status`` shows about one identity (no secrets, no TPM access)."""

    name: str
    state: State
    auto_renew: bool
    key_kind: str
    key_description: str
    key_handle: int | None = None
    key_template: str | None = None
    key_alg: str | None = None
    key_path: Path | None = None
    version: str | None = None
    cert_path: Path | None = None
    subject: str | None = None
    issuer: str | None = None
    serial: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    lifetime_elapsed: float | None = None  # percent, 0..100
    public_key_sha256: str | None = None
    cert_sha256: str | None = None
    next_renewal: Decision | None = None  # None: not auto-renewed ("n/a")
    attempt: AttemptState | None = None  # None: no attempt recorded
    pending: JournalEntry | None = None
    problem: str | None = None
    hint: str | None = None

    def next_renewal_text(self) -> str:
        """The next renewal in words (``n/a`` for identities tpmid does not renew)."""
        d = self.next_renewal
        if d is None:
            if not self.auto_renew:
                return "n/a (not renewed automatically)"
            return "due now (not enrolled yet)" if self.state == "missing" else "unknown"
        if d.action == "renew-now":
            return f"now ({d.reason})"
        if d.action == "retry-at":
            return f"retry at {iso(d.when)} ({d.reason})"
        if d.action == "wait-for-clock":
            return (f"waiting for a plausible clock ({d.reason}; not before {iso(d.when)}), "
                    "keeping the current certificate")
        jitter = f", jitter -{format_duration(d.jitter_s)}" if d.jitter_s else ""
        return f"{iso(d.when)} ({d.reason}{jitter})"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (times as ISO 8601 UTC, serial as hex)."""
        d = self.next_renewal
        a = self.attempt
        p = self.pending
        return {
            "name": self.name,
            "state": self.state,
            "auto_renew": self.auto_renew,
            "key": {
                "kind": self.key_kind,
                "description": self.key_description,
                "handle": f"{self.key_handle:#010x}" if self.key_handle is not None else None,
                "template": self.key_template,
                "alg": self.key_alg,
                "path": str(self.key_path) if self.key_path else None,
            },
            "version": self.version,
            "cert_path": str(self.cert_path) if self.cert_path else None,
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_before": _iso(self.not_before),
            "not_after": _iso(self.not_after),
            "lifetime_elapsed_percent": (round(self.lifetime_elapsed, 2)
                                         if self.lifetime_elapsed is not None else None),
            "public_key_sha256": self.public_key_sha256,
            "cert_sha256": self.cert_sha256,
            "next_renewal": None if d is None else {
                "action": d.action, "when": iso(d.when), "reason": d.reason,
                "jitter_s": d.jitter_s, "text": self.next_renewal_text(),
            },
            "last_attempt": None if a is None else {
                "time": _iso(a.last_attempt), "error": a.last_error, "failures": a.failures,
                "retry_after": a.retry_after,
            },
            "pending": None if p is None else {
                "operation": p.operation, "phase": p.phase, "method": p.method,
                "version": p.version, "key_ref": p.key_ref, "retry_after": p.retry_after,
                "started": _iso(p.started), "updated": _iso(p.updated),
            },
            "problem": self.problem,
            "hint": self.hint,
        }


def _state(cert: StoredIdentity, now: datetime, decision: Decision | None) -> State:
    if now < cert.not_before:
        return "not-yet-valid"
    if now > cert.not_after:
        return "expired"
    if decision is not None and decision.action in ("renew-now", "retry-at"):
        return "renew-due"
    return "ok"


def _elapsed(cert: StoredIdentity, now: datetime) -> float:
    total = (cert.not_after - cert.not_before).total_seconds()
    if total <= 0:
        return 100.0
    done = (now - cert.not_before).total_seconds()
    return min(100.0, max(0.0, 100.0 * done / total))


def identity_status(config: Config, store: Store | None, name: str, now: datetime,
                    managed: Sequence[str]) -> IdentityStatus:
    """The status of identity ``name`` at ``now`` (``store`` None: nothing enrolled yet)."""
    ident = config.identity(name)
    facts = identity_key(ident).facts()
    base: dict[str, Any] = {
        "name": name, "auto_renew": name in managed, "key_kind": facts["kind"],
        "key_description": facts["description"], "key_handle": identity_key(ident).handle,
        "key_template": facts["template"], "key_alg": facts["alg"],
    }
    if store is None:
        return IdentityStatus(state="missing", problem="the store directory "
                              f"{config.store.dir} does not exist yet",
                              hint=f"enroll it: tpmid enroll {name}", **base)
    problems: list[str] = []
    hint: str | None = None
    attempt = store.load_state(name)
    if attempt.last_attempt is not None:
        base["attempt"] = attempt
    try:
        base["pending"] = store.journal_get(name)
    except StoreError as e:
        problems.append(e.message)
        hint = e.hint
    damage = store.load_damage(name)
    if damage is not None:
        problems.append(_damage_text(damage))
    try:
        cert = store.current(name)
    except StoreError as e:
        return _damaged(store, name, [*problems, e.message], base)
    if cert is None and store.versions(name):
        return _damaged(store, name, [*problems, "the current link is missing"], base)
    decision: Decision | None = None
    if name in managed:
        try:
            decision = plan_renewal(config, store, name, now)
        except TpmidError as e:
            problems.append(f"cannot plan the renewal: {e.message}")
    if cert is None:
        return IdentityStatus(
            state="missing", next_renewal=decision, problem="; ".join(problems) or None,
            hint=hint or (f"enroll it: tpmid enroll {name}" if ident.est else
                          "no est section: this identity is provisioned at the factory "
                          "(tpmid provision)"),
            **base)
    c = cert.cert
    if cert.key_file is not None:
        base["key_path"] = cert.key_file
    return IdentityStatus(
        state=_state(cert, now, decision),
        version=cert.version,
        cert_path=cert.cert_path,
        subject=render_name(c.subject),
        issuer=render_name(c.issuer),
        serial=f"{render_serial(c.serial_number)}",
        not_before=cert.not_before,
        not_after=cert.not_after,
        lifetime_elapsed=_elapsed(cert, now),
        public_key_sha256=spki_sha256(c.public_key()),
        cert_sha256=c.fingerprint(hashes.SHA256()).hex(),
        next_renewal=decision,
        problem="; ".join(problems) or None,
        hint=hint,
        **base,
    )


def _damage_text(d: dict[str, str | None]) -> str:
    fell = (f"version {d['fell_back_to']} is current instead" if d.get("fell_back_to")
            else "no intact version was left: enrolling again")
    return (f"version {d.get('version')} was found damaged at {d.get('at')} "
            f"({d.get('problem')}); {fell} (check the disk)")


def _damaged(store: Store, name: str, problems: list[str],
             base: dict[str, Any]) -> IdentityStatus:
    """An identity whose current version cannot be used (see the module docstring)."""
    try:
        fallback = store.newest_intact(name)
    except StoreError:
        fallback = None
    then = (f"version {fallback}, the newest intact one, becomes current" if fallback
            else "no intact version is left: it enrolls again through its bootstrap identity")
    return IdentityStatus(
        state="damaged", problem="; ".join(problems),
        hint=f"tpmid renew {name} (or the daemon) repairs it: {then}", **base)


def collect_status(config: Config, store: Store | None, *, now: datetime,
                   names: Sequence[str] | None = None) -> list[IdentityStatus]:
    """One :class:`IdentityStatus` per identity (all configured ones, or ``names``).

    ``store`` is None when its directory does not exist yet. Reads the store
    only (no TPM, no network, no writes). Raises ConfigError for an unknown name.
    """
    wanted = list(names) if names else list(config.identities)
    for n in wanted:
        config.identity(n)  # ConfigError listing the configured names
    managed = managed_identities(config)
    return [identity_status(config, store, n, now, managed) for n in wanted]
