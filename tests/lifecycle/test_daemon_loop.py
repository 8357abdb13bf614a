"""The daemon loop on its own: when it sleeps, when it renews, how it stops.

The planner here is an in-memory table driven by the real renewal policy; the
end-to-end scheduling tests with swtpm and the reference EST server are in
``test_renew_engine.py``. The clock and the wait are injected: nothing sleeps.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from tpmid.config import RenewConfig
from tpmid.errors import ConfigError, EstTransportError
from tpmid.lifecycle.daemon import Daemon
from tpmid.policy import AttemptState, Decision, decide

T0 = datetime(2026, 12, 1, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> datetime:
        return self.t


class FakeWake(threading.Event):
    """An Event whose wait() advances the fake clock instead of sleeping."""

    def __init__(self, clock: FakeClock, stop_after: int, daemon_ref: list[Daemon]) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []
        self.stop_after = stop_after
        self.daemon_ref = daemon_ref

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None, "the daemon must never wait without a timeout"
        self.waits.append(timeout)
        self.clock.t += timedelta(seconds=timeout)
        if len(self.waits) >= self.stop_after:
            self.daemon_ref[0].request_stop()
        return False


@dataclass
class TablePlanner:
    """Certificates as (notBefore, notAfter) in memory; renewals issue a new one."""

    lifetime: timedelta
    clock: FakeClock
    fail_until: datetime | None = None
    certs: dict[str, tuple[datetime, datetime]] = field(default_factory=dict)
    attempts: dict[str, AttemptState] = field(default_factory=dict)
    renewals: list[tuple[str, datetime]] = field(default_factory=list)
    policy: RenewConfig = field(default_factory=RenewConfig)

    def identities(self) -> list[str]:
        return sorted(self.certs)

    def plan(self, name: str, now: datetime) -> Decision:
        nb, na = self.certs[name]
        return decide(not_before=nb, not_after=na, now=now, policy=self.policy,
                      attempt=self.attempts.get(name, AttemptState()), rng=random.Random(name))

    def renew(self, name: str, now: datetime) -> None:
        if self.fail_until and now < self.fail_until:
            prev = self.attempts.get(name, AttemptState())
            self.attempts[name] = AttemptState(last_attempt=now, last_error="down",
                                               failures=prev.failures + 1)
            raise EstTransportError("server down")
        self.renewals.append((name, now))
        self.certs[name] = (now, now + self.lifetime)
        self.attempts[name] = AttemptState()


def _run(planner: TablePlanner, clock: FakeClock, stop_after: int) -> FakeWake:
    ref: list[Daemon] = []
    wake = FakeWake(clock, stop_after, ref)
    d = Daemon(make_planner=lambda: planner, now=clock.now, wake=wake)
    ref.append(d)
    assert d.run() == 0
    return wake


def test_daemon_sleeps_until_80_percent_of_lifetime_then_renews() -> None:
    clock = FakeClock()
    p = TablePlanner(lifetime=timedelta(days=10), clock=clock,
                     policy=RenewConfig())
    p.certs["ldevid"] = (T0, T0 + timedelta(days=10))
    _run(p, clock, stop_after=200)  # one wake-up an hour: 8 days
    assert p.renewals, "no renewal happened"
    first = p.renewals[0][1]
    # 80 % threshold with up to 2 % jitter earlier: between day 7.8 and day 8.
    assert T0 + timedelta(days=7.8) <= first <= T0 + timedelta(days=8)


def test_daemon_never_busy_loops_while_idle() -> None:
    clock = FakeClock()
    p = TablePlanner(lifetime=timedelta(days=365), clock=clock)
    p.certs["ldevid"] = (T0, T0 + timedelta(days=365))
    wake = _run(p, clock, stop_after=5)
    # Idle: each wake-up is the one-hour safety cap, not a poll.
    assert wake.waits == [3600.0] * 5
    assert p.renewals == []


def test_daemon_retries_on_schedule_while_server_is_down_and_recovers() -> None:
    clock = FakeClock()
    lifetime = timedelta(hours=10)
    p = TablePlanner(lifetime=lifetime, clock=clock, fail_until=T0 + timedelta(hours=9))
    p.certs["ldevid"] = (T0, T0 + lifetime)
    wake = _run(p, clock, stop_after=40)
    assert p.renewals, "never recovered"
    # Retries are spaced 4 % of the lifetime (24 min) apart, never closer.
    retry_waits = [w for w in wake.waits if w < 3600]
    assert retry_waits and all(w >= 0.04 * lifetime.total_seconds() - 1 for w in retry_waits[:-1])
    assert p.renewals[0][1] >= T0 + timedelta(hours=9)
    assert p.renewals[0][1] < T0 + lifetime, "renewed only after expiry"


def test_stop_request_during_wait_exits_promptly() -> None:
    clock = FakeClock()
    p = TablePlanner(lifetime=timedelta(days=1), clock=clock)
    p.certs["ldevid"] = (T0, T0 + timedelta(days=1))
    d = Daemon(make_planner=lambda: p, now=clock.now)  # a real Event: really waits
    t = threading.Thread(target=d.run)
    t.start()
    d.request_stop()
    t.join(timeout=5)
    assert not t.is_alive()


def test_reload_with_a_broken_config_keeps_the_previous_one() -> None:
    clock = FakeClock()
    p = TablePlanner(lifetime=timedelta(days=1), clock=clock)
    p.certs["ldevid"] = (T0, T0 + timedelta(days=1))
    calls = {"n": 0}

    def make() -> TablePlanner:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConfigError("broken")
        return p

    d = Daemon(make_planner=make, now=clock.now)
    d.step()
    d.request_reload()
    assert d.step() is not None  # still planning with the old planner
    assert calls["n"] == 2


def test_bad_config_at_start_is_fatal() -> None:
    def make() -> TablePlanner:
        raise ConfigError("broken")

    with pytest.raises(ConfigError):
        Daemon(make_planner=make, now=FakeClock().now).run()
