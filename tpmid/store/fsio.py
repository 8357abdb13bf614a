"""The one durable writer: every file tpmid persists goes through here.

STYLE.md §10: a temporary file in the same directory (created ``O_EXCL`` with an
unpredictable name, mode 0600 until it is complete), the whole buffer written
(short writes retried), ``fsync``, ``rename(2)`` over the target, ``fsync`` of the
directory. A crash leaves the old content or the new one, never a mix. The
identity store, the reference EST server's state and the provisioning manifest
(:func:`append_line`) all use it.

Also here: the directory and permission checks every persisted path passes
(:func:`make_dir`, :func:`check_private_path`): whoever can write a directory
above a key or a config file controls the device's identity.

Test seam: :data:`step_hook`, when set, is called as ``step_hook(step, path)``
between the steps of :func:`atomic_write` and of ``Store.commit`` (names in
:data:`STEPS`). Tests set it in a child process to SIGKILL that process between
two steps, or to raise ``OSError(ENOSPC)`` / ``OSError(EROFS)`` where a full or
read-only disk would; production code never sets it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from tpmid.errors import StoreError, TpmidError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"

StepHook = Callable[[str, Path], None]
#: Test hook, see the module docstring. ``None`` in production.
step_hook: StepHook | None = None
STEPS: tuple[str, ...] = (
    "write:temp-written",       # data written to the temp file, not yet fsynced
    "write:temp-synced",        # temp file fsynced and closed, not yet renamed
    "write:replaced",           # renamed over the target, directory not yet fsynced
    "commit:temp-version",      # version directory complete under its temporary name
    "commit:version-written",   # new version directory in place, current not yet swapped
    "commit:current-swapped",   # current points at the new version, journal not yet cleared
    "commit:journal-cleared",   # journal cleared, older versions not yet pruned
)


def mark_step(step: str, path: Path) -> None:
    """Call :data:`step_hook` (tests only) at durable step ``step`` of ``path``."""
    hook = step_hook
    if hook is not None:
        hook(step, path)


# --------------------------------------------------------------------------- file primitives


def fsync_dir(path: Path) -> None:
    """``fsync`` the directory ``path`` so that a rename or unlink in it is durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise StoreError(f"cannot sync directory {path}: {e.strerror}") from e


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, retrying short writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def temp_name(path: Path) -> Path:
    """An unpredictable temporary name beside ``path`` (``.tmp-NAME.<random>``)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.urandom(4).hex()}")


def atomic_write(path: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content.

    Temp file in the same directory (created 0600, then set to ``mode`` whatever
    the umask), ``fsync``, ``os.replace``, ``fsync`` of the directory. Without
    ``durable`` the two ``fsync`` calls are left out: for records that mean
    nothing after a power loss (which TPM objects a process holds), whose writes
    must not wear out a device's flash.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except OSError as e:
        raise StoreError(f"cannot create {tmp}: {e.strerror}") from e
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            if durable:  # only durable writes are steps of the crash-safety tests
                mark_step("write:temp-written", path)
                os.fsync(fd)
        finally:
            os.close(fd)
        if durable:
            mark_step("write:temp-synced", path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise StoreError(f"cannot write {path}: {e.strerror}") from e
        raise
    if durable:
        mark_step("write:replaced", path)
        fsync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that does not exist yet (inside a temporary directory) and fsync it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror}") from e


def who_can_write(mode: int) -> str:
    who = [w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if mode & bit]
    return " and ".join(who)


def check_private_path(
    path: os.PathLike[str] | str,
    what: str = "path",
    *,
    error: type[TpmidError] = StoreError,
) -> None:
    """Refuse ``path`` if group or others can write it or any directory above it.

    Whoever can write a config file or a key directory (or replace it through a
    writable parent) controls the device's identity. Sticky directories such as
    ``/tmp`` are accepted, as OpenSSH does. Raises ``error`` (StoreError by
    default; the CLI passes ConfigError for the config file) naming the path
    and the ``chmod`` that fixes it.
    """
    p = Path(os.path.abspath(path))
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{what} {p} does not exist") from None
    except OSError as e:
        raise error(f"cannot inspect {what} {p}: {e.strerror}") from e
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise error(
            f"{what} {p} is writable by {who_can_write(mode)} (mode {mode:04o}); "
            "tpmid refuses it because another user could replace its contents",
            hint=f"chmod go-w {p}",
        )
    seen: set[Path] = set()
    for parent in [*p.parents, *p.resolve().parents]:
        if parent in seen:
            continue
        seen.add(parent)
        try:
            pst = os.stat(parent)
        except OSError:
            continue
        pmode = stat.S_IMODE(pst.st_mode)
        if pmode & (stat.S_IWGRP | stat.S_IWOTH) and not pmode & stat.S_ISVTX:
            raise error(
                f"{what} {p} is inside {parent}, which is writable by "
                f"{who_can_write(pmode)} (mode {pmode:04o}); another user could replace "
                f"{p}",
                hint=f"chmod go-w {parent}",
            )


def make_dir(path: Path, mode: int) -> None:
    """Create ``path`` with exactly ``mode``, or check an existing one is not writable by others."""
    try:
        os.mkdir(path, mode)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise StoreError(f"cannot create directory {path}: {e.strerror}") from e
    if created:
        try:
            os.chmod(path, mode)  # mkdir's mode is filtered by the umask
        except OSError as e:
            raise StoreError(f"cannot set the mode of {path}: {e.strerror}") from e
        fsync_dir(path.parent)
        return
    try:
        st = os.lstat(path)
    except OSError as e:
        raise StoreError(f"cannot inspect {path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} should be a directory but is not",
                         hint=f"move {path} away; tpmid recreates it")
    cur = stat.S_IMODE(st.st_mode)
    if cur & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(
            f"store directory {path} is writable by {who_can_write(cur)} (mode {cur:04o}); "
            "tpmid refuses it because another user could replace keys or certificates",
            hint=f"chmod {mode:o} {path}",
        )
    if mode & 0o077 == 0 and cur & 0o077:
        log.warning("%s is accessible by group or others (mode %04o); expected %04o",
                    path, cur, mode)


def remove_tree(path: Path) -> None:
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except OSError as e:
        raise StoreError(f"cannot remove {path}: {e.strerror}") from e




def open_append(path: Path, mode: int) -> tuple[int, bool]:
    """An ``O_APPEND`` descriptor for ``path`` and whether this call created the file."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, mode), True
    except FileExistsError:
        return os.open(path, flags), False


def append_line(fd: int, data: bytes, path: Path, *, new_file: bool = True) -> None:
    """Append ``data`` (one record) to the ``O_APPEND`` descriptor ``fd`` durably.

    One ``write(2)`` under an exclusive ``flock(2)``, so concurrent appenders (other
    devices on a station share, other threads of a server) never interleave; a
    short write (full disk, quota) is cut back off so that no reader ever sees half a
    line. Then, with the lock released so that appenders do not queue behind each
    other's disk flush, ``fsync`` of the file, and of its directory when the file is
    new (``new_file``; :func:`open_append` tells): its entry must be durable too.
    The call returns only once the record is on disk.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            mark_step("append:locked", path)
            n = os.write(fd, data)
            if n != len(data):
                os.ftruncate(fd, os.fstat(fd).st_size - n)
                raise StoreError(f"{path} is full: wrote {n} of {len(data)} bytes",
                                 hint="free space on the file system that holds it")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.fsync(fd)
    except OSError as e:
        raise StoreError(f"cannot append to {path}: {e.strerror}") from e
    if not new_file:
        return
    try:
        fsync_dir(Path(path).parent)
    except StoreError as e:
        # The record itself is on disk (fsynced); only a brand-new file's name
        # could still be lost. Reporting the run as failed would be worse.
        log.warning("%s", e)
