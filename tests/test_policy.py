"""The renewal policy as tables of (lifetime, now, config, attempt) -> decision.

All times are offsets in seconds from the certificate's notBefore (``NB``), so a
row reads like the timeline it describes. Jitter is 0 % in the tables (its own
property tests follow), so every expected time is exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from tpmid.config import RenewConfig, parse_amount
from tpmid.policy import (
    CLOCK_SKEW,
    RELEASE_DATE,
    AttemptState,
    Decision,
    decide,
    jitter_rng,
)
from tpmid.render import describe_decision as describe
from tpmid.render import format_duration

NB = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
MIN, HOUR, DAY = 60.0, 3600.0, 86400.0
YEAR = 365 * DAY


def cfg(threshold: str = "80%", retry: str = "4%", jitter: str = "0%") -> RenewConfig:
    return RenewConfig(threshold=parse_amount(threshold, "threshold"),
                       retry=parse_amount(retry, "retry"),
                       jitter=parse_amount(jitter, "jitter"))


def at(offset_s: float) -> datetime:
    return NB + timedelta(seconds=offset_s)


def failed(last_s: float, failures: int = 1, retry_after: float | None = None) -> AttemptState:
    return AttemptState(last_attempt=at(last_s), last_error="EST server returned 503",
                        retry_after=retry_after, failures=failures)


def pending(last_s: float, retry_after: float) -> AttemptState:
    return AttemptState().pending(at(last_s), retry_after)


def run(lifetime_s: float, now_s: float, config: RenewConfig,
        attempt: AttemptState | None = None, rng: random.Random | None = None,
        earliest: datetime = RELEASE_DATE) -> Decision:
    return decide(not_before=NB, not_after=at(lifetime_s), now=at(now_s), policy=config,
                  attempt=attempt or AttemptState(), rng=rng or random.Random(0),
                  earliest_plausible=earliest)


@dataclass(frozen=True)
class Case:
    id: str
    lifetime: float
    now: float
    config: RenewConfig
    attempt: AttemptState | None
    action: str
    when: float | None  # offset from NB; None = "now"
    reason: str  # substring of Decision.reason


CASES = [
    # ---- threshold as a share of the lifetime
    Case("1y-80pct-early-in-life-renews-at-80pct", YEAR, 10 * DAY, cfg(), None,
         "renew-at", 0.8 * YEAR, "80% of lifetime"),
    Case("1y-80pct-exactly-at-threshold-renews-now", YEAR, 0.8 * YEAR, cfg(), None,
         "renew-now", None, "80% of lifetime"),
    Case("1y-80pct-past-threshold-renews-now", YEAR, 300 * DAY, cfg(), None,
         "renew-now", None, "80% of lifetime"),
    Case("2y-80pct", 2 * YEAR, DAY, cfg(), None, "renew-at", 1.6 * YEAR, "80% of lifetime"),
    Case("90d-50pct", 90 * DAY, 0, cfg("50%"), None, "renew-at", 45 * DAY, "50% of lifetime"),
    Case("30s-80pct-tiny-lifetime", 30, 0, cfg(), None, "renew-at", 24, "80% of lifetime"),
    Case("30s-80pct-at-25s-renews-now", 30, 25, cfg(), None, "renew-now", None, "80%"),
    # A threshold in the first half of the lifetime would renew right after every
    # renewal (issue 10, finding 8): renewals wait for half the lifetime at least.
    Case("0pct-threshold-waits-for-half-the-lifetime", DAY, 0, cfg("0%"), None,
         "renew-at", 0.5 * DAY, "threshold 0% is more than half of the 1 d lifetime"),
    Case("100pct-renews-at-notafter", DAY, HOUR, cfg("100%"), None, "renew-at", DAY, "100%"),
    # ---- threshold as a duration before expiry
    Case("1h-10min-before-expiry", HOUR, 0, cfg("10min"), None,
         "renew-at", 50 * MIN, "10 min before expiry"),
    Case("90d-4day-before-expiry", 90 * DAY, DAY, cfg("4day"), None,
         "renew-at", 86 * DAY, "4 d before expiry"),
    Case("1d-12h-before-expiry", DAY, 0, cfg("12h"), None, "renew-at", 12 * HOUR, "12 h"),
    Case("1y-30d-before-expiry", YEAR, 0, cfg("30d"), None, "renew-at", 335 * DAY, "30 d"),
    Case("1h-90s-before-expiry", HOUR, 0, cfg("90s"), None, "renew-at", HOUR - 90, "1 min 30 s"),
    Case("duration-longer-than-lifetime-renews-at-half-the-lifetime", HOUR, 0, cfg("4day"),
         None, "renew-at", 0.5 * HOUR, "threshold 4 d before expiry is more than half"),
    # ---- retry after a failure
    Case("1y-failure-retries-4pct-later", YEAR, 300 * DAY, cfg(), failed(300 * DAY),
         "retry-at", 300 * DAY + 0.04 * YEAR, "retry 4% after failure"),
    Case("1y-retry-due-renews-now", YEAR, 300 * DAY + 0.04 * YEAR, cfg(), failed(300 * DAY),
         "renew-now", None, "retry 4% after failure"),
    Case("1y-retry-as-duration", YEAR, 300 * DAY, cfg(retry="10min"), failed(300 * DAY),
         "retry-at", 300 * DAY + 600, "retry 10 min after failure"),
    Case("retry-reason-counts-failures", YEAR, 300 * DAY, cfg(), failed(300 * DAY, failures=3),
         "retry-at", 300 * DAY + 0.04 * YEAR, "after 3 failures"),
    Case("forced-renewal-failed-early-waits-for-threshold", YEAR, 10 * DAY, cfg(),
         failed(10 * DAY), "renew-at", 0.8 * YEAR, "80% of lifetime"),
    Case("30s-retry-4pct-is-1.2s", 30, 24, cfg(), failed(24), "retry-at", 25.2, "retry 4%"),
    Case("retry-0pct-is-floored-to-1s-no-busy-loop", 30, 24, cfg(retry="0%"), failed(24),
         "retry-at", 25, "retry 0%"),
    # ---- retries never step past expiry
    Case("retry-past-expiry-becomes-last-attempt-before-expiry", YEAR, YEAR - DAY, cfg(),
         failed(YEAR - DAY), "retry-at", YEAR - 300, "last attempt before expiry"),
    Case("last-chance-is-5pct-of-a-short-lifetime", HOUR, 55 * MIN, cfg(retry="30min"),
         failed(55 * MIN), "retry-at", HOUR - 180, "last attempt before expiry"),
    Case("last-chance-overdue-renews-now", YEAR, YEAR - 100, cfg(), failed(YEAR - DAY),
         "renew-now", None, "last attempt before expiry"),
    # Retries never step past expiry: after the last chance, the next attempt is the
    # expired renewal (through the bootstrap identity), at expiry.
    Case("last-chance-already-taken-retries-at-expiry", YEAR, YEAR - 200, cfg(),
         failed(YEAR - 200), "retry-at", YEAR, "next attempt at expiry"),
    # ---- server Retry-After (RFC 7030 §4.2.3)
    Case("retry-after-larger-than-retry-is-honoured", HOUR, 50 * MIN, cfg(),
         failed(50 * MIN, retry_after=300), "retry-at", 55 * MIN, "server Retry-After 300 s"),
    Case("retry-after-smaller-than-retry-is-used", YEAR, 300 * DAY, cfg(),
         failed(300 * DAY, retry_after=120), "retry-at", 300 * DAY + 120,
         "server Retry-After 120 s"),
    Case("retry-after-due-renews-now", YEAR, 300 * DAY + 120, cfg(),
         failed(300 * DAY, retry_after=120), "renew-now", None, "server Retry-After 120 s"),
    Case("retry-after-past-expiry-is-clamped-before-expiry", HOUR, HOUR - 400, cfg(),
         failed(HOUR - 400, retry_after=3600), "retry-at", HOUR - 180,
         "server Retry-After 3600 s; last attempt before expiry"),
    Case("retry-after-zero-is-floored-to-1s", YEAR, 300 * DAY, cfg(),
         failed(300 * DAY, retry_after=0), "retry-at", 300 * DAY + 1, "Retry-After 1 s"),
    Case("pending-202-resends-at-retry-after-even-before-threshold", YEAR, 10 * DAY, cfg(),
         pending(10 * DAY, 60), "retry-at", 10 * DAY + 60, "server Retry-After 60 s"),
    # ---- expired
    Case("expired-renews-now", YEAR, YEAR + DAY, cfg(), None, "renew-now", None, "expired"),
    Case("expired-exactly-at-notafter", DAY, DAY, cfg(), None, "renew-now", None, "expired"),
    Case("30s-lifetime-expired", 30, 31, cfg(), None, "renew-now", None, "expired"),
    Case("expired-long-ago", 2 * YEAR, 5 * YEAR, cfg(), None, "renew-now", None, "expired"),
    Case("expired-and-just-failed-spaces-retries", YEAR, YEAR + HOUR, cfg(),
         failed(YEAR + HOUR), "retry-at", YEAR + HOUR + 0.04 * YEAR,
         "expired; retry 4% after failure"),
    Case("expired-retry-due-renews-now", YEAR, YEAR + HOUR + 0.04 * YEAR, cfg(),
         failed(YEAR + HOUR), "renew-now", None, "expired"),
    Case("empty-validity-period-renews-now", 0, 0, cfg(), None, "renew-now", None, "expired"),
    # ---- the key is lost (TPM2_Clear): renew now, spaced like an expired certificate
    Case("lost-key-renews-now-early-in-life", YEAR, 10 * DAY, cfg(),
         AttemptState(key_lost=True), "renew-now", None, "its key can no longer be used"),
    Case("lost-key-and-just-failed-spaces-retries", YEAR, 10 * DAY, cfg(),
         failed(10 * DAY).lost_key(), "retry-at", 10 * DAY + 0.04 * YEAR,
         "its key can no longer be used (TPM cleared?); retry 4% after failure"),
    # ---- not yet valid, clock plausibility
    Case("not-yet-valid-within-skew-is-normal", YEAR, -120, cfg(), None,
         "renew-at", 0.8 * YEAR, "80% of lifetime"),
    Case("not-yet-valid-beyond-skew-waits-for-clock", YEAR, -HOUR, cfg(), None,
         "wait-for-clock", -CLOCK_SKEW.total_seconds(), "clock before notBefore"),
    Case("clock-far-before-notbefore-with-failures-still-waits", YEAR, -30 * DAY, cfg(),
         failed(300 * DAY, failures=5), "wait-for-clock", -CLOCK_SKEW.total_seconds(),
         "clock before notBefore"),
    # ---- clock jumps
    Case("clock-jump-forward-past-expiry-renews-now", YEAR, YEAR + 30 * DAY, cfg(), None,
         "renew-now", None, "expired"),
    Case("clock-jump-forward-after-failure-renews-now", YEAR, YEAR + 30 * DAY, cfg(),
         failed(300 * DAY), "renew-now", None, "expired"),
    Case("clock-jump-back-before-threshold-follows-regular-schedule", YEAR, 200 * DAY, cfg(),
         failed(300 * DAY), "renew-at", 0.8 * YEAR, "80% of lifetime"),
    Case("clock-jump-back-past-last-attempt-retries-once-now", YEAR, 310 * DAY, cfg(),
         failed(340 * DAY), "renew-now", None, "clock went back past the last attempt"),
    Case("clock-slightly-behind-last-attempt-keeps-retry-time", YEAR, 300 * DAY, cfg(),
         failed(300 * DAY + 60), "retry-at", 300 * DAY + 60 + 0.04 * YEAR, "retry 4%"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision_table(case: Case) -> None:
    d = run(case.lifetime, case.now, case.config, case.attempt)
    assert d.action == case.action, d
    expected = at(case.now) if case.when is None else at(case.when)
    assert abs((d.when - expected).total_seconds()) < 1e-3, d
    assert case.reason in d.reason, d
    assert d.when.tzinfo is not None and d.when.utcoffset() == timedelta(0)


# --------------------------------------------------------------------------- clock sanity


@pytest.mark.parametrize(
    "now",
    [datetime(1970, 1, 1, tzinfo=UTC), datetime(2000, 1, 1, tzinfo=UTC),
     RELEASE_DATE - timedelta(seconds=1)],
    ids=["epoch", "y2k", "one-second-before-release"],
)
def test_clock_before_release_waits_even_for_an_old_looking_certificate(now: datetime) -> None:
    # A short-lived certificate issued right after release looks "expired" to
    # nobody and "not yet valid" to a clock stuck in 1970: never renew, never discard.
    nb = RELEASE_DATE + timedelta(days=3)
    d = decide(not_before=nb, not_after=nb + timedelta(days=1), now=now, policy=cfg(),
               attempt=failed(0, failures=9), rng=random.Random(1))
    assert d.action == "wait-for-clock"
    assert d.reason == "clock before tpmid's release"
    assert d.when == nb - CLOCK_SKEW


def test_clock_before_release_waits_for_release_date_when_cert_is_older() -> None:
    old_nb = RELEASE_DATE - timedelta(days=400)
    d = decide(not_before=old_nb, not_after=old_nb + timedelta(days=800),
               now=datetime(1970, 1, 1, tzinfo=UTC), policy=cfg(), attempt=AttemptState(),
               rng=random.Random(1))
    assert (d.action, d.when) == ("wait-for-clock", RELEASE_DATE)


def test_naive_datetimes_are_taken_as_utc() -> None:
    naive = decide(not_before=NB.replace(tzinfo=None), not_after=at(YEAR).replace(tzinfo=None),
                   now=at(DAY).replace(tzinfo=None), policy=cfg(), attempt=AttemptState(),
                   rng=random.Random(0))
    aware = run(YEAR, DAY, cfg())
    assert naive == aware


def test_other_timezones_are_converted_to_utc() -> None:
    from datetime import timezone

    plus2 = timezone(timedelta(hours=2))
    d = decide(not_before=NB.astimezone(plus2), not_after=at(YEAR).astimezone(plus2),
               now=at(DAY).astimezone(plus2), policy=cfg(), attempt=AttemptState(),
               rng=random.Random(0))
    assert d == run(YEAR, DAY, cfg())
    assert d.when.tzinfo == UTC


# --------------------------------------------------------------------------- jitter


def _random_policy(r: random.Random) -> tuple[float, RenewConfig]:
    lifetime = r.choice([30, 90, HOUR, DAY, 30 * DAY, 90 * DAY, YEAR, 2 * YEAR])
    if r.random() < 0.5:
        threshold = f"{r.randint(0, 100)}%"
    else:
        threshold = f"{r.uniform(0, lifetime * 1.2):.3f}s"
    jitter = f"{r.choice([0, 1, 2, 5, 10, 50, 100])}%" if r.random() < 0.7 else \
        f"{r.uniform(0, lifetime):.3f}s"
    return lifetime, cfg(threshold=threshold, jitter=jitter)


def _threshold_offset(lifetime: float, policy: RenewConfig) -> float:
    t = policy.threshold
    off = t.fraction * lifetime if t.fraction is not None else lifetime - (t.seconds or 0)
    # Never in the first half of the lifetime (MIN_LIFETIME_SHARE).
    return min(max(off, 0.5 * lifetime), lifetime)


@pytest.mark.parametrize("seed", range(0, 2000, 100), ids=lambda s: f"seeds-{s}-{s + 99}")
def test_jitter_is_always_earlier_within_window_and_never_before_notbefore(seed: int) -> None:
    for s in range(seed, seed + 100):
        r = random.Random(s)
        lifetime, policy = _random_policy(r)
        d = run(lifetime, -60, policy, rng=random.Random(r.random()))
        threshold = _threshold_offset(lifetime, policy)
        window = policy.jitter.of(lifetime)
        when = (d.when - NB).total_seconds()
        assert d.action in ("renew-at", "renew-now"), (s, d)
        if d.action == "renew-at":
            assert when <= threshold + 1e-6, (s, d)  # never later than the threshold
            assert when >= 0, (s, d)  # never before notBefore
            assert threshold - when <= window + 1e-6, (s, d)  # within the window
            assert abs((threshold + d.jitter_s) - when) < 1e-3, (s, d)
        assert d.jitter_s <= 0, (s, d)
        assert -d.jitter_s <= window + 1e-6, (s, d)


def test_jitter_spreads_a_fleet_over_the_window() -> None:
    policy = cfg(jitter="2%")
    times = [run(YEAR, DAY, policy, rng=jitter_rng("ldevid", serial)).when
             for serial in range(1000, 1500)]
    offsets = sorted((at(0.8 * YEAR) - t).total_seconds() for t in times)
    window = 0.02 * YEAR
    assert offsets[0] >= 0 and offsets[-1] <= window
    assert offsets[-1] - offsets[0] > 0.9 * window  # the fleet uses the whole window
    assert len(set(offsets)) == len(offsets)  # no two devices at the same instant


def test_jitter_rng_is_stable_per_certificate_so_repeated_decisions_agree() -> None:
    first = run(YEAR, DAY, cfg(jitter="2%"), rng=jitter_rng("ldevid", 0x1234))
    for now in (2 * DAY, 100 * DAY, 0.7 * YEAR):
        again = run(YEAR, now, cfg(jitter="2%"), rng=jitter_rng("ldevid", 0x1234))
        assert (again.when, again.jitter_s) == (first.when, first.jitter_s)
    assert first.jitter_s < 0


@pytest.mark.parametrize(
    "other",
    [("edgeca", 0x1234, b""), ("ldevid", 0x1235, b""), ("ldevid", 0x1234, b"ek-fingerprint")],
    ids=["other-identity", "other-serial", "other-salt"],
)
def test_jitter_rng_differs_per_identity_serial_and_salt(other: tuple[str, int, bytes]) -> None:
    assert jitter_rng("ldevid", 0x1234).random() != jitter_rng(*other).random()


def test_jitter_never_delays_a_retry() -> None:
    a = failed(300 * DAY)
    plain = run(YEAR, 300 * DAY, cfg(jitter="0%"), a)
    jittered = run(YEAR, 300 * DAY, cfg(jitter="10%"), a, rng=random.Random(7))
    assert plain.when == jittered.when


# --------------------------------------------------------------------------- IoT Edge


@pytest.mark.parametrize(
    ("threshold", "retry", "lifetime", "renew_at", "retry_every"),
    [
        ("80%", "4%", 90 * DAY, 72 * DAY, 3.6 * DAY),
        ("80%", "4%", YEAR, 292 * DAY, 14.6 * DAY),
        ("80%", "4%", HOUR, 48 * MIN, 144),
        ("90%", "2%", 30 * DAY, 27 * DAY, 0.6 * DAY),
        ("10min", "1min", DAY, DAY - 600, 60),
        ("4day", "4%", 90 * DAY, 86 * DAY, 3.6 * DAY),
    ],
    ids=["80-4-90d", "80-4-1y", "80-4-1h", "90-2-30d", "10min-1min-1d", "4day-4pct-90d"],
)
def test_iot_edge_auto_renew_settings_mean_the_same(
    threshold: str, retry: str, lifetime: float, renew_at: float, retry_every: float,
) -> None:
    # auto_renew = { threshold = ..., retry = ... } translates one to one.
    policy = cfg(threshold, retry)
    first = run(lifetime, 0, policy)
    assert first.action == "renew-at" and first.when == at(renew_at)
    retry_d = run(lifetime, renew_at, policy, failed(renew_at))
    assert retry_d.when == at(renew_at + retry_every)


def test_default_renew_config_is_iot_edge_80_4_with_small_jitter() -> None:
    d = RenewConfig()
    assert (str(d.threshold), str(d.retry), str(d.jitter)) == ("80%", "4%", "2%")


# --------------------------------------------------------------------------- no storms


@pytest.mark.parametrize("lifetime", [30, HOUR, 90 * DAY, 2 * YEAR],
                         ids=["30s", "1h", "90d", "2y"])
def test_a_ca_outage_never_causes_a_storm_and_the_last_attempt_precedes_expiry(
    lifetime: float,
) -> None:
    # Drive decide() as the daemon does, every attempt failing, until well after expiry.
    policy = cfg(jitter="2%")
    attempt = AttemptState()
    now = at(0)
    attempts: list[datetime] = []
    for _ in range(500):
        d = decide(not_before=NB, not_after=at(lifetime), now=now, policy=policy,
                   attempt=attempt, rng=jitter_rng("ldevid", 42))
        if d.action == "renew-now":
            attempts.append(now)
            attempt = attempt.failed(now, "CA unreachable")
        else:
            assert d.when > now, d  # time always moves forward: no busy loop
            now = d.when
        if now > at(lifetime * 1.3):
            break
    before = [t for t in attempts if t < at(lifetime)]
    # From the (jittered) threshold at ~78-80 % to expiry at 4 % spacing: ~6 attempts.
    assert 4 <= len(before) <= 8, before
    assert before[-1] >= at(lifetime) - timedelta(seconds=min(300, 0.05 * lifetime)), before
    # Attempts are spaced by the retry interval; only the one last attempt before
    # expiry may come sooner, and never at the same instant.
    spacing = max(0.04 * lifetime, 1.0)
    gaps = [(b - a).total_seconds() for a, b in zip(attempts, attempts[1:], strict=False)]
    assert min(gaps) > 0, gaps
    assert sum(g < spacing - 1e-6 for g in gaps) <= 1, gaps
    after = [t for t in attempts if t >= at(lifetime)]
    assert len(after) <= 0.3 / 0.04 + 1, after


def test_wrong_clock_never_attempts_anything() -> None:
    now = datetime(1970, 1, 1, tzinfo=UTC)
    for failures in range(5):
        d = decide(not_before=NB, not_after=at(DAY), now=now, policy=cfg(),
                   attempt=failed(0, failures=failures) if failures else AttemptState(),
                   rng=random.Random(failures))
        assert d.action == "wait-for-clock"


# --------------------------------------------------------------------------- describe


@pytest.mark.parametrize(
    ("decision", "line"),
    [
        (Decision("renew-at", datetime(2026, 12, 1, 10, tzinfo=UTC), "80% of lifetime", -180.0),
         "ldevid: next renewal 2026-12-01T10:00:00Z (80% of lifetime), jitter -3 min"),
        (Decision("renew-at", datetime(2026, 12, 1, 10, tzinfo=UTC), "10min before expiry"),
         "ldevid: next renewal 2026-12-01T10:00:00Z (10min before expiry)"),
        (Decision("retry-at", datetime(2026, 12, 1, 10, 2, tzinfo=UTC), "server Retry-After 120 s"),
         "ldevid: next retry 2026-12-01T10:02:00Z (server Retry-After 120 s)"),
        (Decision("renew-now", datetime(2026, 12, 1, tzinfo=UTC), "expired"),
         "ldevid: renew now (expired)"),
    ],
    ids=["renewal-with-jitter", "renewal-without-jitter", "retry", "now"],
)
def test_describe_gives_the_daemon_log_line(decision: Decision, line: str) -> None:
    assert describe(decision, "ldevid") == line


def test_describe_wait_for_clock_says_the_certificate_is_kept() -> None:
    d = run(YEAR, -DAY, cfg())
    line = describe(d, "ldevid")
    assert line.startswith("ldevid: clock looks wrong (clock before notBefore)")
    assert "keeping the current certificate" in line


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.6, "0.6 s"), (1.0, "1 s"), (90, "1 min 30 s"), (600, "10 min"), (3 * HOUR + 5, "3 h"),
     (4 * DAY, "4 d"), (14.6 * DAY, "14 d 14 h"), (-180, "3 min")],
    ids=["sub-second", "one-second", "90s", "10min", "3h", "4d", "14.6d", "negative"],
)
def test_format_duration_uses_config_units(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
