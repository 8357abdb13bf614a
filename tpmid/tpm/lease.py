"""Hold the TPM only while it works: :class:`TpmLease` and :class:`LeasedKey`.

Without a resource manager (swtpm, ``/dev/tpm0``) tpmid's processes take turns
at the TPM under a host-wide lock, and transient objects occupy one of its few
slots until flushed. An enrollment needs the TPM for the CSR signature and for
the TLS handshake's signature, not while it waits for the server's answer. So
it borrows the TPM through a lease:

* :meth:`TpmLease.tpm` opens it (lock, connection, storage-parent scope) on
  first use and keeps it while the key and CSR work goes on;
* a :class:`LeasedKey` is the TLS client key: the handshake's signature loads
  the key through the lease, signs (one TPM2_Sign), and gives everything back —
  key flushed, parent flushed, connection closed, lock released — before the
  request is sent. The common case costs no extra TPM command: the lease of the
  CSR step is still held when the first handshake signs;
* a later handshake (a resend after 202 on a new TLS connection) opens it again.

:meth:`TpmLease.release` is also called after every TLS handshake (a server
that did not ask for the client certificate) and before the network is used at
all when there is no TPM client key.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tpmid.errors import KeyMismatchError, KeyUnavailableError

if TYPE_CHECKING:
    from tpmid.tpm.connection import TpmConnection, TpmOpener
    from tpmid.tpm.loaded import LoadedKey

log = logging.getLogger(__name__)


class TpmLease:
    """The TPM, opened on demand and given back on :meth:`release` (see the module doc)."""

    def __init__(self, open_tpm: TpmOpener) -> None:
        self._open = open_tpm
        self._stack: ExitStack | None = None
        self._tpm: TpmConnection | None = None
        self._keys: list[LoadedKey] = []
        self.lock = threading.RLock()
        #: Incremented on every release: a key loaded under an older lease is gone.
        self.generation = 0
        #: How often the TPM was opened (the benchmark and the tests read it).
        self.acquisitions = 0

    @property
    def held(self) -> bool:
        return self._tpm is not None

    def tpm(self) -> TpmConnection:
        """The open TPM connection, opening it (and taking the host lock) if needed."""
        with self.lock:
            if self._tpm is None:
                stack = ExitStack()
                try:
                    tpm = stack.enter_context(self._open())
                    stack.enter_context(tpm.storage_parent_scope())
                except BaseException:
                    stack.close()
                    raise
                self._stack, self._tpm = stack, tpm
                self.acquisitions += 1
            return self._tpm

    def keep(self, key: LoadedKey) -> LoadedKey:
        """Flush ``key`` when the lease is released (unless closed before)."""
        with self.lock:
            self._keys.append(key)
            return key

    @contextlib.contextmanager
    def session(self) -> Iterator[TpmConnection]:
        """The TPM for one piece of work, released at the end of the block."""
        with self.lock:
            try:
                yield self.tpm()
            finally:
                self.release()

    def release(self) -> None:
        """Flush what was kept, close the connection and release the host lock; idempotent."""
        with self.lock:
            keys, self._keys = self._keys, []
            stack, self._stack, self._tpm = self._stack, None, None
            if stack is None and not keys:
                return
            self.generation += 1
            try:
                for key in reversed(keys):
                    if not key.closed:
                        key.close()
            finally:
                if stack is not None:
                    stack.close()

    def __enter__(self) -> TpmLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def signing_profile(spki_der: bytes) -> tuple[str, str]:
    """(alg, hash) of an identity key from its public key: TCG H-1/H-2/H-3."""
    key = serialization.load_der_public_key(spki_der)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ecc-p256", "sha256"
        if isinstance(key.curve, ec.SECP384R1):
            return "ecc-p384", "sha384"
    if isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048:
        return "rsa-2048", "sha256"
    raise KeyMismatchError("the certificate's public key is not RSA-2048, ECC P-256 or P-384")


class LeasedKey:
    """A TLS client key that is loaded through a :class:`TpmLease` when a handshake signs.

    ``load(tpm)`` opens the key (an :class:`~tpmid.tpm.identity.IdentityKey`'s
    ``open``); ``public_der`` is the certificate's public key, known without the
    TPM. The loaded key must match it: a key that no longer does (TPM2_Clear
    re-created a different one) raises :class:`~tpmid.errors.KeyUnavailableError`.
    Satisfies :class:`tpmid.tls.keys.TlsSigningKey`; the shim holds :attr:`lock`
    around every signature and calls :meth:`after_handshake`.
    """

    def __init__(self, lease: TpmLease, load: Callable[[TpmConnection], LoadedKey],
                 public_der: bytes, *, description: str, identity: str | None = None) -> None:
        self.lease = lease
        self._load = load
        self._public = public_der
        self.description = description
        self.identity = identity
        self.alg, self.hash_name = signing_profile(public_der)
        self._loaded: LoadedKey | None = None
        self._generation = -1
        self.signatures = 0

    @property
    def lock(self) -> threading.RLock:
        return self.lease.lock

    def public_key_der(self) -> bytes:
        return self._public

    def sign_digest(self, digest: bytes) -> bytes:
        """Load (if the lease lost it), sign, then give the TPM back before the request goes."""
        with self.lease.lock:
            try:
                loaded = self._loaded_key()
                signature = loaded.sign_digest(digest)
                self.signatures += 1
                return signature
            finally:
                self.lease.release()

    def after_handshake(self) -> None:
        """A handshake ended (with or without our signature): nothing is held across the network."""
        self.lease.release()

    def _loaded_key(self) -> LoadedKey:
        if self._loaded is not None and self._generation == self.lease.generation \
                and not self._loaded.closed:
            return self._loaded
        try:
            loaded = self.lease.keep(self._load(self.lease.tpm()))
        except KeyUnavailableError as e:
            e.identity = e.identity or self.identity
            raise
        if loaded.public_key_der() != self._public:
            raise KeyUnavailableError(
                f"{self.description} in the TPM is not the key of its certificate any more "
                "(was the TPM cleared or replaced?)", identity=self.identity,
                hint="tpmid renew (or the daemon) re-creates an IDevID from its template and "
                "enrolls the other identities again through it")
        self._loaded, self._generation = loaded, self.lease.generation
        return loaded
