"""Waits a stopping daemon can cut short: :func:`interruptible` and :class:`Cancelled`.

The daemon must stop within a second of SIGTERM whatever the network or the TPM
does. Its renewals run on the main thread, and a blocking ``connect``,
``recv``, ``sleep`` or ``flock`` wait is interrupted by a signal (the system
call returns EINTR and Python runs the handler). If the handler raises, the wait
raises. Raising at an arbitrary point would be unsafe (in the middle of a store
commit, or while a TPM object is being flushed), so the handler raises only
while the main thread is inside an :func:`interruptible` region: around a
socket wait, a 202 wait, a TPM response wait or a lock wait, where nothing but
waiting is going on. Elsewhere :func:`request` only records the request, and
the next region (or :func:`check`) raises at its start.

What was in flight stays as crash recovery would find it: a request sent to the
server stays in the store's journal and is resent at the next start
(RFC 7030 §4.2.3).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from tpmid.errors import TpmidError


class Cancelled(TpmidError):
    """The process was asked to stop while it waited (SIGTERM in the daemon)."""

    exit_code = 1


_requested = False
_depth = 0  # nesting of interruptible regions on the main thread


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def request() -> None:
    """Ask the waits of this process to stop (call from a signal handler).

    Raises :class:`Cancelled` at once when the main thread is waiting inside an
    :func:`interruptible` region (which is where a signal handler then runs).
    """
    global _requested
    _requested = True
    if _depth > 0 and _on_main_thread():
        raise Cancelled("interrupted: tpmid is stopping")


def requested() -> bool:
    """True once :func:`request` was called (and until :func:`reset`)."""
    return _requested


def reset() -> None:
    """Forget a request (tests; a daemon that goes on after a reload)."""
    global _requested
    _requested = False


def check() -> None:
    """Raise :class:`Cancelled` if a stop was requested."""
    if _requested:
        raise Cancelled("interrupted: tpmid is stopping")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A region that only waits: a stop request raises :class:`Cancelled` inside it.

    Only the main thread's regions count (signal handlers run there); on other
    threads this is a no-op apart from the check at the start.
    """
    global _depth
    check()
    if not _on_main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def sleep(seconds: float) -> None:
    """``time.sleep`` that a stop request cuts short (raising :class:`Cancelled`)."""
    with interruptible():
        time.sleep(max(0.0, seconds))
