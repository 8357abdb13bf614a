"""The one default clock, and naive-datetime handling.

Everything that needs the time takes a ``now`` callable (STYLE.md §3); this is
the production default. Naive datetimes are taken as UTC (what
``cryptography``'s legacy accessors return).
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


def as_utc(t: datetime) -> datetime:
    """``t`` in UTC; a naive datetime is taken to be UTC already."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
