"""The renewal daemon: sleep until the earliest renewal event, renew, repeat.

The loop owns no policy and no I/O of its own. It asks a :class:`Planner` for the
next :class:`~tpmid.policy.Decision` of every identity, sleeps until the
earliest one on an interruptible :class:`threading.Event` (no polling: the only
wake-ups are events, signals and a long safety cap that catches wall-clock jumps),
and calls :meth:`Planner.renew` for identities that are due. Clock, waiting and the
planner are injected, so tests drive it without sleeping.

Signals are installed by the CLI, which calls :meth:`Daemon.request_stop` (SIGTERM,
SIGINT) and :meth:`Daemon.request_reload` (SIGHUP). A stop also cuts short what a
renewal in progress is waiting for (the server, the TPM, a lock: see
:mod:`tpmid.cancel`), so the daemon exits within a second; a request already sent
stays in the store's journal and is resent at the next start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from tpmid.cancel import Cancelled
from tpmid.errors import ConfigError, TpmidError
from tpmid.policy import Decision
from tpmid.render import describe_decision

log = logging.getLogger(__name__)

# Re-plan at least this often even when nothing is due, so that a wall-clock jump
# (suspend, NTP step after boot) is noticed. One wake-up an hour costs nothing.
MAX_SLEEP_S = 3600.0
MIN_RETRY_S = 1.0


class Planner(Protocol):
    """What the daemon needs from the renewal engine."""

    def identities(self) -> Iterable[str]:
        """Names of the identities the daemon keeps renewed."""
        ...

    def plan(self, name: str, now: datetime) -> Decision:
        """The next event for ``name`` (never raises for a missing certificate: renew-now)."""
        ...

    def renew(self, name: str, now: datetime) -> object:
        """One renewal attempt; records success or failure in the store."""
        ...


@dataclass
class Daemon:
    """Keeps every configured identity renewed until asked to stop."""

    make_planner: Callable[[], Planner]
    now: Callable[[], datetime]
    # Receives one line whenever what the daemon is doing changes (systemd STATUS=).
    status: Callable[[str], None] = lambda line: None
    wake: threading.Event = field(default_factory=threading.Event)
    max_sleep: float = MAX_SLEEP_S
    _stop: bool = False
    _reload: bool = False
    _planner: Planner | None = None
    _last_logged: dict[str, tuple[str, datetime]] = field(default_factory=dict)

    def request_stop(self) -> None:
        """Stop after the current step (signal-handler safe: sets flags only)."""
        self._stop = True
        self.wake.set()

    def request_reload(self) -> None:
        """Re-read the configuration and re-plan before the next sleep."""
        self._reload = True
        self.wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop

    def _load(self) -> None:
        self._planner = self.make_planner()
        self._last_logged.clear()

    def step(self) -> float | None:
        """Renew what is due now; return seconds until the next event (None: nothing to do)."""
        if self._reload or self._planner is None:
            first = self._planner is None
            self._reload = False
            try:
                self._load()
                if not first:
                    log.info("configuration reloaded")
            except ConfigError as e:
                if first:
                    raise
                log.error("configuration reload failed, keeping the previous one: %s", e)
        assert self._planner is not None
        planner = self._planner
        now = self.now()
        earliest: float | None = None
        next_event: tuple[float, str, Decision] | None = None
        for name in list(planner.identities()):
            if self._stop:
                return None
            try:
                decision = planner.plan(name, now)
            except TpmidError as e:
                log.error("%s: cannot plan renewal: %s", name, e)
                continue
            if decision.action == "wait-for-clock":
                self._log_decision(name, decision)
                delay = max(60.0, (decision.when - now).total_seconds())
            elif decision.when <= now:
                log.info("%s: renewing now (%s)", name, decision.reason)
                self.status(f"renewing {name}")
                try:
                    planner.renew(name, now)
                except Cancelled:
                    log.info("%s: renewal interrupted: stopping", name)
                    return None
                except TpmidError as e:
                    # An outage never kills the daemon: the failure is recorded by the
                    # planner and the next plan() schedules the retry.
                    log.warning("%s: renewal failed: %s", name, e)
                except Exception:
                    log.exception("%s: unexpected error during renewal", name)
                now = self.now()
                try:
                    decision = planner.plan(name, now)
                except TpmidError as e:
                    log.error("%s: cannot plan renewal: %s", name, e)
                    continue
                self._log_decision(name, decision)
                # Never re-attempt within a second, whatever the plan says: a policy
                # bug must not turn into a renewal storm against the CA.
                delay = max(MIN_RETRY_S, (decision.when - now).total_seconds())
            else:
                self._log_decision(name, decision)
                delay = (decision.when - now).total_seconds()
            earliest = delay if earliest is None else min(earliest, delay)
            if next_event is None or delay < next_event[0]:
                next_event = (delay, name, decision)
        if next_event is None:
            self.status("idle: nothing to renew")
        else:
            _, name, decision = next_event
            self.status(f"idle; next: {describe_decision(decision, name)}")
        return earliest

    def _log_decision(self, name: str, d: Decision) -> None:
        key = (d.action, d.when)
        if self._last_logged.get(name) == key:
            return
        self._last_logged[name] = key
        log.info("%s", describe_decision(d, name))

    def run(self) -> int:
        """Run until :meth:`request_stop`; return 0. A bad config at start raises ConfigError."""
        while not self._stop:
            delay = self.step()
            if self._stop:
                break
            timeout = self.max_sleep if delay is None else min(max(delay, 0.0), self.max_sleep)
            if timeout > 0:
                self.wake.wait(timeout)
            self.wake.clear()
        log.info("stopped")
        return 0
