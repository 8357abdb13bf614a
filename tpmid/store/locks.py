"""Locks: ``flock(2)`` on files, so they vanish with the process that held them.

* the per-identity lock (``locks/<name>.lock``): no two tpmid processes renew one
  identity at once;
* the host-wide TPM lock (``tpm.lock_file``, default ``locks/_tpm.lock``):
  without a resource manager two processes' sessions and transient objects would
  collide in the TPM, so the daemon and the CLI take turns.

A lock file records the holder's PID so that a waiting process can name it.
There is no stale lock after a crash or power loss: the kernel releases
``flock`` locks with their descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tpmid import cancel
from tpmid.errors import StoreError

TPM_LOCK_NAME = "_tpm.lock"  # identity names start with a letter or digit: no clash


def acquire_lock(path: Path, *, wait: bool, timeout: float | None,
                 busy: Callable[[str], str], hint: str,
                 waiting: Callable[[str], None] | None = None) -> int:
    """An exclusive flock(2) on ``path``; the returned fd holds it until :func:`release_lock`.

    ``timeout`` bounds a wait (None: no bound); ``waiting(holder)`` is told once,
    after a second, that the lock is held by someone else (the holder named as
    "pid N: tpmid renew ldevid"). The wait is :func:`~tpmid.cancel.interruptible`.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as first:
        if not isinstance(first, PermissionError) and first.errno != errno.EROFS:
            raise StoreError(f"cannot open lock file {path}: {first.strerror}") from first
        # A lock file created by another user, or a read-only file system: flock
        # works on a read-only descriptor too.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            why = first if e.errno == errno.ENOENT else e  # it cannot be created
            raise StoreError(f"cannot open lock file {path}: {why.strerror}",
                             hint="run tpmid as the user that owns the store, on a writable "
                             "file system") from e
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    told = waiting is None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                remaining = float("inf") if deadline is None else deadline - now
                if not wait or remaining <= 0:
                    raise StoreError(busy(lock_holder(path)), hint=hint) from None
                if not told and now - start >= 1.0:
                    told = True
                    assert waiting is not None
                    waiting(lock_holder(path))
                # flock has no timed wait; a short poll only while contended.
                cancel.sleep(min(0.05, remaining))
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise StoreError(f"cannot lock {path}: {e.strerror}") from e
        raise
    # Record the holder so that a second process can name it in its message.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    """Release a lock from :func:`_acquire_lock` (clears the holder's pid first)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def host_tpm_lock(path: Path, *, wait: bool = True, timeout: float | None = None,
                  waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the host-wide TPM lock at ``path`` (``tpm.lock_file`` or the store's).

    Without a resource manager two processes' sessions and transient objects
    would collide in the TPM, so the daemon and the CLI take turns. Nobody holds
    it across a network exchange (:mod:`tpmid.tpm.lease`), so a turn is short;
    ``timeout`` (``tpm.lock_timeout``) bounds the wait for one anyway.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create {path.parent}: {e.strerror}") from e
    waited = "" if timeout is None else f" for {timeout:g} s (tpm.lock_timeout)"
    fd = acquire_lock(
        path, wait=wait, timeout=timeout, waiting=waiting,
        busy=lambda pid: f"the TPM is in use by another tpmid process ({pid})"
                         + (f"; waited{waited}" if wait else ""),
        hint="tpmid serialises TPM access (no resource manager); try again when it is done, "
             "or raise tpm.lock_timeout",
    )
    try:
        yield
    finally:
        release_lock(fd)


def lock_is_held(path: Path) -> bool:
    """True while some process holds the flock(2) on ``path`` (the file is left as it is)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StoreError(f"cannot open lock file {path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor drops a shared lock just taken
    return False


def lock_holder(path: Path) -> str:
    """The holder recorded in a lock file: "pid N: tpmid renew ldevid", "pid N" or "pid unknown"."""
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    if not pid.isdigit():
        return "pid unknown"
    command = _tpmid_command(pid)
    return f"pid {pid}: {command}" if command else f"pid {pid}"


def _tpmid_command(pid: str) -> str | None:
    """"tpmid renew ldevid" when process ``pid`` runs tpmid (its options left out)."""
    try:
        argv = [a.decode(errors="replace")
                for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return None
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "tpmid" or (arg == "tpmid.cli" and argv[i - 1] == "-m"):
            words: list[str] = []
            rest = iter(argv[i + 1:])
            for word in rest:
                if word in ("--config", "-c"):
                    next(rest, None)
                elif not word.startswith("-"):
                    words.append(word[:40])
            return " ".join(["tpmid", *words[:2]])
    return None
