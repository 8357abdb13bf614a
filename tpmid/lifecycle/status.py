"""What ``tpmid status`` and ``tpmid reset`` know about each identity, read from the store.

:func:`collect_status` builds one :class:`IdentityStatus` per configured identity
from the config, the store (current certificate, attempt state, journal) and the
renewal policy (:meth:`RenewalEngine.plan <tpmid.lifecycle.renew.RenewalEngine.plan>`).
It never opens the TPM and never writes: status must work while the daemon holds
the TPM (no resource manager) and on a read-only root file system.

:func:`plan_reset` / :func:`apply_reset` are ``tpmid reset``: they remove issued
identities from the store (certificates, key files, journal, attempt state) under
the identity lock, so that the next enrollment starts from nothing, as the IoT
Edge walkthrough's "To restart" does by deleting ``certd/certs`` and
``keyd/keys``. The IDevID (``kind: persistent`` or ``ek-derived``) is the
device's birth certificate and is kept unless explicitly included.

The state of an identity, in order of precedence:

``missing``        no current certificate in the store (never enrolled, or reset)
``not-yet-valid``  now < notBefore (RFC 5280 §4.1.2.5)
``expired``        now > notAfter
``renew-due``      an auto-renewed identity whose renewal is due now or is being
                   retried (the policy answers ``renew-now`` or ``retry-at``)
``ok``             otherwise
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tpmid.config import Config, IdentityConfig
from tpmid.errors import StoreError, TpmError, TpmidError
from tpmid.est.verify import spki_der
from tpmid.policy import AttemptState, Decision, format_duration

if TYPE_CHECKING:
    from cryptography import x509

    from tpmid.store import JournalEntry, Store, StoredIdentity
    from tpmid.tpm.connection import TpmConnection

log = logging.getLogger(__name__)

State = Literal["ok", "renew-due", "expired", "missing", "not-yet-valid"]
STATES: tuple[str, ...] = ("ok", "renew-due", "expired", "missing", "not-yet-valid")

TpmOpener = Callable[[], AbstractContextManager["TpmConnection"]]

# How long `tpmid reset` waits for an identity lock held by a renewal in progress.
RESET_LOCK_TIMEOUT_S = 30.0


def iso(t: datetime | None) -> str | None:
    """``2026-11-27T04:42:13Z`` (UTC, seconds), or None."""
    if t is None:
        return None
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def is_idevid(ident: IdentityConfig) -> bool:
    """True for a birth identity: its key lives in the endorsement hierarchy (TCG DevID §7.3)."""
    return ident.key.kind in ("persistent", "ek-derived")


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 (hex) of the certificate's SubjectPublicKeyInfo DER: the public-key fingerprint."""
    return hashlib.sha256(spki_der(cert.public_key())).hexdigest()


def open_store(config: Config) -> Store | None:
    """The config's store for reading, or None if its directory does not exist yet.

    Never creates anything. Raises StoreError if the store is unsafe (writable by
    group or others): tpmid refuses to trust what such a directory holds.
    """
    from tpmid.store import Store

    root = Path(config.store.dir)
    if not root.is_dir():
        return None
    return Store(root, create=False)


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
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "lifetime_elapsed_percent": (round(self.lifetime_elapsed, 2)
                                         if self.lifetime_elapsed is not None else None),
            "public_key_sha256": self.public_key_sha256,
            "cert_sha256": self.cert_sha256,
            "next_renewal": None if d is None else {
                "action": d.action, "when": iso(d.when), "reason": d.reason,
                "jitter_s": d.jitter_s, "text": self.next_renewal_text(),
            },
            "last_attempt": None if a is None else {
                "time": iso(a.last_attempt), "error": a.last_error, "failures": a.failures,
                "retry_after": a.retry_after,
            },
            "pending": None if p is None else {
                "operation": p.operation, "phase": p.phase, "method": p.method,
                "version": p.version, "key_ref": p.key_ref, "retry_after": p.retry_after,
                "started": iso(p.started), "updated": iso(p.updated),
            },
            "problem": self.problem,
            "hint": self.hint,
        }


def _key_fields(ident: IdentityConfig) -> dict[str, Any]:
    k = ident.key
    out: dict[str, Any] = {"key_kind": k.kind, "key_description": k.describe()}
    if k.kind == "persistent":
        out["key_handle"] = k.handle
    if k.kind in ("persistent", "ek-derived"):
        from tpmid.tpm.keys import IDEVID_TEMPLATE_ALGS

        out["key_template"] = k.template
        out["key_alg"] = IDEVID_TEMPLATE_ALGS.get(k.template)
    else:
        out["key_alg"] = k.alg
    return out


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


def _unused_tpm() -> AbstractContextManager[TpmConnection]:
    # plan() never opens the TPM; status must not need it (it may be busy or absent).
    raise TpmError("tpmid status does not use the TPM")


def _unused_secret(_ref: Any) -> str:
    raise TpmError("tpmid status does not use secrets")


def identity_status(config: Config, store: Store | None, name: str, now: datetime,
                    managed: Sequence[str]) -> IdentityStatus:
    """The status of identity ``name`` at ``now`` (``store`` None: nothing enrolled yet)."""
    ident = config.identity(name)
    base: dict[str, Any] = {"name": name, "auto_renew": name in managed, **_key_fields(ident)}
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
    try:
        cert = store.current(name)
    except StoreError as e:
        return IdentityStatus(state="missing", problem="; ".join([*problems, e.message]),
                              hint=e.hint or hint, **base)
    decision: Decision | None = None
    if name in managed:
        from tpmid.lifecycle.renew import RenewalEngine

        engine = RenewalEngine(config=config, store=store, open_tpm=_unused_tpm,
                               secrets=_unused_secret, now=lambda: now)
        try:
            decision = engine.plan(name, now)
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
        subject=c.subject.rfc4514_string(),
        issuer=c.issuer.rfc4514_string(),
        serial=f"{c.serial_number:x}",
        not_before=cert.not_before,
        not_after=cert.not_after,
        lifetime_elapsed=_elapsed(cert, now),
        public_key_sha256=spki_sha256(c),
        cert_sha256=c.fingerprint(_sha256()).hex(),
        next_renewal=decision,
        problem="; ".join(problems) or None,
        hint=hint,
        **base,
    )


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def collect_status(config: Config, *, now: datetime,
                   names: Sequence[str] | None = None) -> list[IdentityStatus]:
    """One :class:`IdentityStatus` per identity (all configured ones, or ``names``).

    Reads the store only (no TPM, no network, no writes). Raises ConfigError for
    an unknown name and StoreError when the store itself is unsafe or unreadable.
    """
    from tpmid.lifecycle.renew import managed_identities

    wanted = list(names) if names else list(config.identities)
    for n in wanted:
        config.identity(n)  # ConfigError listing the configured names
    store = open_store(config)
    managed = managed_identities(config)
    return [identity_status(config, store, n, now, managed) for n in wanted]


# --------------------------------------------------------------------------- reset


@dataclass(frozen=True)
class ResetItem:
    """What ``tpmid reset`` does (or would do) to one identity.

    ``action``: ``remove`` (store entries, maybe a persistent key), ``keep`` (an
    IDevID without ``--include-idevid``) or ``nothing`` (nothing stored).
    """

    name: str
    action: Literal["remove", "keep", "nothing"]
    paths: tuple[Path, ...] = ()
    versions: tuple[str, ...] = ()
    pending: str | None = None
    evict_handle: int | None = None
    note: str = ""
    done: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "action": self.action,
            "paths": [str(p) for p in self.paths],
            "versions": list(self.versions),
            "pending": self.pending,
            "evict_handle": f"{self.evict_handle:#010x}" if self.evict_handle is not None
            else None,
            "note": self.note,
            "done": list(self.done),
        }


def _stored_paths(root: Path, name: str) -> tuple[Path, ...]:
    # The layout of docs/store-and-renewal.md; Store.remove_identity deletes exactly these.
    candidates = (root / "certs" / name, root / "keys" / name,
                  root / "journal" / f"{name}.json", root / "state" / f"{name}.json")
    return tuple(p for p in candidates if os.path.lexists(p))


def plan_reset(config: Config, names: Sequence[str] = (), *,
               include_idevid: bool = False) -> list[ResetItem]:
    """What ``tpmid reset [NAME ...]`` would remove; changes nothing.

    Without ``names``, every configured identity. IDevIDs (``kind: persistent`` /
    ``ek-derived``) are kept unless ``include_idevid``, which also evicts a
    persistent IDevID key (``key.handle``) from the TPM.
    """
    wanted = list(dict.fromkeys(names)) if names else list(config.identities)
    for n in wanted:
        config.identity(n)
    store = open_store(config)
    items: list[ResetItem] = []
    for name in wanted:
        ident = config.identity(name)
        if is_idevid(ident) and not include_idevid:
            items.append(ResetItem(
                name, "keep",
                note=f"IDevID ({ident.key.describe()}): the device's birth identity is kept; "
                "--include-idevid removes it too"))
            continue
        paths: tuple[Path, ...] = ()
        versions: tuple[str, ...] = ()
        pending = None
        if store is not None:
            paths = _stored_paths(store.root, name)
            versions = tuple(store.versions(name))
            with contextlib.suppress(StoreError):
                entry = store.journal_get(name)
                if entry is not None:
                    pending = f"{entry.operation} in flight (phase {entry.phase})"
        evict = ident.key.handle if ident.key.kind == "persistent" else None
        note = ""
        if ident.key.kind == "persistent":
            note = (f"evicts the persistent IDevID key {ident.key.handle:#010x} (if present); "
                    "every certificate for it becomes useless")
        elif ident.key.kind == "ek-derived":
            note = ("the ek-derived key itself cannot be removed: the TPM re-creates it from "
                    "the endorsement seed")
        if not paths and evict is None:
            items.append(ResetItem(name, "nothing", note="nothing stored"))
            continue
        items.append(ResetItem(name, "remove", paths=paths, versions=versions, pending=pending,
                               evict_handle=evict, note=note))
    return items


def _release_key_ref(tpm: TpmConnection, name: str, key_ref: str) -> str:
    """Evict the TPM object a journal entry created (``persistent:0x81000010``)."""
    from tpmid.tpm.keys import evict_persistent

    kind, _, value = key_ref.partition(":")
    if kind != "persistent":
        raise StoreError(f"{name}: the renewal in flight holds TPM object {key_ref!r}, which "
                         "tpmid reset does not know how to release",
                         hint="release it with tpm2-tools, then run tpmid reset again")
    try:
        handle = int(value, 0)
    except ValueError:
        raise StoreError(f"{name}: journal names an unreadable TPM object {key_ref!r}") from None
    if handle not in tpm.persistent_handles():
        return f"TPM object {key_ref} was already gone"
    evict_persistent(tpm, handle)
    return f"evicted {key_ref} (key of the renewal in flight)"


@contextlib.contextmanager
def _maybe_tpm(needed: bool, open_tpm: TpmOpener | None) -> Iterator[TpmConnection | None]:
    if not needed:
        yield None
        return
    if open_tpm is None:
        raise TpmError("tpmid reset needs the TPM to evict a key, but no TPM was given")
    with open_tpm() as tpm:
        yield tpm


def apply_reset(config: Config, items: Sequence[ResetItem], *,
                open_tpm: TpmOpener | None = None,
                lock_timeout: float = RESET_LOCK_TIMEOUT_S) -> list[ResetItem]:
    """Remove what ``items`` (from :func:`plan_reset`) list; return them with ``done`` filled.

    Each identity is removed under its identity lock (waiting up to
    ``lock_timeout`` for a renewal in progress). The TPM is opened first, only if
    a key must be evicted, so an unreachable TPM fails before anything is removed.
    Store entries go before the key: a failed eviction is repaired by running
    the reset again.
    """
    store = open_store(config)
    todo = [i for i in items if i.action == "remove"]
    needs_tpm = any(i.evict_handle is not None for i in todo)
    if store is not None and not needs_tpm:
        # A journal entry holding a non-file TPM object also needs the TPM (docs:
        # Store.remove_identity: release key_ref first).
        for i in todo:
            with contextlib.suppress(StoreError):
                entry = store.journal_get(i.name)
                if entry is not None and entry.key_ref:
                    needs_tpm = True
    out: list[ResetItem] = []
    with _maybe_tpm(needs_tpm, open_tpm) as tpm:
        for item in items:
            if item.action != "remove":
                out.append(item)
                continue
            done: list[str] = []
            lock = (store.identity_lock(item.name, timeout=lock_timeout) if store is not None
                    else contextlib.nullcontext())
            with lock:
                if store is not None:
                    try:
                        entry = store.journal_get(item.name)
                    except StoreError:
                        entry = None  # unreadable: removed below like everything else
                    if entry is not None and entry.key_ref:
                        assert tpm is not None
                        done.append(_release_key_ref(tpm, item.name, entry.key_ref))
                    existing = _stored_paths(store.root, item.name)
                    store.remove_identity(item.name)
                    done += [f"removed {p}" for p in existing]
                if item.evict_handle is not None:
                    from tpmid.tpm.keys import evict_persistent

                    assert tpm is not None
                    if item.evict_handle in tpm.persistent_handles():
                        evict_persistent(tpm, item.evict_handle)
                        done.append(f"evicted the persistent key {item.evict_handle:#010x}")
                    else:
                        done.append(f"no key at {item.evict_handle:#010x} to evict")
            log.info("reset %s: %s", item.name, "; ".join(done) or "nothing to do")
            out.append(ResetItem(item.name, item.action, paths=item.paths,
                                 versions=item.versions, pending=item.pending,
                                 evict_handle=item.evict_handle, note=item.note,
                                 done=tuple(done)))
    return out


def describe_age(t: datetime, now: datetime) -> str:
    """``in 3d4h`` / ``5min ago`` relative to ``now``."""
    delta = (t - now).total_seconds()
    if abs(delta) < 1:
        return "now"
    text = format_duration(abs(delta))
    return f"in {text}" if delta > 0 else f"{text} ago"
