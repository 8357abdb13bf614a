"""The durable identity store: certificates, key files, archive, journal, state, locks.

Layout under ``store.dir`` (documented in ``docs/store-and-renewal.md``)::

    certs/      0755  <name>/<version>/cert.pem, chain.pem (0644)
                      <name>/<version>/key.tss2.pem -> ../../../keys/<name>/<version>.tss2.pem
                      <name>/current -> <version>       (symlink, swapped by rename)
    keys/       0700  <name>/<version>.tss2.pem (0600)  (kind: file keys only)
    journal/    0700  <name>.json (0600)                work in flight
    state/      0700  <name>.json (0600)                AttemptState + last Decision
    locks/      0700  <name>.lock, _tpm.lock

Every write is atomic and durable (STYLE.md §10): a temporary file in the same
directory, ``fsync``, ``rename``, ``fsync`` of the directory. A version directory
is built under a temporary name and renamed into place, so it either exists
complete or not at all; ``current`` is a symlink replaced by ``rename(2)``, so a
reader always sees one complete version. The previous version (certificate and
key) stays in place until the new one is committed, and ``retention`` older
versions are kept for rollback and forensics.

Test hook: the module attribute :data:`step_hook`, when set, is called as
``step_hook(step, path)`` between the steps of :func:`atomic_write` and
:meth:`Store.commit` (step names in :data:`STEPS`). Tests set it in a child
process to ``SIGKILL`` that process between two steps and then check what a
fresh process finds on disk. Production code never sets it.

Locks are ``flock(2)`` on files under ``locks/``: they vanish with the process
that held them (no stale lock after a crash or power loss), and they exclude
other threads and processes alike. Only this module writes identities to disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tpmid.errors import StoreError, TpmidError
from tpmid.lifecycle.policy import AttemptState, Decision

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 2
TMP_PREFIX = ".tmp-"
KEY_SUFFIX = ".tss2.pem"
TPM_LOCK_NAME = "_tpm.lock"  # identity names start with a letter or digit: no clash

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # same rule as tpmid.config
_VERSION_RE = re.compile(r"[0-9]{4,}")

# (directory, mode): certs are public, everything else is private to the tpmid user.
_SUBDIRS: tuple[tuple[str, int], ...] = (
    ("certs", 0o755), ("keys", 0o700), ("journal", 0o700), ("state", 0o700), ("locks", 0o700),
)

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


def _step(step: str, path: Path) -> None:
    hook = step_hook
    if hook is not None:
        hook(step, path)


# --------------------------------------------------------------------------- file primitives


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise StoreError(f"cannot sync directory {path}: {e.strerror}") from e


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.urandom(4).hex()}")


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content.

    Temp file in the same directory (created 0600, then set to ``mode`` whatever
    the umask), ``fsync``, ``os.replace``, ``fsync`` of the directory.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except OSError as e:
        raise StoreError(f"cannot create {tmp}: {e.strerror}") from e
    try:
        try:
            os.fchmod(fd, mode)
            _write_fd(fd, data)
            _step("write:temp-written", path)
            os.fsync(fd)
        finally:
            os.close(fd)
        _step("write:temp-synced", path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise StoreError(f"cannot write {path}: {e.strerror}") from e
        raise
    _step("write:replaced", path)
    _fsync_dir(path.parent)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that does not exist yet (inside a temporary directory) and fsync it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            os.fchmod(fd, mode)
            _write_fd(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {e.strerror}") from e


def _who_can_write(mode: int) -> str:
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
            f"{what} {p} is writable by {_who_can_write(mode)} (mode {mode:04o}); "
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
                f"{_who_can_write(pmode)} (mode {pmode:04o}); another user could replace "
                f"{p}",
                hint=f"chmod go-w {parent}",
            )


def _mkdir(path: Path, mode: int) -> None:
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
        _fsync_dir(path.parent)
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
            f"store directory {path} is writable by {_who_can_write(cur)} (mode {cur:04o}); "
            "tpmid refuses it because another user could replace keys or certificates",
            hint=f"chmod {mode:o} {path}",
        )
    if mode & 0o077 == 0 and cur & 0o077:
        log.warning("%s is accessible by group or others (mode %04o); expected %04o",
                    path, cur, mode)


def _remove_tree(path: Path) -> None:
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except OSError as e:
        raise StoreError(f"cannot remove {path}: {e.strerror}") from e


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _dt(v: Any) -> datetime | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"expected an ISO 8601 time, got {v!r}")
    return datetime.fromisoformat(v)


# --------------------------------------------------------------------------- records


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
        d["started"], d["updated"] = _iso(self.started), _iso(self.updated)
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
                                        and _VERSION_RE.fullmatch(version)):
            raise ValueError(f"bad version {version!r}")
        extra = d.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError("extra must be an object")
        ra = d.get("retry_after")
        return cls(
            operation=d["operation"], phase=d["phase"], version=version,
            key_ref=d.get("key_ref"), csr_pem=d.get("csr_pem"), method=d.get("method"),
            retry_after=float(ra) if ra is not None else None,
            previous_version=d.get("previous_version"),
            started=_dt(d.get("started")), updated=_dt(d.get("updated")),
            extra={str(k): str(v) for k, v in extra.items()},
        )


@dataclass(frozen=True)
class StoredIdentity:
    """One committed version of an identity, as read from disk."""

    name: str
    version: str
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key_file: Path | None
    cert_path: Path
    chain_path: Path

    @property
    def not_before(self) -> datetime:
        """Start of validity (aware UTC)."""
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        """End of validity (aware UTC)."""
        return self.cert.not_valid_after_utc


@dataclass(frozen=True)
class RecoveryAction:
    """One thing :meth:`Store.recover` did or found; ``str()`` is the log line."""

    name: str
    action: Literal["resume", "rollback", "completed", "removed", "skipped", "error"]
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


def _attempt_to_json(a: AttemptState) -> dict[str, Any]:
    return {"last_attempt": _iso(a.last_attempt), "last_error": a.last_error,
            "retry_after": a.retry_after, "failures": a.failures}


def _attempt_from_json(d: Any) -> AttemptState:
    if not isinstance(d, dict):
        raise ValueError("attempt must be an object")
    ra = d.get("retry_after")
    return AttemptState(last_attempt=_dt(d.get("last_attempt")), last_error=d.get("last_error"),
                        retry_after=float(ra) if ra is not None else None,
                        failures=int(d.get("failures") or 0))


def _decision_to_json(dec: Decision) -> dict[str, Any]:
    return {"action": dec.action, "when": dec.when.isoformat(), "reason": dec.reason,
            "jitter_s": dec.jitter_s}


def _decision_from_json(d: Any) -> Decision:
    if not isinstance(d, dict) or d.get("action") not in (
            "renew-now", "renew-at", "retry-at", "wait-for-clock"):
        raise ValueError("bad decision")
    when = _dt(d.get("when"))
    if when is None:
        raise ValueError("decision without time")
    return Decision(action=d["action"], when=when, reason=str(d.get("reason", "")),
                    jitter_s=float(d.get("jitter_s") or 0.0))


# --------------------------------------------------------------------------- the store


def _acquire_lock(path: Path, *, wait: bool, timeout: float | None,
                  busy: Callable[[str], str], hint: str) -> int:
    """An exclusive flock(2) on ``path``; the returned fd holds it until :func:`_release_lock`."""
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
                    raise StoreError(busy(_lock_holder(path)), hint=hint) from None
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


def _release_lock(fd: int) -> None:
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
    fd = _acquire_lock(
        path, wait=wait, timeout=timeout,
        busy=lambda pid: f"the TPM is in use by another tpmid process ({pid})",
        hint="tpmid serialises TPM access (no resource manager); try again when it is done",
    )
    try:
        yield
    finally:
        _release_lock(fd)


class Store:
    """The on-disk home of every identity's certificates, key files, journal and state.

    Mutating methods expect the caller to hold :meth:`identity_lock` for the
    identity; :meth:`recover` takes the locks itself.
    """

    def __init__(self, root: Path, *, create: bool = True,
                 retention: int = DEFAULT_RETENTION) -> None:
        """Open (and with ``create``, make) the store at ``root``.

        Raises StoreError if ``root`` or one of its directories is writable by
        group or others, naming the path and the ``chmod`` that fixes it.
        """
        if retention < 0:
            raise ValueError("retention must not be negative")
        self.root = Path(os.path.abspath(root))
        self.retention = retention
        if create:
            try:
                self.root.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create {self.root.parent}: {e.strerror}") from e
            _mkdir(self.root, 0o755)
        elif not self.root.is_dir():
            raise StoreError(f"store directory {self.root} does not exist",
                             hint="enroll an identity first (tpmid enroll NAME) or fix store.dir")
        check_private_path(self.root, "store directory")
        for sub, mode in _SUBDIRS:
            path = self.root / sub
            if create or path.exists():
                _mkdir(path, mode)

    # ----------------------------------------------------------------- paths

    def _check_name(self, name: str) -> None:
        if not _NAME_RE.fullmatch(name):
            raise StoreError(f"{name!r} is not a valid identity name "
                             "(letters, digits, '_', '.', '-'; starting with a letter or digit)")

    def _dir(self, sub: str) -> Path:
        path = self.root / sub
        _mkdir(path, dict(_SUBDIRS)[sub])
        return path

    def _cert_dir(self, name: str) -> Path:
        return self.root / "certs" / name

    def _key_dir(self, name: str) -> Path:
        return self.root / "keys" / name

    def _journal_path(self, name: str) -> Path:
        return self.root / "journal" / f"{name}.json"

    def _state_path(self, name: str) -> Path:
        return self.root / "state" / f"{name}.json"

    def key_path(self, name: str, version: str) -> Path:
        """Where the key file of ``version`` lives (whether or not it exists)."""
        self._check_name(name)
        return self._key_dir(name) / f"{version}{KEY_SUFFIX}"

    def current_dir(self, name: str) -> Path:
        """The stable path ``certs/<name>/current`` (cert.pem, chain.pem, key.tss2.pem)."""
        self._check_name(name)
        return self._cert_dir(name) / "current"

    @staticmethod
    def key_version(key_file: Path) -> str:
        """The version a key file from :meth:`stage_key` belongs to."""
        v = Path(key_file).name.removesuffix(KEY_SUFFIX)
        if not _VERSION_RE.fullmatch(v):
            raise StoreError(f"{key_file} is not a key file of the store")
        return v

    # ----------------------------------------------------------------- locks

    @contextlib.contextmanager
    def identity_lock(self, name: str, *, wait: bool = True,
                      timeout: float | None = None) -> Iterator[None]:
        """Hold the per-identity lock: no two tpmid processes renew ``name`` at once.

        ``wait=False`` fails at once, ``timeout`` fails after that many seconds,
        with StoreError("ldevid is being renewed by another tpmid process (pid N)").
        """
        self._check_name(name)
        path = self._dir("locks") / f"{name}.lock"
        fd = _acquire_lock(
            path, wait=wait, timeout=timeout,
            busy=lambda pid: f"{name} is being renewed by another tpmid process ({pid})",
            hint="wait for it to finish, or stop the daemon (systemctl stop tpmid) first",
        )
        try:
            yield
        finally:
            _release_lock(fd)

    @contextlib.contextmanager
    def tpm_lock(self, path: Path | None = None, *, wait: bool = True,
                 timeout: float | None = None) -> Iterator[None]:
        """Hold the host-wide TPM lock (``tpm.lock_file``, default ``locks/_tpm.lock``)."""
        lock = Path(path) if path is not None else self._dir("locks") / TPM_LOCK_NAME
        with host_tpm_lock(lock, wait=wait, timeout=timeout):
            yield

    # ----------------------------------------------------------------- versions

    def _current_version(self, name: str) -> str | None:
        link = self._cert_dir(name) / "current"
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{link} is not a version pointer: {e.strerror}",
                             hint=f"tpmid reset {name} and enroll again") from e
        if not _VERSION_RE.fullmatch(target):
            raise StoreError(f"{link} points at {target!r}, which is not a version of {name}",
                             hint=f"tpmid reset {name} and enroll again")
        return target

    def versions(self, name: str) -> list[str]:
        """Committed versions of ``name`` (certificate directories), oldest first."""
        self._check_name(name)
        d = self._cert_dir(name)
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"cannot list {d}: {e.strerror}") from e
        found = [e.name for e in entries
                 if _VERSION_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        return sorted(found, key=int)

    def _key_versions(self, name: str) -> list[str]:
        d = self._key_dir(name)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"cannot list {d}: {e.strerror}") from e
        out = [n.removesuffix(KEY_SUFFIX) for n in names if n.endswith(KEY_SUFFIX)]
        return sorted((v for v in out if _VERSION_RE.fullmatch(v)), key=int)

    def _next_version(self, name: str) -> str:
        used = [int(v) for v in (*self.versions(name), *self._key_versions(name))]
        cur = self._current_version(name)
        if cur:
            used.append(int(cur))
        with contextlib.suppress(StoreError):
            entry = self.journal_get(name)
            if entry and entry.version:
                used.append(int(entry.version))
        return f"{max(used, default=0) + 1:04d}"

    def current(self, name: str) -> StoredIdentity | None:
        """The committed current version of ``name``, or None if it was never enrolled."""
        self._check_name(name)
        version = self._current_version(name)
        if version is None:
            return None
        return self._load_version(name, version)

    def _load_version(self, name: str, version: str) -> StoredIdentity:
        vdir = self._cert_dir(name) / version
        cert_path, chain_path = vdir / "cert.pem", vdir / "chain.pem"
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            chain_pem = chain_path.read_bytes()
        except FileNotFoundError as e:
            raise StoreError(f"{name} version {version} is incomplete: {e.filename} is missing",
                             hint=f"tpmid reset {name} and enroll again") from e
        except OSError as e:
            raise StoreError(f"cannot read {name} version {version}: {e.strerror}") from e
        except ValueError as e:
            raise StoreError(f"{cert_path} is not a PEM certificate",
                             hint=f"tpmid reset {name} and enroll again") from e
        try:
            chain = tuple(x509.load_pem_x509_certificates(chain_pem)) if chain_pem.strip() else ()
        except ValueError as e:
            raise StoreError(f"{chain_path} is not a PEM certificate chain") from e
        key_file: Path | None = None
        if os.path.lexists(vdir / "key.tss2.pem"):
            key_file = self._key_dir(name) / f"{version}{KEY_SUFFIX}"
            if not key_file.is_file():
                raise StoreError(f"the key file of {name} version {version} ({key_file}) "
                                 "is missing", hint=f"tpmid reset {name} and enroll again")
        return StoredIdentity(name=name, version=version, cert=cert, chain=chain,
                              key_file=key_file, cert_path=cert_path, chain_path=chain_path)

    def stage_key(self, name: str, key_pem: bytes) -> Path:
        """Write a new TSS2 key file durably, as a version that is not yet current.

        The version is :meth:`key_version` of the returned path; put it in the
        journal right away, or the next :meth:`recover` deletes the file.
        """
        self._check_name(name)
        self._dir("keys")
        kdir = self._key_dir(name)
        _mkdir(kdir, 0o700)
        path = kdir / f"{self._next_version(name)}{KEY_SUFFIX}"
        atomic_write(path, key_pem, 0o600)
        return path

    def commit(self, name: str, cert: x509.Certificate, chain: Sequence[x509.Certificate],
               key_file: Path | None) -> StoredIdentity:
        """Make ``cert`` (verified by the caller) with ``chain`` and ``key_file`` current.

        A key file from :meth:`stage_key` becomes that version's key; any other key
        file (the current one when ``rotate_key`` is off) is copied into the new
        version. ``None`` means the key is not a file (persistent, ek-derived).
        Writes the version directory, swaps ``current``, clears the journal, then
        prunes versions beyond the retention. The previous version stays usable
        until the swap.
        """
        self._check_name(name)
        self._dir("certs")
        cdir = self._cert_dir(name)
        _mkdir(cdir, 0o755)
        version: str | None = None
        key_data: bytes | None = None
        if key_file is not None:
            key_file = Path(key_file)
            if not key_file.is_file():
                raise StoreError(f"cannot commit {name}: key file {key_file} does not exist")
            kdir = self._key_dir(name)
            staged = key_file.name.removesuffix(KEY_SUFFIX)
            if (key_file.name.endswith(KEY_SUFFIX) and _VERSION_RE.fullmatch(staged)
                    and kdir.exists() and key_file.parent.resolve() == kdir.resolve()
                    and not (cdir / staged).exists()):
                version = staged
            else:
                try:
                    key_data = key_file.read_bytes()
                except OSError as e:
                    raise StoreError(f"cannot read key file {key_file}: {e.strerror}") from e
        if version is None:
            version = self._next_version(name)
            if key_data is not None:
                self._dir("keys")
                _mkdir(self._key_dir(name), 0o700)
                atomic_write(self.key_path(name, version), key_data, 0o600)

        # Tie the work in flight to this version first, so that a crash after the
        # version directory is written can be rolled forward by recover().
        with contextlib.suppress(StoreError):
            entry = self.journal_get(name)
            if entry is not None and entry.version != version:
                self.journal_update(name, dataclasses.replace(entry, version=version))

        # Build the version directory under a temporary name, then rename it into
        # place: it exists complete or not at all.
        tmp = cdir / f"{TMP_PREFIX}{version}.{os.urandom(4).hex()}"
        try:
            os.mkdir(tmp, 0o700)
        except OSError as e:
            raise StoreError(f"cannot create {tmp}: {e.strerror}") from e
        try:
            _write_new(tmp / "cert.pem", cert.public_bytes(Encoding.PEM), 0o644)
            _write_new(tmp / "chain.pem", b"".join(c.public_bytes(Encoding.PEM) for c in chain),
                       0o644)
            if key_file is not None:
                os.symlink(os.path.join("..", "..", "..", "keys", name, f"{version}{KEY_SUFFIX}"),
                           tmp / "key.tss2.pem")
            os.chmod(tmp, 0o755)
            _fsync_dir(tmp)
            _step("commit:temp-version", tmp)
            os.rename(tmp, cdir / version)
        except BaseException as e:
            with contextlib.suppress(StoreError):
                _remove_tree(tmp)
            if isinstance(e, OSError):
                raise StoreError(f"cannot write {name} version {version}: {e.strerror}") from e
            raise
        _fsync_dir(cdir)
        _step("commit:version-written", cdir / version)
        self._swap_current(name, version)
        _step("commit:current-swapped", cdir / "current")
        self.journal_clear(name)
        _step("commit:journal-cleared", self._journal_path(name))
        self._prune(name)
        log.info("%s: committed version %s (serial %x)", name, version, cert.serial_number)
        return self._load_version(name, version)

    def _swap_current(self, name: str, version: str) -> None:
        cdir = self._cert_dir(name)
        tmp = cdir / f"{TMP_PREFIX}current.{os.urandom(4).hex()}"
        try:
            os.symlink(version, tmp)
            os.replace(tmp, cdir / "current")  # rename(2) replaces the symlink atomically
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StoreError(f"cannot switch {name} to version {version}: {e.strerror}") from e
        _fsync_dir(cdir)

    def _remove_version(self, name: str, version: str) -> None:
        cdir, kdir = self._cert_dir(name), self._key_dir(name)
        vdir = cdir / version
        if vdir.is_dir():
            # Rename first so the version disappears in one step, then delete at leisure.
            gone = cdir / f"{TMP_PREFIX}gone-{version}.{os.urandom(4).hex()}"
            try:
                os.rename(vdir, gone)
            except OSError as e:
                raise StoreError(f"cannot remove {vdir}: {e.strerror}") from e
            _fsync_dir(cdir)
            _remove_tree(gone)
        key = kdir / f"{version}{KEY_SUFFIX}"
        if key.exists() or key.is_symlink():
            _remove_tree(key)
            _fsync_dir(kdir)

    def _prune(self, name: str) -> list[str]:
        cur = self._current_version(name)
        if cur is None:
            return []
        older = [v for v in self.versions(name) if int(v) < int(cur)]
        drop = older[:len(older) - self.retention] if len(older) > self.retention else []
        for v in drop:
            self._remove_version(name, v)
        return drop

    def discard_version(self, name: str, version: str) -> None:
        """Remove ``version`` (certificate directory and key file); never the current one.

        Does nothing if the version does not exist. Refuses the version that
        work in flight refers to.
        """
        self._check_version(name, version)
        self._remove_version(name, version)

    def discard_key(self, name: str, version: str) -> None:
        """Delete only the key file of a previous version (``rotate_key`` after the grace period).

        The certificate stays in the archive for forensics.
        """
        self._check_version(name, version)
        key = self.key_path(name, version)
        if key.exists():
            _remove_tree(key)
            _fsync_dir(key.parent)

    def _check_version(self, name: str, version: str) -> None:
        self._check_name(name)
        if not _VERSION_RE.fullmatch(version):
            raise StoreError(f"{version!r} is not a version of {name}")
        if version == self._current_version(name):
            raise StoreError(f"refusing to discard {name} version {version}: it is the current one")
        entry = self.journal_get(name)
        if entry is not None and entry.version == version:
            raise StoreError(f"refusing to discard {name} version {version}: a {entry.operation} "
                             f"in flight ({entry.phase}) uses it")

    # ----------------------------------------------------------------- journal

    def journal_get(self, name: str) -> JournalEntry | None:
        """The work in flight for ``name``, or None."""
        self._check_name(name)
        path = self._journal_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read journal {path}: {e.strerror}") from e
        try:
            return JournalEntry.from_json(data)
        except (ValueError, TypeError, KeyError) as e:
            raise StoreError(f"journal {path} is unreadable ({e})",
                             hint="tpmid rolls it back at the next start-up") from e

    def journal_begin(self, name: str, entry: JournalEntry) -> None:
        """Record new work in flight; refuses if ``name`` already has some."""
        self._check_name(name)
        existing = self._journal_path(name)
        if existing.exists():
            raise StoreError(f"{name} already has a renewal in flight ({existing})",
                             hint="resume it, or let start-up recovery roll it back")
        atomic_write(self._dir("journal") / f"{name}.json", entry.to_json(), 0o600)

    def journal_update(self, name: str, entry: JournalEntry) -> None:
        """Replace the work in flight (new phase, Retry-After, ...)."""
        self._check_name(name)
        path = self._journal_path(name)
        if not path.exists():
            raise StoreError(f"{name} has no renewal in flight to update")
        atomic_write(path, entry.to_json(), 0o600)

    def journal_clear(self, name: str) -> None:
        """Forget the work in flight (after commit or rollback)."""
        self._check_name(name)
        path = self._journal_path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"cannot remove journal {path}: {e.strerror}") from e
        _fsync_dir(path.parent)

    # ----------------------------------------------------------------- state

    def _read_state(self, name: str) -> dict[str, Any]:
        path = self._state_path(name)
        try:
            d = json.loads(path.read_bytes())
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            return d
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # The state only spaces retries; losing it must not stop renewals.
            log.warning("%s: ignoring unreadable state file %s (%s)", name, path, e)
            return {}

    def _write_state(self, name: str, d: dict[str, Any]) -> None:
        atomic_write(self._dir("state") / f"{name}.json",
                     json.dumps(d, indent=2, sort_keys=True).encode() + b"\n", 0o600)

    def load_state(self, name: str) -> AttemptState:
        """The identity's attempt state (a fresh one if none or unreadable)."""
        self._check_name(name)
        d = self._read_state(name)
        try:
            return _attempt_from_json(d["attempt"]) if "attempt" in d else AttemptState()
        except (ValueError, TypeError) as e:
            log.warning("%s: ignoring unreadable attempt state (%s)", name, e)
            return AttemptState()

    def save_state(self, name: str, state: AttemptState) -> None:
        """Persist the attempt state (keeps the last decision)."""
        self._check_name(name)
        d = self._read_state(name)
        d["attempt"] = _attempt_to_json(state)
        self._write_state(name, d)

    def load_decision(self, name: str) -> Decision | None:
        """The last decision saved for ``tpmid status``, if any."""
        self._check_name(name)
        d = self._read_state(name).get("decision")
        if d is None:
            return None
        try:
            return _decision_from_json(d)
        except (ValueError, TypeError):
            return None

    def save_decision(self, name: str, decision: Decision) -> None:
        """Persist the last decision (keeps the attempt state)."""
        self._check_name(name)
        d = self._read_state(name)
        d["decision"] = _decision_to_json(decision)
        self._write_state(name, d)

    # ----------------------------------------------------------------- reset

    def remove_identity(self, name: str) -> None:
        """Delete everything stored for ``name`` (``tpmid reset``); the lock file stays.

        Call :meth:`journal_get` first if the work in flight may hold a TPM
        object (``key_ref``) that must be released.
        """
        self._check_name(name)
        cdir = self._cert_dir(name)
        # Drop the pointer first: from then on the identity reads as not enrolled.
        if os.path.lexists(cdir / "current"):
            _remove_tree(cdir / "current")
            _fsync_dir(cdir)
        for path in (cdir, self._key_dir(name), self._journal_path(name), self._state_path(name)):
            if os.path.lexists(path):
                _remove_tree(path)
                _fsync_dir(path.parent)

    # ----------------------------------------------------------------- recovery

    def _names(self) -> list[str]:
        names: set[str] = set()
        for sub in ("certs", "keys"):
            with contextlib.suppress(OSError):
                names.update(n for n in os.listdir(self.root / sub) if _NAME_RE.fullmatch(n))
        for sub in ("journal", "state"):
            with contextlib.suppress(OSError):
                for n in os.listdir(self.root / sub):
                    base = n.removeprefix(TMP_PREFIX)
                    if base != n:
                        base = base.rsplit(".", 1)[0]  # .tmp-<name>.json.<random>
                    if base.endswith(".json") and _NAME_RE.fullmatch(base[:-5]):
                        names.add(base[:-5])
        return sorted(names)

    def recover(self, *, release_key_ref: Callable[[str, str], None] | None = None) -> list[str]:
        """Start-up recovery; returns one human-readable line per action.

        See :meth:`recover_actions`.
        """
        return [str(a) for a in self.recover_actions(release_key_ref=release_key_ref)]

    def recover_actions(
        self, *, release_key_ref: Callable[[str, str], None] | None = None,
    ) -> list[RecoveryAction]:
        """Resume or roll back each identity's journal, then remove leftovers.

        Per identity (skipped if another process holds its lock):

        * a journal whose version is already current, or whose version directory
          was written before a crash, is completed (``current`` swapped, journal
          cleared);
        * a ``staged`` entry, or one that lost its CSR or key file, is rolled
          back: ``release_key_ref(name, key_ref)`` releases a TPM object that is
          not a file (without the callback, or if it fails, the entry stays for
          the next start-up), the staged key file is deleted, the journal cleared;
        * ``submitted``/``pending``/``issued`` entries are kept for resumption
          (resend the same CSR, RFC 7030 §4.2.3);
        * then temporary files, version directories that never became current,
          versions older than the retention and key files no version or journal
          refers to are removed. The current version is never touched.
        """
        actions: list[RecoveryAction] = []
        for name in self._names():
            fd = self._try_lock(name)
            if fd is None:
                actions.append(RecoveryAction(name, "skipped",
                                              "skipped: another tpmid process holds its lock"))
                continue
            try:
                self._recover_one(name, release_key_ref, actions)
            except StoreError as e:
                actions.append(RecoveryAction(name, "error", f"recovery failed: {e}"))
            finally:
                _release_lock(fd)
        for a in actions:
            log.info("recovery: %s", a)
        return actions

    def _try_lock(self, name: str) -> int | None:
        try:
            return _acquire_lock(self._dir("locks") / f"{name}.lock", wait=False, timeout=None,
                                 busy=lambda pid: pid, hint="")
        except StoreError:
            return None

    def _recover_one(self, name: str, release: Callable[[str, str], None] | None,
                     actions: list[RecoveryAction]) -> None:
        def act(kind: Literal["resume", "rollback", "completed", "removed", "error"],
                detail: str) -> None:
            actions.append(RecoveryAction(name, kind, detail))

        cdir, kdir = self._cert_dir(name), self._key_dir(name)

        # 1. Temporary files and directories of interrupted writes.
        tmps: list[Path] = []
        for d in (cdir, kdir):
            with contextlib.suppress(FileNotFoundError):
                tmps += [d / n for n in os.listdir(d) if n.startswith(TMP_PREFIX)]
        own_tmp = re.compile(re.escape(f"{TMP_PREFIX}{name}.json.") + r"[0-9a-f]{8}")
        for d in (self.root / "journal", self.root / "state"):
            with contextlib.suppress(FileNotFoundError):
                tmps += [d / n for n in os.listdir(d) if own_tmp.fullmatch(n)]
        for t in tmps:
            _remove_tree(t)
            _fsync_dir(t.parent)
        if tmps:
            act("removed", f"removed {len(tmps)} temporary file(s) of an interrupted write")

        # 2. The current version must be intact before anything else is judged.
        current = self._current_version(name)
        if current is not None and not (cdir / current).is_dir():
            act("error", f"current points at missing version {current}; not touching anything "
                         f"(tpmid reset {name} and enroll again)")
            return

        # 3. The journal, then 4. leftovers nothing refers to.
        keep: set[str] = set()
        try:
            entry = self.journal_get(name)
        except StoreError:
            self.journal_clear(name)
            act("rollback", "discarded an unreadable journal")
            entry = None
        if entry is not None:
            current = self._settle_journal(name, entry, current, release, keep, act)
        self._cleanup(name, current, keep, act)

    def _settle_journal(
        self, name: str, entry: JournalEntry, current: str | None,
        release: Callable[[str, str], None] | None, keep: set[str],
        act: Callable[[Literal["resume", "rollback", "completed", "error"], str], None],
    ) -> str | None:
        """Complete, resume or roll back one journal entry; return the current version."""
        cdir, kdir = self._cert_dir(name), self._key_dir(name)
        v = entry.version
        if v is not None and v == current:
            self.journal_clear(name)
            act("completed", f"finished the interrupted commit of version {v}")
            return current
        if v is not None and (cdir / v).is_dir() and (current is None or int(v) > int(current)):
            # The version directory is only written after verification (commit's
            # contract), so rolling forward is safe and keeps the new certificate.
            self._swap_current(name, v)
            self.journal_clear(name)
            act("completed", f"completed the interrupted commit: version {v} is now current")
            return v
        key_missing = v is not None and not (kdir / f"{v}{KEY_SUFFIX}").is_file()
        if entry.phase != "staged" and entry.csr_pem and not key_missing:
            if v:
                keep.add(v)
            ra = (f", server asked to retry after {entry.retry_after:g}s"
                  if entry.retry_after is not None else "")
            act("resume", f"{entry.operation} in flight (phase {entry.phase}{ra}); "
                          "keeping its key and CSR to resend")
            return current

        why = ("its key file is missing" if key_missing else
               "it had no CSR" if not entry.csr_pem else "nothing was sent yet")
        if entry.key_ref is not None:
            problem = None
            if release is None:
                problem = f"{entry.operation} in flight holds TPM object {entry.key_ref}"
            else:
                try:
                    release(name, entry.key_ref)
                except TpmidError as e:
                    problem = f"cannot release TPM object {entry.key_ref} ({e})"
            if problem is not None:
                # Keep the entry (and its staged key) so the next start-up tries again:
                # forgetting the reference would orphan a persistent TPM object.
                if v:
                    keep.add(v)
                act("error", f"{problem}; kept for the next start-up")
                return current
        what = ""
        if v is not None and not key_missing:
            _remove_tree(kdir / f"{v}{KEY_SUFFIX}")
            _fsync_dir(kdir)
            what = f" (deleted staged key version {v})"
        if entry.key_ref:
            what += f" (released {entry.key_ref})"
        self.journal_clear(name)
        act("rollback", f"rolled back the unfinished {entry.operation}: {why}{what}")
        return current

    def _cleanup(self, name: str, current: str | None, keep: set[str],
                 act: Callable[[Literal["removed"], str], None]) -> None:
        committed = self.versions(name)
        older = [v for v in committed if current is not None and int(v) < int(current)]
        retained = set(older[max(0, len(older) - self.retention):] if self.retention else [])
        for v in committed:
            if v == current or v in keep:
                continue
            if v in older and v in retained:
                continue
            self._remove_version(name, v)
            act("removed", f"removed version {v} " + (
                "(beyond the retention)" if v in older else "(never became current)"))
        alive = set(self.versions(name)) | keep
        for v in self._key_versions(name):
            if v not in alive:
                _remove_tree(self._key_dir(name) / f"{v}{KEY_SUFFIX}")
                _fsync_dir(self._key_dir(name))
                act("removed", f"removed orphaned key file of version {v}")


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"
