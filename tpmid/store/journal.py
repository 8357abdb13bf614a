"""The journal: work in flight for one identity, written before each step that can be lost.

One JSON file per identity (``journal/<name>.json``, 0600). Start-up recovery
(:mod:`tpmid.store.recovery`) reads it to resume or roll back what a killed
process left behind.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"[0-9]{4,}")


def iso_or_none(t: datetime | None) -> str | None:
    """``t`` as ISO 8601 for a JSON file (None stays None)."""
    return t.isoformat() if t is not None else None


# Longest delay a journal or state file may hold (a server's Retry-After is clamped
# to a day before it is written; anything beyond is damage or tampering).
MAX_STORED_DELAY_S = 7 * 86400.0


def parse_delay(v: Any) -> float | None:
    """A delay in seconds read from a JSON file: finite, not negative, bounded.

    Anything else (``1e+29``, NaN, a string) reads as None, with a warning: a
    value the code cannot handle must never get past the file.
    """
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
            or not 0 <= v <= MAX_STORED_DELAY_S:
        log.warning("ignoring an unusable delay %.40r in a state or journal file", v)
        return None
    return float(v)


def parse_time(v: Any) -> datetime | None:
    """An ISO 8601 time read from a JSON file; ValueError for anything else."""
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"expected an ISO 8601 time, got {v!r}")
    return datetime.fromisoformat(v)


Phase = Literal["staged", "submitted", "pending", "issued"]
PHASES: tuple[str, ...] = ("staged", "submitted", "pending", "issued")


@dataclass(frozen=True)
class JournalEntry:
    """Work in flight for one identity, persisted before each step that can be lost.

    ``phase``: ``staged`` (new key and CSR exist, nothing sent: rolled back at
    start-up), ``submitted`` (CSR sent, no answer recorded), ``pending`` (the
    server answered 202 Accepted with ``retry_after``, RFC 7030 §4.2.3: the same
    CSR must be resent), ``issued`` (a certificate arrived, not yet committed).
    The last three are resumed at start-up by resending ``csr_pem``.

    ``version`` names the staged key file ``keys/<name>/<version>.tss2.pem``;
    ``key_ref`` names a new TPM object that is not a file (for example
    ``persistent:0x81000010``) so that a rollback can release it. Journal the
    reference *before* creating the object. ``extra`` is free for the
    orchestration layer (strings only).
    """

    operation: Literal["enroll", "renew"]
    phase: Phase
    version: str | None = None
    key_ref: str | None = None
    csr_pem: str | None = None
    method: str | None = None
    retry_after: float | None = None
    previous_version: str | None = None
    started: datetime | None = None
    updated: datetime | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """Serialise for the journal file."""
        d = asdict(self)
        d["started"], d["updated"] = iso_or_none(self.started), iso_or_none(self.updated)
        d["extra"] = dict(self.extra)
        return json.dumps(d, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> JournalEntry:
        """Parse a journal file; ValueError on anything unexpected."""
        d = json.loads(data)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if d.get("operation") not in ("enroll", "renew") or d.get("phase") not in PHASES:
            raise ValueError("unknown operation or phase")
        version = d.get("version")
        if version is not None and not (isinstance(version, str)
                                        and VERSION_RE.fullmatch(version)):
            raise ValueError(f"bad version {version!r}")
        extra = d.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError("extra must be an object")
        ra = d.get("retry_after")
        for key in ("key_ref", "csr_pem", "method", "previous_version"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ValueError(f"{key} must be a string")
        return cls(
            operation=d["operation"], phase=d["phase"], version=version,
            key_ref=d.get("key_ref"), csr_pem=d.get("csr_pem"), method=d.get("method"),
            retry_after=parse_delay(ra),
            previous_version=d.get("previous_version"),
            started=parse_time(d.get("started")), updated=parse_time(d.get("updated")),
            extra={str(k): str(v) for k, v in extra.items()},
        )
