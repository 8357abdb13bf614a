"""The renewal engine and daemon end to end, on an injected clock.

A factory-fresh swtpm holds every key; the reference EST server runs in this
process with its CAs on the same injected clock (so certificates are issued "at"
simulated times), real TLS on loopback. The daemon's waits advance the clock
instead of sleeping, so days of renewals take a few seconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.est.test_client_support import SECRET_ENV, identity_config, transient_handles
from tests.support.wiring import clients, enroll
from tpmid.config import Config, parse_config
from tpmid.errors import EstTransportError
from tpmid.lifecycle.daemon import Daemon
from tpmid.lifecycle.plan import managed_identities
from tpmid.lifecycle.renew import RenewalEngine
from tpmid.server import EstServer
from tpmid.store import Store
from tpmid.testing.estserver import RunningEstServer, start_est_server
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import create_persistent_idevid

DAY = timedelta(days=1)


class SimClock:
    """Simulated UTC time; starts at the real time so the server's TLS cert is valid."""

    def __init__(self) -> None:
        self.t = datetime.now(UTC).replace(microsecond=0)
        self.lock = threading.Lock()

    def now(self) -> datetime:
        with self.lock:
            return self.t

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.t += timedelta(seconds=seconds)


class SimWake(threading.Event):
    """The daemon's wait: advances the clock, runs scheduled actions, stops at ``until``."""

    def __init__(self, clock: SimClock, until: datetime) -> None:
        super().__init__()
        self.clock = clock
        self.until = until
        self.daemon: Daemon | None = None
        self.actions: list[tuple[datetime, Callable[[], None]]] = []
        self.waits: list[float] = []

    def at(self, when: datetime, action: Callable[[], None]) -> None:
        self.actions.append((when, action))
        self.actions.sort(key=lambda a: a[0])

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None and timeout > 0
        self.waits.append(timeout)
        target = self.clock.now() + timedelta(seconds=timeout)
        # Wake early for a scheduled action, as a signal would.
        while self.actions and self.actions[0][0] <= target:
            when, action = self.actions.pop(0)
            self.clock.advance(max(0.0, (when - self.clock.now()).total_seconds()))
            action()
            return True
        self.clock.advance(timeout)
        if self.clock.now() >= self.until:
            assert self.daemon is not None
            self.daemon.request_stop()
        return False


@dataclass
class RecordingEngine(RenewalEngine):
    """The real engine, remembering when each attempt started (simulated time)."""

    attempts: list[tuple[str, datetime]] = field(default_factory=list)

    def renew(self, name: str, now: datetime) -> Any:
        self.attempts.append((name, now))
        return super().renew(name, now)


@dataclass
class Device:
    swtpm: Swtpm
    server: RunningEstServer
    clock: SimClock
    store_dir: Path
    config: Config
    hooks: list[dict[str, str]] = field(default_factory=list)
    attempts: list[tuple[str, datetime]] = field(default_factory=list)

    def engine(self, config: Config | None = None) -> RecordingEngine:
        def open_tpm() -> TpmConnection:
            return TpmConnection(self.swtpm.tcti)

        def record_hook(argv: Any, env: Any) -> int:
            self.hooks.append(dict(env))
            return 0

        return RecordingEngine(
            config=config or self.config, store=Store(self.store_dir), open_tpm=open_tpm,
            make_clients=lambda: clients(config or self.config, lambda ref: self.server.secret,
                                         now=self.clock.now,
                                         sleep=lambda s: self.clock.advance(s)),
            now=self.clock.now, hook_runner=record_hook, attempts=self.attempts,
        )

    def daemon(self, until: datetime, config_holder: list[Config] | None = None
               ) -> tuple[Daemon, SimWake]:
        wake = SimWake(self.clock, until)
        holder = config_holder or [self.config]
        d = Daemon(make_planner=lambda: self.engine(holder[0]), now=self.clock.now, wake=wake)
        wake.daemon = d
        return d, wake

    def spki(self, name: str) -> bytes:
        cur = Store(self.store_dir).current(name)
        assert cur is not None
        return cur.cert.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def restart_server(self) -> None:
        """Bring the server back on the same port after :meth:`stop_server`."""
        srv = EstServer(self.server.dir, port=self.server.port, clock=self.clock.now).start()
        self.server.server = srv

    def stop_server(self) -> None:
        assert self.server.server is not None
        self.server.server.stop()


def _lifetimes(ldevid: str, edgeca: str) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d["labels"]["ldevid"]["lifetime"] = ldevid
        d["labels"]["edgeca"]["lifetime"] = edgeca

    return edit


@pytest.fixture
def device(swtpm: Swtpm, tmp_path: Path) -> Iterator[Device]:
    clock = SimClock()
    server = start_est_server(tmp_path / "est", config=_lifetimes("1day", "2day"),
                              clock=clock.now)
    store_dir = tmp_path / "store"
    config = identity_config(server, store_dir, swtpm.tcti)
    with TpmConnection(swtpm.tcti) as tpm:
        create_persistent_idevid(tpm, "H-2", 0x81020000)
        enroll(config, "idevid", tpm=tpm, secrets={SECRET_ENV: server.secret}, now=clock.now)
    try:
        yield Device(swtpm, server, clock, store_dir, config)
    finally:
        server.stop()


def test_daemon_manages_file_key_identities_in_dependency_order(device: Device) -> None:
    assert managed_identities(device.config) == ["ldevid", "edgeca"]


def test_daemon_enrolls_then_renews_ldevid_and_edge_ca_on_schedule_with_new_tpm_keys(
        device: Device) -> None:
    start = device.clock.now()
    d, wake = device.daemon(until=start + 3.5 * DAY)
    d.run()
    store = Store(device.store_dir)
    # Enrolled at t=0, then renewed around 0.8 d, 1.6 d, 2.4 d, 3.2 d.
    assert int(store.current("ldevid").version) == 5
    assert int(store.current("edgeca").version) == 3  # t=0, ~1.6 d, ~3.2 d
    # Renewals re-enrolled over mTLS with the LDevID's own (rotating) key.
    ops = [c["operation"] for c in device.server.issued() if c["label"] == "ldevid"]
    assert ops == ["simpleenroll"] + ["simplereenroll"] * 4
    # Every renewal was at 78-80 % of the certificate's lifetime, never later.
    issued = [c for c in device.server.issued() if "my-device-id" in c.get("subject", "")
              and "Edge" not in c.get("subject", "")]
    assert len(issued) == 5
    times = sorted(datetime.fromisoformat(c["not_before"]) for c in issued)
    gaps = [(b - a) / DAY for a, b in zip(times, times[1:], strict=False)]
    assert all(0.78 <= g <= 0.8 + 1e-3 for g in gaps), gaps
    # Zero transient objects are left in the TPM between renewals.
    assert transient_handles(device.swtpm.tcti) == []


def test_each_renewal_rotates_the_tpm_key_and_deletes_the_old_key_file(device: Device) -> None:
    engine = device.engine()
    now = device.clock.now()
    engine.renew("ldevid", now)
    first = device.spki("ldevid")
    old_key = Store(device.store_dir).current("ldevid").key_file
    device.clock.advance(0.81 * DAY.total_seconds())
    result = engine.renew("ldevid", device.clock.now())
    assert result.operation == "simplereenroll"
    assert device.spki("ldevid") != first
    assert old_key is not None and not old_key.exists()
    assert device.hooks == [] or all(h["TPMID_IDENTITY"] == "ldevid" for h in device.hooks)


def test_daemon_retries_while_server_is_down_and_recovers_before_expiry(device: Device) -> None:
    engine = device.engine()
    engine.renew("ldevid", device.clock.now())
    engine.renew("edgeca", device.clock.now())
    start = device.clock.now()
    d, wake = device.daemon(until=start + 1.5 * DAY)
    # Down from 0.7 d (before the 80 % threshold) to 0.9 d.
    wake.at(start + 0.7 * DAY, device.stop_server)
    wake.at(start + 0.9 * DAY, device.restart_server)
    d.run()
    store = Store(device.store_dir)
    attempts = store.load_state("ldevid")
    cur = store.current("ldevid")
    assert cur is not None and int(cur.version) >= 2, "never recovered"
    assert attempts.failures == 0
    # The renewal happened once the server was back, before the old cert expired.
    assert start + 0.9 * DAY <= cur.not_before < start + DAY
    # Attempts while down were spaced by 4 % of the lifetime (~57.6 min), not a storm.
    times = [t for name, t in device.attempts if name == "ldevid"][2:]  # after the set-up
    assert len(times) >= 3, times
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    assert all(g >= 0.04 * DAY.total_seconds() - 1 for g in gaps), gaps


def test_expired_ldevid_re_bootstraps_with_the_idevid(device: Device) -> None:
    engine = device.engine()
    engine.renew("ldevid", device.clock.now())
    device.clock.advance(1.2 * DAY.total_seconds())  # device was off past notAfter
    decision = engine.plan("ldevid", device.clock.now())
    assert decision.action == "renew-now"
    result = engine.renew("ldevid", device.clock.now())
    assert result.operation == "simpleenroll"
    last = device.server.issued()[-1]
    assert last["operation"] == "simpleenroll" and last["label"] == "ldevid"
    assert last["authenticated_as"].startswith("cert:") and "CN=IDevID" in last["authenticated_as"]


def test_renewal_failure_is_recorded_and_keeps_the_old_identity(device: Device) -> None:
    engine = device.engine()
    engine.renew("ldevid", device.clock.now())
    before = Store(device.store_dir).current("ldevid")
    device.stop_server()
    device.clock.advance(0.85 * DAY.total_seconds())
    with pytest.raises(EstTransportError):
        engine.renew("ldevid", device.clock.now())
    store = Store(device.store_dir)
    after = store.current("ldevid")
    assert after is not None and before is not None and after.version == before.version
    assert after.key_file is not None and after.key_file.exists()
    assert store.load_state("ldevid").failures == 1
    assert store.journal_get("ldevid") is None
    assert sorted(p.name for p in (device.store_dir / "keys" / "ldevid").iterdir()) == [
        f"{before.version}.tss2.pem"]
    assert transient_handles(device.swtpm.tcti) == []


def test_config_reload_picks_up_a_changed_threshold(device: Device) -> None:
    engine = device.engine()
    engine.renew("ldevid", device.clock.now())
    engine.renew("edgeca", device.clock.now())
    start = device.clock.now()
    raw = {
        "tpm": {"tcti": device.swtpm.tcti}, "store": {"dir": str(device.store_dir)},
        "trust": {"est_anchors": [str(device.server.tls_ca)]},
        "identities": {
            "idevid": {"key": {"kind": "persistent", "template": "H-2"},
                       "subject": {"cn": "IDevID", "serial_number": "TPMID-TEST-0001"}},
            "ldevid": {"key": {"kind": "file"},
                       "subject": {"cn": "my-device-id", "serial_number": "TPMID-TEST-0001"},
                       "est": {"url": device.server.url("ldevid"),
                               "auth": {"client": "idevid"}},
                       "renew": {"threshold": "60%", "jitter": "0%"}},
        },
    }
    holder = [device.config]
    # 60 %, not the default 80 % (and not below 50 %, the policy's floor).
    d, wake = device.daemon(until=start + 0.65 * DAY, config_holder=holder)

    def change() -> None:
        holder[0] = parse_config(raw, "reloaded")
        d.request_reload()

    wake.at(start + 0.1 * DAY, change)
    d.run()
    cur = Store(device.store_dir).current("ldevid")
    assert cur is not None and int(cur.version) >= 2, "the new 60 % threshold was not applied"
    assert abs((cur.not_before - start) / DAY - 0.6) < 0.01


def test_daemon_renews_a_chained_edge_ca_right_after_each_ldevid_renewal(
        device: Device) -> None:
    import dataclasses

    edge = device.config.identity("edgeca")
    chained = dataclasses.replace(edge, renew=dataclasses.replace(edge.renew, chain=True))
    config = dataclasses.replace(
        device.config, identities={**device.config.identities, "edgeca": chained})
    start = device.clock.now()
    wake = SimWake(device.clock, start + 2.5 * DAY)

    def planner() -> RecordingEngine:
        engine = device.engine(config)
        engine.follow_chains = True
        return engine

    d = Daemon(make_planner=planner, now=device.clock.now, wake=wake)
    wake.daemon = d
    d.run()
    order = [name for name, _ in device.attempts]
    # The first enrollment of each, then every LDevID renewal (~0.8 d, 1.6 d, 2.4 d)
    # immediately followed by the Edge CA, whose own 80 % point (1.6 d of a 2-day
    # lifetime) is never reached.
    assert order == ["ldevid", "edgeca"] * 4, order
    times = {name: [t for n, t in device.attempts if n == name] for name in ("ldevid", "edgeca")}
    assert times["edgeca"][-1] == times["ldevid"][-1]  # same moment: chained, not scheduled
