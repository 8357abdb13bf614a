"""When each identity renews, read from the store alone (no TPM, no network).

:func:`plan_renewal` is what ``tpmid status``, ``tpmid renew --dry-run`` and the
renewal engine (:mod:`tpmid.lifecycle.renew`) ask: the next event of an
identity, from its certificate, its attempt state and the journal's work in
flight, through the pure policy (:func:`tpmid.policy.decide`).
:func:`managed_identities` is the order the daemon keeps them in. A module of
its own so that commands that only read (``status``) import no EST, TLS or TPM
code.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from tpmid.clock import as_utc
from tpmid.config import Config, IdentityConfig
from tpmid.errors import StoreError
from tpmid.policy import AttemptState, Decision, clamp_retry_after, decide, jitter_rng, last_chance
from tpmid.store import Store, StoredIdentity
from tpmid.tpm.identity import identity_key

# Retry interval for an identity that has never been enrolled and whose retry is
# given as a share of a lifetime it does not have yet.
UNENROLLED_RETRY_S = 300.0


def managed_identities(config: Config) -> list[str]:
    """Identities the daemon keeps renewed, each after the one it authenticates with."""
    names = [n for n, i in config.identities.items()
             if i.est is not None and identity_key(i).renewable]
    ordered: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in ordered or name in seen:
            return
        ident = config.identities[name]
        dep = ident.est.auth.client if ident.est else None
        if dep in names:
            visit(dep, (*seen, name))
        ordered.append(name)

    for n in names:
        visit(n, ())
    return ordered


def plan_renewal(config: Config, store: Store, name: str, now: datetime, *,
                 attempt: AttemptState | None = None) -> Decision:
    """The next event for ``name``; a missing certificate is due now (spaced by retry).

    Reads the store only (certificate, attempt state, journal): ``tpmid status``
    calls it too, without a TPM or a network. ``attempt`` overrides the stored
    attempt state (the engine's, when the store could not record it).
    """
    ident = config.identity(name)
    if attempt is None:
        attempt = store.load_state(name)
    try:
        current = store.current(name)
    except StoreError as e:
        # Damaged (recovery repairs it at the start of the renewal), spaced by the
        # retry schedule in case the repair itself keeps failing.
        d = _plan_unenrolled(ident, attempt, now)
        return Decision(d.action, d.when, f"the current version is damaged: {e.message}")
    if current is None:
        regular = _plan_unenrolled(ident, attempt, now)
    else:
        regular = decide(
            not_before=current.not_before, not_after=current.not_after, now=now,
            policy=ident.renew, attempt=attempt,
            rng=jitter_rng(name, current.cert.serial_number),
        )
    in_flight = _in_flight(store, name, now, current)
    if in_flight is None:
        return regular
    if in_flight.action == "renew-now" and attempt.retrying and regular.action == "retry-at":
        # The work in flight failed again a moment ago (server down?): resume it on the
        # retry schedule, not in a loop.
        return Decision("retry-at", regular.when, f"{in_flight.reason}; {regular.reason}")
    return in_flight


def _in_flight(store: Store, name: str, now: datetime,
               current: StoredIdentity | None) -> Decision | None:
    """Work the journal kept (a CSR sent, or answered 202) is finished first.

    RFC 7030 §4.2.3: after 202 the same request is resent after Retry-After
    (clamped, and never later than the last chance before the current
    certificate expires). A request whose answer was lost (crash, power loss) is
    resent at once: the server may or may not have issued, and a second
    certificate for the same key is harmless while a half-done rotation is not.
    """
    entry = store.journal_get(name)
    if entry is None or not entry.csr_pem or entry.phase == "staged":
        return None
    if entry.phase == "pending" and entry.retry_after is not None and entry.updated:
        delay = clamp_retry_after(entry.retry_after)
        when = as_utc(entry.updated) + timedelta(seconds=delay)
        reason = f"request pending at the server, Retry-After {delay:g} s"
        if current is not None:
            chance = last_chance(current.not_before, current.not_after)
            if when > chance and as_utc(entry.updated) < chance:
                when, reason = chance, f"{reason}; last attempt before expiry"
            when = min(when, as_utc(current.not_after))
        if when > now:
            return Decision("retry-at", when, reason)
    return Decision("renew-now", now,
                    f"resuming the {entry.method} interrupted in phase {entry.phase}")


def _plan_unenrolled(ident: IdentityConfig, attempt: AttemptState, now: datetime) -> Decision:
    if attempt.last_attempt is None or not attempt.retrying:
        return Decision("renew-now", now, "not enrolled yet")
    last = as_utc(attempt.last_attempt)
    if attempt.retry_after is not None:
        delay = clamp_retry_after(attempt.retry_after)
        when = last + timedelta(seconds=delay)
        reason = f"server Retry-After {delay:g} s"
    else:
        r = ident.renew.retry
        delay = r.seconds if r.seconds is not None else UNENROLLED_RETRY_S
        when = last + timedelta(seconds=max(1.0, delay))
        reason = f"retry {delay:g} s after failed first enrollment"
    if when <= now:
        return Decision("renew-now", now, reason)
    return Decision("retry-at", when, reason)
