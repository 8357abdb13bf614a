"""The renewal policy: when does an identity renew next?

:func:`decide` is a pure function of the certificate's validity period, the
current time (passed in, never read), the identity's :class:`RenewConfig`, its
:class:`AttemptState` and a random source. It does no I/O, reads no clock and
never sleeps; the daemon (``lifecycle/daemon.py``) sleeps until
``Decision.when`` and calls it again.

Meaning of the configuration, identical to Azure IoT Edge's
``auto_renew = { threshold = "80%", retry = "4%" }`` so that configs translate
one to one:

* ``threshold: 80%`` — renew once 80 % of notBefore→notAfter has elapsed;
  ``threshold: 10min`` — renew 10 minutes before notAfter.
* ``retry: 4%`` — after a failed attempt, try again 4 % of the lifetime later;
  ``retry: 90s`` — try again 90 seconds later.

Beyond IoT Edge:

* ``jitter`` (default 2 % of the lifetime): the renewal moves a random amount
  *earlier* than the threshold, never later and never before notBefore, so a
  fleet issued in one batch does not hit the CA in the same second. The amount
  is drawn from ``rng``; :func:`jitter_rng` gives a generator seeded from the
  certificate, so every call for the same certificate yields the same time.
* A server ``Retry-After`` (RFC 7030 §4.2.3 with 202 Accepted; RFC 9110 §10.2.3
  with 503) replaces the retry interval: the server said when to come back.
* Retries never step past expiry: when the next retry would fall at or after
  notAfter, one last attempt is scheduled shortly before notAfter.
* An expired certificate renews now (the caller falls back to the bootstrap
  identity); repeated failures are still spaced by the retry interval.
* A clock that is obviously wrong (before :data:`RELEASE_DATE`, or more than
  :data:`CLOCK_SKEW` before the certificate's notBefore — a device without RTC
  right after boot) yields ``wait-for-clock``: no renewal, no discarding.

Naive datetimes are taken as UTC (what ``cryptography``'s legacy accessors return).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from tpmid.clock import as_utc
from tpmid.config import Amount, RenewConfig
from tpmid.render import format_duration

# No certificate this version of tpmid handles can be renewed before tpmid existed:
# a clock earlier than this is a device that booted without RTC and has no NTP yet.
RELEASE_DATE = datetime(2026, 11, 1, tzinfo=UTC)

# Tolerated difference between our clock and the CA's (notBefore slightly in the
# future is common: RFC 5280 §4.1.2.5 leaves it to the CA, many backdate a little,
# some do not).
CLOCK_SKEW = timedelta(minutes=5)

# Floor for any retry interval, so a 0% / 0s retry or Retry-After: 0 can never
# turn into a busy loop against the CA.
MIN_RETRY_S = 1.0

# A server's Retry-After is honoured up to this long; a larger (or absurd) value is
# clamped, and before expiry the retry is moved to the last chance in any case.
MAX_RETRY_AFTER_S = 86400.0

# A regular renewal never comes before this share of the lifetime has passed: a
# threshold longer than the lifetime (a CA that shortens lifetimes, a config written
# for longer certificates) must not make the daemon renew right after every renewal.
MIN_LIFETIME_SHARE = 0.5
# ... nor sooner than this after the last successful renewal, whatever the lifetime
# (a CA issuing certificates valid for a second).
MIN_RENEWAL_GAP_S = 5.0

# The last attempt before expiry happens this long before notAfter: 5 % of the
# lifetime, at most 5 minutes (enough for one EST round trip on a slow link).
LAST_CHANCE_FRACTION = 0.05
LAST_CHANCE_MAX_S = 300.0

Action = Literal["renew-now", "renew-at", "retry-at", "wait-for-clock"]


@dataclass(frozen=True)
class AttemptState:
    """What the store remembers about an identity's last renewal attempt.

    ``retry_after`` is the delay in seconds the server asked for with the last
    answer (RFC 7030 §4.2.3, RFC 9110 §10.2.3), counted from ``last_attempt``.
    """

    last_attempt: datetime | None = None
    last_error: str | None = None
    retry_after: float | None = None
    failures: int = 0
    # The identity's key can no longer be used (TPM2_Clear, another TPM): renew now,
    # through the bootstrap identity, with a new key. Cleared by a success.
    key_lost: bool = False

    @property
    def retrying(self) -> bool:
        """True when the last attempt did not produce a certificate."""
        return self.last_attempt is not None and (
            self.failures > 0 or self.last_error is not None or self.retry_after is not None
        )

    def failed(self, at: datetime, error: str, retry_after: float | None = None) -> AttemptState:
        """The state after an attempt at ``at`` failed with ``error`` (never a secret)."""
        return AttemptState(last_attempt=at, last_error=error, retry_after=retry_after,
                            failures=self.failures + 1, key_lost=self.key_lost)

    def lost_key(self) -> AttemptState:
        """The same state, noting that the identity's key can no longer be used."""
        return replace(self, key_lost=True)

    def pending(self, at: datetime, retry_after: float) -> AttemptState:
        """The state after the server answered 202 Accepted (not a failure)."""
        return replace(self, last_attempt=at, retry_after=retry_after, last_error=None)

    @staticmethod
    def succeeded(at: datetime) -> AttemptState:
        """The state after a certificate was committed at ``at``."""
        return AttemptState(last_attempt=at)


@dataclass(frozen=True)
class Decision:
    """The next event for one identity.

    ``when`` is aware UTC; for ``renew-now`` it equals the ``now`` passed to
    :func:`decide`; for ``wait-for-clock`` it is the earliest time the clock
    would be plausible. ``jitter_s`` is zero or negative (seconds earlier than
    the threshold).
    """

    action: Action
    when: datetime
    reason: str
    jitter_s: float = 0.0


# --------------------------------------------------------------------------- helpers


def _amount(a: Amount) -> str:
    return str(a) if a.fraction is not None else format_duration(a.seconds or 0.0)


def _threshold_text(policy: RenewConfig) -> str:
    t = policy.threshold
    return f"threshold {_amount(t)}" + (" before expiry" if t.fraction is None else "")


def _threshold_reason(policy: RenewConfig) -> str:
    t = policy.threshold
    if t.fraction is not None:
        return f"{_amount(t)} of lifetime"
    return f"{_amount(t)} before expiry"


def clamp_retry_after(seconds: float) -> float:
    """A server's Retry-After as a delay tpmid honours: within [MIN_RETRY_S, MAX_RETRY_AFTER_S].

    NaN, infinities and values beyond any integer (a hostile or broken server)
    end up at one of the bounds; none can reach a ``timedelta`` unbounded.
    """
    if not math.isfinite(seconds):
        return MAX_RETRY_AFTER_S if seconds > 0 else MIN_RETRY_S
    return min(max(seconds, MIN_RETRY_S), MAX_RETRY_AFTER_S)


def last_chance(not_before: datetime, not_after: datetime) -> datetime:
    """When the last attempt before expiry happens (5 % of the lifetime, at most 5 min before)."""
    lifetime_s = max((as_utc(not_after) - as_utc(not_before)).total_seconds(), 0.0)
    return as_utc(not_after) - timedelta(
        seconds=min(LAST_CHANCE_MAX_S, LAST_CHANCE_FRACTION * lifetime_s))


def _retry_due(attempt: AttemptState, policy: RenewConfig, lifetime_s: float,
               now: datetime, *, expired: bool = False) -> tuple[datetime, str]:
    """When the next attempt after a failed or pending one is due, and why.

    Once the certificate has expired the next attempt goes through the bootstrap
    identity, a new request: the old request's Retry-After no longer applies
    beyond the ordinary retry interval.
    """
    assert attempt.last_attempt is not None
    last = as_utc(attempt.last_attempt)
    if last > now + CLOCK_SKEW:
        # The clock went back past our own last attempt: its time tells us nothing.
        # One attempt now records a fresh last_attempt, so this cannot repeat.
        return now, "clock went back past the last attempt"
    interval = max(policy.retry.of(lifetime_s), MIN_RETRY_S)
    if attempt.retry_after is not None:
        delay = clamp_retry_after(attempt.retry_after)
        if expired:
            delay = min(delay, interval)
        return last + timedelta(seconds=delay), f"server Retry-After {delay:g} s"
    after = "failure" if attempt.failures <= 1 else f"{attempt.failures} failures"
    return last + timedelta(seconds=interval), f"retry {_amount(policy.retry)} after {after}"


# --------------------------------------------------------------------------- decide


def decide(
    *,
    not_before: datetime,
    not_after: datetime,
    now: datetime,
    policy: RenewConfig,
    attempt: AttemptState,
    rng: random.Random,
    earliest_plausible: datetime = RELEASE_DATE,
) -> Decision:
    """Decide the next renewal event for a certificate valid ``not_before``→``not_after``.

    Draws exactly one value from ``rng`` on every call, so a freshly seeded
    generator (:func:`jitter_rng`) gives the same answer each time.
    """
    nb, na, now = as_utc(not_before), as_utc(not_after), as_utc(now)
    u = rng.random()

    # 1. A clock we cannot believe decides nothing (devices without RTC at boot).
    plausible = as_utc(earliest_plausible)
    if now < plausible or now < nb - CLOCK_SKEW:
        reason = ("clock before tpmid's release" if now < plausible
                  else "clock before notBefore")
        return Decision("wait-for-clock", max(plausible, nb - CLOCK_SKEW), reason)

    lifetime_s = max((na - nb).total_seconds(), 0.0)
    retrying = attempt.retrying

    # 2. Expired (or never valid), or the key is lost: renew now, still spacing
    #    repeated attempts.
    if now >= na or lifetime_s <= 0 or attempt.key_lost:
        reason = ("expired" if now >= na else "empty validity period" if lifetime_s <= 0
                  else "its key can no longer be used (TPM cleared?)")
        if retrying:
            due, why = _retry_due(attempt, policy, lifetime_s, now, expired=True)
            if due > now:
                return Decision("retry-at", due, f"{reason}; {why}")
        elif attempt.last_attempt is not None:
            gap = as_utc(attempt.last_attempt) + timedelta(seconds=MIN_RENEWAL_GAP_S)
            if gap > now:
                return Decision("retry-at", gap, f"{reason}; renewed less than "
                                f"{MIN_RENEWAL_GAP_S:g} s ago")
        return Decision("renew-now", now, reason)

    # 3. The regular schedule: threshold, moved earlier by jitter, clamped to the lifetime.
    reason = _threshold_reason(policy)
    if policy.threshold.fraction is not None:
        threshold = nb + timedelta(seconds=policy.threshold.fraction * lifetime_s)
    else:
        threshold = na - timedelta(seconds=policy.threshold.seconds or 0.0)
    earliest = nb + timedelta(seconds=MIN_LIFETIME_SHARE * lifetime_s)
    if threshold < earliest:
        threshold = earliest
        reason = (f"{_threshold_text(policy)} is more than half of the "
                  f"{format_duration(lifetime_s)} lifetime; renewing at "
                  f"{MIN_LIFETIME_SHARE:.0%} of lifetime")
    threshold = min(threshold, na)
    window = max(policy.jitter.of(lifetime_s), 0.0)
    jitter_s = -min(u * window, (threshold - nb).total_seconds())
    renew_at = threshold + timedelta(seconds=jitter_s)
    jitter_s = jitter_s or 0.0  # no "-0.0" in logs
    if not retrying and attempt.last_attempt is not None:
        gap = as_utc(attempt.last_attempt) + timedelta(seconds=MIN_RENEWAL_GAP_S)
        if renew_at < gap:
            renew_at, reason = gap, f"{reason}; renewed less than {MIN_RENEWAL_GAP_S:g} s ago"
    # 4. After a failed or pending attempt: the retry schedule, unless the regular
    #    one is later (a forced renewal that failed long before the threshold).
    if retrying:
        due, why = _retry_due(attempt, policy, lifetime_s, now)
        if attempt.retry_after is not None or due >= renew_at:
            due, why = _before_expiry(due, why, attempt, nb, na, now)
            if due <= now:
                return Decision("renew-now", now, why)
            return Decision("retry-at", due, why)

    if renew_at <= now:
        return Decision("renew-now", now, reason, jitter_s)
    return Decision("renew-at", renew_at, reason, jitter_s)


def _before_expiry(due: datetime, why: str, attempt: AttemptState, nb: datetime,
                   na: datetime, now: datetime) -> tuple[datetime, str]:
    """Retries never step past expiry (see the module docstring)."""
    chance = last_chance(nb, na)
    if due < chance:
        return due, why
    assert attempt.last_attempt is not None
    if as_utc(attempt.last_attempt) < chance:
        return max(now, chance), f"{why}; last attempt before expiry"
    # The last chance was taken: the next attempt is an expired renewal, at expiry.
    return min(due, na), f"{why}; next attempt at expiry"


def jitter_rng(identity: str, serial: int, salt: bytes = b"") -> random.Random:
    """A random source stable per certificate, so repeated :func:`decide` calls agree.

    ``salt`` may carry a device-specific value (an EK fingerprint) so that two
    devices with the same identity name and serial still spread out.
    """
    h = hashlib.sha256()
    for part in (b"tpmid-jitter", identity.encode("utf-8"), str(serial).encode("ascii"), salt):
        h.update(len(part).to_bytes(4, "big") + part)
    return random.Random(int.from_bytes(h.digest(), "big"))
