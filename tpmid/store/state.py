"""Per-identity state files: the last attempt and the last decision (``state/<name>.json``).

The state only spaces retries and feeds ``tpmid status``; losing it must never
stop a renewal, so an unreadable file is ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tpmid.policy import AttemptState, Decision
from tpmid.store.fsio import atomic_write
from tpmid.store.journal import iso_or_none, parse_delay, parse_time

log = logging.getLogger(__name__)

DECISION_ACTIONS = ("renew-now", "renew-at", "retry-at", "wait-for-clock")


def attempt_to_json(a: AttemptState) -> dict[str, Any]:
    """The JSON form of an attempt state."""
    d: dict[str, Any] = {"last_attempt": iso_or_none(a.last_attempt),
                         "last_error": a.last_error, "retry_after": a.retry_after,
                         "failures": a.failures}
    if a.key_lost:
        d["key_lost"] = True
    return d


def attempt_from_json(d: Any) -> AttemptState:
    """Parse an attempt state; ValueError or TypeError for anything unexpected."""
    if not isinstance(d, dict):
        raise ValueError("attempt must be an object")
    failures = d.get("failures") or 0
    if isinstance(failures, bool) or not isinstance(failures, int) or not 0 <= failures < 10**6:
        raise ValueError(f"failures {failures!r} is not a count")
    error = d.get("last_error")
    if error is not None and not isinstance(error, str):
        raise ValueError("last_error must be a string")
    return AttemptState(last_attempt=parse_time(d.get("last_attempt")),
                        last_error=error[:1000] if error else error,
                        retry_after=parse_delay(d.get("retry_after")),
                        failures=failures, key_lost=d.get("key_lost") is True)


def decision_to_json(dec: Decision) -> dict[str, Any]:
    """The JSON form of a renewal decision."""
    return {"action": dec.action, "when": dec.when.isoformat(), "reason": dec.reason,
            "jitter_s": dec.jitter_s}


def decision_from_json(d: Any) -> Decision:
    """Parse a renewal decision; ValueError or TypeError for anything unexpected."""
    if not isinstance(d, dict) or d.get("action") not in DECISION_ACTIONS:
        raise ValueError("bad decision")
    when = parse_time(d.get("when"))
    if when is None:
        raise ValueError("decision without time")
    jitter = d.get("jitter_s") or 0.0
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) \
            or not math.isfinite(jitter):
        raise ValueError("jitter_s must be a number")
    return Decision(action=d["action"], when=when, reason=str(d.get("reason", ""))[:1000],
                    jitter_s=float(jitter))


def read_state_file(path: Path, name: str) -> dict[str, Any]:
    """The JSON object in ``path`` ({} when missing or unreadable, with a warning)."""
    try:
        d = json.loads(path.read_bytes())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return d
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: ignoring unreadable state file %s (%s)", name, path, e)
        return {}


def write_state_file(path: Path, d: dict[str, Any]) -> None:
    """Durably replace ``path`` with the JSON object ``d`` (0600)."""
    atomic_write(path, json.dumps(d, indent=2, sort_keys=True).encode() + b"\n", 0o600)


def load_attempt(path: Path, name: str) -> AttemptState:
    """The attempt state in ``path`` (a fresh one if none or unreadable)."""
    d = read_state_file(path, name)
    try:
        return attempt_from_json(d["attempt"]) if "attempt" in d else AttemptState()
    except (ValueError, TypeError) as e:
        log.warning("%s: ignoring unreadable attempt state (%s)", name, e)
        return AttemptState()


def load_decision(path: Path, name: str) -> Decision | None:
    """The last decision in ``path``, None if none or unreadable."""
    d = read_state_file(path, name).get("decision")
    if d is None:
        return None
    try:
        return decision_from_json(d)
    except (ValueError, TypeError):
        return None


def load_damage(path: Path, name: str) -> dict[str, str | None] | None:
    """The damage note in ``path`` (strings only), None if none or unreadable."""
    d = read_state_file(path, name).get("damage")
    if not isinstance(d, dict):
        return None
    return {k: (str(v)[:500] if v is not None else None)
            for k, v in d.items() if k in ("version", "problem", "fell_back_to", "at")}


def update(path: Path, name: str, key: str, value: dict[str, Any] | None) -> None:
    """Replace one part (``attempt``, ``decision``, ``damage``) of the state file; None drops it."""
    d = read_state_file(path, name)
    if value is None:
        d.pop(key, None)
    else:
        d[key] = value
    write_state_file(path, d)
