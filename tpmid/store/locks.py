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
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tpmid.errors import StoreError

TPM_LOCK_NAME = "_tpm.lock"  # identity names start with a letter or digit: no clash


def acquire_lock(path: Path, *, wait: bool, timeout: float | None,
                  busy: Callable[[str], str], hint: str) -> int:
    """An exclusive flock(2) on ``path``; the returned fd holds it until :func:`release_lock`."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        # A lock file created by another user: flock works on a read-only fd too.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot open lock file {path}: {e.strerror}",
                             hint="run tpmid as the user that owns the store") from e
    except OSError as e:
        raise StoreError(f"cannot open lock file {path}: {e.strerror}") from e
    deadline = None if timeout is None else time.monotonic() + timeout
    blocking = wait and timeout is None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                remaining = 0.0 if deadline is None else deadline - time.monotonic()
                if not wait or remaining <= 0:
                    raise StoreError(busy(lock_holder(path)), hint=hint) from None
                # flock has no timed wait; a short poll only while contended.
                time.sleep(min(0.05, remaining))
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
def host_tpm_lock(path: Path, *, wait: bool = True,
                  timeout: float | None = None) -> Iterator[None]:
    """Hold the host-wide TPM lock at ``path`` (``tpm.lock_file`` or the store's).

    Without a resource manager two processes' sessions and transient objects
    would collide in the TPM, so the daemon and the CLI take turns.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create {path.parent}: {e.strerror}") from e
    fd = acquire_lock(
        path, wait=wait, timeout=timeout,
        busy=lambda pid: f"the TPM is in use by another tpmid process ({pid})",
        hint="tpmid serialises TPM access (no resource manager); try again when it is done",
    )
    try:
        yield
    finally:
        release_lock(fd)


def lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"
