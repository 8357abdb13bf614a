"""How tpmid writes times, durations and renewal decisions for people.

One module so that every command and log line says it the same way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from tpmid.clock import as_utc


class Decision(Protocol):
    """What is rendered of a renewal decision (:class:`tpmid.policy.Decision`)."""

    @property
    def action(self) -> str: ...

    @property
    def when(self) -> datetime: ...

    @property
    def reason(self) -> str: ...

    @property
    def jitter_s(self) -> float: ...


def iso(t: datetime) -> str:
    """``2026-11-27T04:42:13Z``: UTC, whole seconds."""
    return as_utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: float) -> str:
    """``90`` → ``1min30s``, ``86400`` → ``1d``, ``0.6`` → ``0.6s`` (units as in the config)."""
    s = abs(seconds)
    if s < 10:
        return f"{s:.1f}".rstrip("0").rstrip(".") + "s"
    whole = round(s)
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    counts = []
    for _, size in units:
        counts.append(whole // size)
        whole %= size
    first = next(i for i, c in enumerate(counts) if c)
    # The leading unit and the one below it are precise enough for a log line
    # ("4d3h", not "4d3h12min7s"; "3h", not "3h5s").
    return "".join(f"{counts[i]}{units[i][0]}" for i in (first, first + 1)
                   if i < len(units) and counts[i])


def describe_age(t: datetime, now: datetime) -> str:
    """``in 3d4h`` / ``5min ago`` relative to ``now``."""
    delta = (t - now).total_seconds()
    if abs(delta) < 1:
        return "now"
    text = format_duration(abs(delta))
    return f"in {text}" if delta > 0 else f"{text} ago"


def describe_decision(decision: Decision, identity: str) -> str:
    """One log line for the daemon.

    ``ldevid: next renewal 2026-12-01T10:00:00Z (80% of lifetime), jitter -3min``
    """
    d = decision
    if d.action == "renew-now":
        return f"{identity}: renew now ({d.reason})"
    if d.action == "retry-at":
        return f"{identity}: next retry {iso(d.when)} ({d.reason})"
    if d.action == "wait-for-clock":
        return (f"{identity}: clock looks wrong ({d.reason}); waiting for a plausible clock "
                f"(not before {iso(d.when)}), keeping the current certificate")
    line = f"{identity}: next renewal {iso(d.when)} ({d.reason})"
    if d.jitter_s:
        line += f", jitter -{format_duration(d.jitter_s)}"
    return line
