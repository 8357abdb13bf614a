"""The versioned identity store: certificates, key files, journal and state on disk.

Layout under ``store.dir`` (documented in ``docs/store-and-renewal.md``)::

    certs/      0755  <name>/<version>/cert.pem, chain.pem, fullchain.pem (0644), key-origin
                      (server-generated keys)
                      <name>/<version>/key.tss2.pem -> ../../../keys/<name>/<version>.tss2.pem
                      <name>/current -> <version>       (symlink, swapped by rename)
    keys/       0700  <name>/<version>.tss2.pem (0600)  (file keys only)
    journal/    0700  <name>.json (0600)                work in flight
    state/      0700  <name>.json (0600)                AttemptState + last Decision
    locks/      0700  <name>.lock, _tpm.lock

Every write goes through :mod:`tpmid.store.fsio`. A version directory is built
under a temporary name and renamed into place, so it either exists complete or
not at all; ``current`` is a symlink replaced by ``rename(2)``, so a reader
always sees one complete version. The previous version (certificate and key)
stays in place until the new one is committed, and ``retention`` older versions
are kept for rollback and forensics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from tpmid.errors import StoreError
from tpmid.policy import AttemptState, Decision
from tpmid.store import state as state_files
from tpmid.store.fsio import (
    TMP_PREFIX,
    atomic_write,
    check_private_path,
    fsync_dir,
    make_dir,
    mark_step,
    remove_tree,
    write_new,
)
from tpmid.store.journal import VERSION_RE, JournalEntry
from tpmid.store.locks import TPM_LOCK_NAME, acquire_lock, host_tpm_lock, release_lock

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 2
KEY_SUFFIX = ".tss2.pem"
KEY_ORIGIN = "key-origin"  # in a version directory: where its key came from (if not the TPM)
FULLCHAIN = "fullchain.pem"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # same rule as tpmid.config

# (directory, mode): certs are public, everything else is private to the tpmid user.
SUBDIRS: tuple[tuple[str, int], ...] = (
    ("certs", 0o755), ("keys", 0o700), ("journal", 0o700), ("state", 0o700), ("locks", 0o700),
    ("attestation", 0o755),
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
    # Where the key came from when not from the TPM itself: "server-generated" (RFC 7030
    # §4.4, imported into the TPM); None for a key the TPM made.
    key_origin: str | None = None
    # Leaf + issuing chain, the file most TLS consumers want (see :func:`full_chain`).
    fullchain_path: Path | None = None

    @property
    def not_before(self) -> datetime:
        """Start of validity (aware UTC)."""
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        """End of validity (aware UTC)."""
        return self.cert.not_valid_after_utc



def _self_signed(cert: x509.Certificate) -> bool:
    """``cert`` names itself as issuer and its signature verifies with its own key (a root)."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def full_chain(cert: x509.Certificate, chain: Sequence[x509.Certificate],
               server_sent: Sequence[x509.Certificate] = ()) -> list[x509.Certificate]:
    """``fullchain.pem``: the leaf, then its issuing chain, leaf first.

    A self-signed root is left out unless the server sent it with the issued
    certificate (``server_sent``): a TLS peer must already trust the root, and
    sending it only costs bytes (RFC 8446 §4.4.2 allows omitting it).
    """
    sent = {c.public_bytes(Encoding.DER) for c in server_sent}
    return [cert, *(c for c in chain
                    if not _self_signed(c) or c.public_bytes(Encoding.DER) in sent)]


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def _key_file_present(path: Path) -> bool:
    """The key file is there and not empty (its content is the TPM's to judge)."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


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
            make_dir(self.root, 0o755)
        elif not self.root.is_dir():
            raise StoreError(f"store directory {self.root} does not exist",
                             hint="enroll an identity first (`tpmid enroll` with its name) or fix store.dir")
        check_private_path(self.root, "store directory")
        for sub, mode in SUBDIRS:
            path = self.root / sub
            if create or path.exists():
                make_dir(path, mode)

    # ----------------------------------------------------------------- paths

    def _check_name(self, name: str) -> None:
        if not NAME_RE.fullmatch(name):
            raise StoreError(f"{name!r} is not a valid identity name "
                             "(letters, digits, '_', '.', '-'; starting with a letter or digit)")

    def _dir(self, sub: str) -> Path:
        path = self.root / sub
        make_dir(path, dict(SUBDIRS)[sub])
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
        if not VERSION_RE.fullmatch(v):
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
        fd = acquire_lock(
            path, wait=wait, timeout=timeout,
            busy=lambda pid: f"{name} is being renewed by another tpmid process ({pid})",
            hint="wait for it to finish, or stop the daemon (systemctl stop tpmid) first",
        )
        try:
            yield
        finally:
            release_lock(fd)

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
        if not VERSION_RE.fullmatch(target):
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
                 if VERSION_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
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
        return sorted((v for v in out if VERSION_RE.fullmatch(v)), key=int)

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
        hint = (f"tpmid renew {name} (or the daemon) falls back to an intact version, or "
                "enrolls again through the bootstrap identity")
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            chain_pem = chain_path.read_bytes()
        except FileNotFoundError as e:
            raise StoreError(f"{name} version {version} is damaged: {e.filename} is missing",
                             hint=hint) from e
        except OSError as e:
            raise StoreError(f"cannot read {name} version {version}: {e.strerror}") from e
        except ValueError as e:
            raise StoreError(f"{name} version {version} is damaged: {cert_path} is not a PEM "
                             "certificate (truncated?)", hint=hint) from e
        try:
            chain = tuple(x509.load_pem_x509_certificates(chain_pem)) if chain_pem.strip() else ()
        except ValueError as e:
            raise StoreError(f"{name} version {version} is damaged: {chain_path} is not a PEM "
                             "certificate chain", hint=hint) from e
        fullchain_path = vdir / FULLCHAIN
        problem = self._fullchain_problem(fullchain_path, cert, chain)
        if problem is not None:
            raise StoreError(f"{name} version {version} is damaged: {problem}", hint=hint)
        key_file: Path | None = None
        expected = self._key_dir(name) / f"{version}{KEY_SUFFIX}"
        if os.path.lexists(vdir / "key.tss2.pem"):
            key_file = expected
            if not _key_file_present(key_file):
                raise StoreError(f"{name} version {version} is damaged: its key file "
                                 f"{key_file} is missing or empty", hint=hint)
        origin: str | None = None
        with contextlib.suppress(OSError):
            origin = (vdir / KEY_ORIGIN).read_text(encoding="ascii").strip()[:40] or None
        return StoredIdentity(name=name, version=version, cert=cert, chain=chain,
                              key_file=key_file, cert_path=cert_path, chain_path=chain_path,
                              key_origin=origin, fullchain_path=fullchain_path)

    @staticmethod
    def _fullchain_problem(path: Path, cert: x509.Certificate,
                           chain: Sequence[x509.Certificate]) -> str | None:
        """Why ``fullchain.pem`` is not the leaf and (part of) its chain, or None."""
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except FileNotFoundError:
            return f"{path} is missing"
        except OSError as e:
            return f"cannot read {path}: {e.strerror}"
        except ValueError:
            return f"{path} is not a PEM certificate chain (truncated?)"
        if not certs or certs[0] != cert or any(c not in chain for c in certs[1:]):
            return f"{path} does not hold the version's certificate and chain"
        return None

    def repair_fullchain(self, name: str, version: str) -> bool:
        """Write ``fullchain.pem`` of ``version`` again from its cert.pem and chain.pem.

        For a version whose certificate and chain are intact but whose full
        chain is missing (committed before tpmid wrote one) or damaged: the file
        is derived data, so recovery rebuilds it rather than falling back to an
        older version. True if it was rewritten; False if nothing was wrong or
        the certificate or chain is damaged too.
        """
        self._check_name(name)
        vdir = self._cert_dir(name) / version
        try:
            cert = x509.load_pem_x509_certificate((vdir / "cert.pem").read_bytes())
            chain_pem = (vdir / "chain.pem").read_bytes()
            chain = tuple(x509.load_pem_x509_certificates(chain_pem)) if chain_pem.strip() else ()
        except (OSError, ValueError):
            return False
        if self._fullchain_problem(vdir / FULLCHAIN, cert, chain) is None:
            return False
        atomic_write(vdir / FULLCHAIN, _pem(full_chain(cert, chain)), 0o644)
        log.info("%s: rewrote %s of version %s from its certificate and chain", name,
                 FULLCHAIN, version)
        return True

    def version_problem(self, name: str, version: str) -> str | None:
        """Why ``version`` of ``name`` cannot be used (damaged, incomplete), or None if intact."""
        self._check_name(name)
        if not (self._cert_dir(name) / version).is_dir():
            return f"version {version} does not exist"
        try:
            self._load_version(name, version)
        except StoreError as e:
            return e.message
        return None

    def newest_intact(self, name: str, *, exclude: str | None = None) -> str | None:
        """The newest version of ``name`` that is complete and whose key file is there."""
        for v in reversed(self.versions(name)):
            if v != exclude and self.version_problem(name, v) is None:
                return v
        return None

    # ----------------------------------------------------------------- damage notes

    def note_damage(self, name: str, version: str, problem: str,
                    fell_back_to: str | None, at: datetime) -> None:
        """Record that ``version`` was found damaged and what recovery did about it.

        ``tpmid status`` reports it (with a non-zero exit) until the next commit.
        """
        self._check_name(name)
        self._dir("state")
        state_files.update(self._state_path(name), name, "damage", {
            "version": version, "problem": problem[:500], "fell_back_to": fell_back_to,
            "at": at.isoformat()})

    def load_damage(self, name: str) -> dict[str, str | None] | None:
        """The damage note of ``name`` (see :meth:`note_damage`), if any."""
        self._check_name(name)
        return state_files.load_damage(self._state_path(name), name)

    def stage_key(self, name: str, key_pem: bytes) -> Path:
        """Write a new TSS2 key file durably, as a version that is not yet current.

        The version is :meth:`key_version` of the returned path; put it in the
        journal right away, or the next :meth:`recover` deletes the file.
        """
        self._check_name(name)
        self._dir("keys")
        kdir = self._key_dir(name)
        make_dir(kdir, 0o700)
        path = kdir / f"{self._next_version(name)}{KEY_SUFFIX}"
        atomic_write(path, key_pem, 0o600)
        return path

    def commit(self, name: str, cert: x509.Certificate, chain: Sequence[x509.Certificate],
               key_file: Path | None, *, key_origin: str | None = None,
               server_sent: Sequence[x509.Certificate] = ()) -> StoredIdentity:
        """Make ``cert`` (verified by the caller) with ``chain`` and ``key_file`` current.

        A key file from :meth:`stage_key` becomes that version's key; any other key
        file (the current one when ``rotate_key`` is off) is copied into the new
        version. ``None`` means the key is not a file (persistent, ek-derived).
        ``server_sent`` are the certificates the server sent with ``cert``: a
        root among them stays in ``fullchain.pem`` (:func:`full_chain`).
        Writes the version directory, swaps ``current``, clears the journal, then
        prunes versions beyond the retention. The previous version stays usable
        until the swap. ``key_origin`` ("server-generated") is recorded with the
        version for ``tpmid status``.
        """
        self._check_name(name)
        self._dir("certs")
        cdir = self._cert_dir(name)
        make_dir(cdir, 0o755)
        version: str | None = None
        key_data: bytes | None = None
        if key_file is not None:
            key_file = Path(key_file)
            if not key_file.is_file():
                raise StoreError(f"cannot commit {name}: key file {key_file} does not exist")
            kdir = self._key_dir(name)
            staged = key_file.name.removesuffix(KEY_SUFFIX)
            if (key_file.name.endswith(KEY_SUFFIX) and VERSION_RE.fullmatch(staged)
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
                make_dir(self._key_dir(name), 0o700)
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
            write_new(tmp / "cert.pem", cert.public_bytes(Encoding.PEM), 0o644)
            write_new(tmp / "chain.pem", _pem(chain), 0o644)
            write_new(tmp / FULLCHAIN, _pem(full_chain(cert, chain, server_sent)), 0o644)
            if key_file is not None:
                os.symlink(os.path.join("..", "..", "..", "keys", name, f"{version}{KEY_SUFFIX}"),
                           tmp / "key.tss2.pem")
            if key_origin is not None:
                write_new(tmp / KEY_ORIGIN, key_origin.encode("ascii") + b"\n", 0o644)
            os.chmod(tmp, 0o755)
            fsync_dir(tmp)
            mark_step("commit:temp-version", tmp)
            os.rename(tmp, cdir / version)
        except BaseException as e:
            with contextlib.suppress(StoreError):
                remove_tree(tmp)
            if isinstance(e, OSError):
                raise StoreError(f"cannot write {name} version {version}: {e.strerror}") from e
            raise
        fsync_dir(cdir)
        mark_step("commit:version-written", cdir / version)
        self._swap_current(name, version)
        mark_step("commit:current-swapped", cdir / "current")
        self.journal_clear(name)
        mark_step("commit:journal-cleared", self._journal_path(name))
        if self.load_damage(name) is not None:
            state_files.update(self._state_path(name), name, "damage", None)
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
        fsync_dir(cdir)

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
            fsync_dir(cdir)
            remove_tree(gone)
        key = kdir / f"{version}{KEY_SUFFIX}"
        if key.exists() or key.is_symlink():
            remove_tree(key)
            fsync_dir(kdir)

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
            remove_tree(key)
            fsync_dir(key.parent)

    def _check_version(self, name: str, version: str) -> None:
        self._check_name(name)
        if not VERSION_RE.fullmatch(version):
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
        fsync_dir(path.parent)

    # ----------------------------------------------------------------- attestation

    def attestation_path(self, name: str) -> Path:
        """Where the IAK certificate and its chain of IDevID ``name`` are kept (PEM)."""
        self._check_name(name)
        return self.root / "attestation" / f"{name}-iak.pem"

    def save_attestation_certs(self, name: str, certs: Sequence[x509.Certificate]) -> Path:
        """Keep the IAK certificate (first) and its chain for IDevID ``name`` (0644)."""
        path = self.attestation_path(name)
        self._dir("attestation")
        atomic_write(path, b"".join(c.public_bytes(Encoding.PEM) for c in certs), 0o644)
        return path

    def attestation_certs(self, name: str) -> list[x509.Certificate]:
        """The IAK certificate and chain saved for ``name`` (empty when there are none)."""
        path = self.attestation_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from e
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise StoreError(f"{path} does not hold PEM certificates: {e}",
                             hint="provision the device again (tpmid provision) to obtain the "
                             "IAK certificate") from e

    # ----------------------------------------------------------------- state

    def load_state(self, name: str) -> AttemptState:
        """The identity's attempt state (a fresh one if none or unreadable)."""
        self._check_name(name)
        return state_files.load_attempt(self._state_path(name), name)

    def save_state(self, name: str, state: AttemptState) -> None:
        """Persist the attempt state (keeps the last decision)."""
        self._check_name(name)
        self._dir("state")
        state_files.update(self._state_path(name), name, "attempt",
                           state_files.attempt_to_json(state))

    def load_decision(self, name: str) -> Decision | None:
        """The last decision saved for ``tpmid status``, if any."""
        self._check_name(name)
        return state_files.load_decision(self._state_path(name), name)

    def save_decision(self, name: str, decision: Decision) -> None:
        """Persist the last decision (keeps the attempt state)."""
        self._check_name(name)
        self._dir("state")
        state_files.update(self._state_path(name), name, "decision",
                           state_files.decision_to_json(decision))

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
            remove_tree(cdir / "current")
            fsync_dir(cdir)
        for path in (cdir, self._key_dir(name), self._journal_path(name), self._state_path(name)):
            if os.path.lexists(path):
                remove_tree(path)
                fsync_dir(path.parent)
