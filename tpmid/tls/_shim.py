"""The signing callbacks that route OpenSSL's CertificateVerify signature to a TPM key.

Route (OpenSSL 3.0, legacy key methods, see docs/tls-shim.md):

* ECC: an ``EC_KEY_METHOD`` copied from ``EC_KEY_OpenSSL()`` whose ``sign``
  is :func:`_ec_sign`. libssl signs with ``EVP_DigestSign``; for a *foreign*
  legacy key that ends in ``pkey_ec_sign`` → ``ECDSA_sign`` → ``meth->sign``
  with the finished digest. The TPM returns (r, s); the key gives us DER.
* RSA: an ``RSA_METHOD`` copied from ``RSA_PKCS1_OpenSSL()`` whose
  ``rsa_sign`` is :func:`_rsa_sign`. ``pkey_rsa_sign`` calls ``RSA_sign`` (and
  so ``rsa_sign``) only for PKCS#1 v1.5 padding; PSS is padded in software and
  sent to ``rsa_priv_enc`` as a raw block, which a TPM signs only with
  TPM2_RSA_Decrypt (needs the ``decrypt`` attribute identity keys lack). Hence
  RSA contexts are pinned to rsa_pkcs1_sha256 and TLS 1.2.

Both methods and both callbacks are created once per process and never freed:
an ``SSL_CTX`` (and with it our key) can outlive any Python object we own.
A callback finds its Python key through a registry keyed by the ``EC_KEY`` /
``RSA`` pointer; the entry goes away when the ``ssl.SSLContext`` is collected
(the only owner of that ``SSL_CTX``), and :meth:`Binding.close` drops the key
earlier so a closed context can no longer sign.

A callback runs on the thread that drives the handshake, with the GIL (ctypes
takes it). It never lets an exception escape into OpenSSL: it records it in the
context's :class:`PendingErrors` for that thread and returns 0, which fails
the handshake; the caller then re-raises the recorded error.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tpmid.errors import KeyMismatchError, TlsShimError, TpmidError
from tpmid.tls import _openssl
from tpmid.tls.keys import KeyProfile, TlsSigningKey, profile_for

log = logging.getLogger(__name__)


class PendingErrors:
    """Errors raised inside signing callbacks, kept per handshake thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: dict[int, BaseException] = {}

    def record(self, exc: BaseException) -> None:
        """Remember ``exc`` for the current thread (the one running the handshake)."""
        with self._lock:
            self._errors[threading.get_ident()] = exc

    def pop(self) -> BaseException | None:
        """Take the current thread's pending error, if any."""
        with self._lock:
            return self._errors.pop(threading.get_ident(), None)

    def clear(self) -> None:
        """Forget the current thread's pending error."""
        self.pop()


@dataclass(eq=False)
class Binding:
    """One TPM key installed into one ``SSL_CTX``."""

    key: TlsSigningKey | None
    profile: KeyProfile
    lock: contextlib.AbstractContextManager[Any]
    pending: PendingErrors
    max_sig: int
    signatures: int = 0
    _finalizer: weakref.finalize | None = field(default=None, repr=False)
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def close(self) -> None:
        """Drop the key: later handshakes on this context fail instead of signing."""
        self.key = None

    def sign(self, digest: bytes) -> bytes:
        """Sign one handshake digest with the key, under its connection lock."""
        key = self.key
        if key is None:
            raise TlsShimError(
                "this TLS context was closed; build a new one with tpmid.tls.client_tls()"
            )
        if len(digest) != self.profile.digest_size:
            # The sigalgs pin makes this unreachable; if OpenSSL ever asks anyway,
            # refuse rather than let the TPM truncate a longer digest (FIPS 186-4 §6.4).
            raise TlsShimError(
                f"OpenSSL asked the {self.profile.alg} key to sign a {len(digest) * 8}-bit "
                f"digest; it only signs {self.profile.hash_name}"
            )
        with self.lock:
            sig = key.sign_digest(digest)
        if len(sig) > self.max_sig:
            raise TlsShimError(
                f"the {self.profile.alg} key returned a {len(sig)}-byte signature; "
                f"OpenSSL expects at most {self.max_sig}"
            )
        with self._count_lock:
            self.signatures += 1
        return sig


_registry_lock = threading.Lock()
_registry: dict[int, Binding] = {}


def _wrap(exc: BaseException, alg: str) -> BaseException:
    if isinstance(exc, TpmidError):
        return exc
    wrapped = TlsShimError(
        f"signing the TLS handshake with the {alg} key failed: {type(exc).__name__}: {exc}"
    )
    wrapped.__cause__ = exc
    return wrapped


def _callback(native_key: int | None, digest_ptr: int | None, digest_len: int,
              out: int | None, out_len: Any, nid: int | None) -> int:
    with _registry_lock:
        binding = _registry.get(native_key or 0)
    if binding is None:
        # The context was collected or never registered; nothing to report to.
        return 0
    try:
        if nid is not None and nid != _openssl.NID_SHA256:
            raise TlsShimError(
                f"OpenSSL asked for an RSA signature with digest NID {nid}; "
                "the RSA key signs SHA-256 (rsa_pkcs1_sha256) only"
            )
        digest = ctypes.string_at(digest_ptr or 0, digest_len) if digest_len > 0 else b""
        sig = binding.sign(digest)
        ctypes.memmove(out or 0, sig, len(sig))
        out_len[0] = len(sig)
        return 1
    except BaseException as e:  # noqa: BLE001  (nothing may unwind into OpenSSL)
        log.debug("TLS signing callback failed: %s", e)
        binding.pending.record(_wrap(e, binding.profile.alg))
        return 0


def _ec_sign(_type: int, dgst: int | None, dlen: int, sig: int | None, siglen: Any,
             _kinv: int | None, _r: int | None, eckey: int | None) -> int:
    return _callback(eckey, dgst, dlen, sig, siglen, None)


def _rsa_sign(nid: int, m: int | None, m_len: int, sigret: int | None, siglen: Any,
              rsa_key: int | None) -> int:
    return _callback(rsa_key, m, m_len, sigret, siglen, nid)


# Module-level on purpose: ctypes frees the C thunk when the Python object dies.
_EC_SIGN_CB = _openssl.EC_SIGN_FN(_ec_sign)
_RSA_SIGN_CB = _openssl.RSA_SIGN_FN(_rsa_sign)

_methods_lock = threading.Lock()
_methods: tuple[int, int] | None = None


def _key_methods(lib: _openssl.OpenSsl) -> tuple[int, int]:
    """The process-wide (EC_KEY_METHOD*, RSA_METHOD*) pair, created on first use."""
    global _methods
    with _methods_lock:
        if _methods is None:
            ec_meth = lib.EC_KEY_METHOD_new(lib.EC_KEY_OpenSSL())
            if not ec_meth:
                raise TlsShimError(f"EC_KEY_METHOD_new failed: {lib.errors()}")
            sign, setup, sign_sig = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
            lib.EC_KEY_METHOD_get_sign(ec_meth, ctypes.byref(sign), ctypes.byref(setup),
                                       ctypes.byref(sign_sig))
            # Keep the default sign_setup/sign_sig: libssl only uses ->sign.
            lib.EC_KEY_METHOD_set_sign(ec_meth, _EC_SIGN_CB, setup, sign_sig)
            rsa_meth = lib.RSA_meth_dup(lib.RSA_PKCS1_OpenSSL())
            if not rsa_meth:
                raise TlsShimError(f"RSA_meth_dup failed: {lib.errors()}")
            lib.RSA_meth_set1_name(rsa_meth, b"tpmid TPM-backed RSA")
            if lib.RSA_meth_set_sign(rsa_meth, _RSA_SIGN_CB) != 1:
                raise TlsShimError(f"RSA_meth_set_sign failed: {lib.errors()}")
            _methods = (int(ec_meth), int(rsa_meth))  # type: ignore[call-overload]
        return _methods


def connection_lock(key: TlsSigningKey) -> contextlib.AbstractContextManager[Any]:
    """The lock of the key's TPM connection, or a no-op when the key has none.

    ``LoadedKey`` keeps its ``TpmConnection`` as ``key.tpm``; other keys may
    expose ``key.connection`` or a ``key.lock`` of their own.
    """
    for holder in (getattr(key, "tpm", None), getattr(key, "connection", None), key):
        lock = getattr(holder, "lock", None)
        if lock is not None and hasattr(lock, "__enter__") and hasattr(lock, "__exit__"):
            return lock
    return contextlib.nullcontext()


def _unregister(native_key: int, binding: Binding) -> None:
    with _registry_lock:
        if _registry.get(native_key) is binding:
            del _registry[native_key]


def registered() -> int:
    """How many keys are installed in live contexts (for leak tests)."""
    with _registry_lock:
        return len(_registry)


def install_key(context: Any, key: TlsSigningKey, chain_der: Sequence[bytes],
                pending: PendingErrors) -> Binding:
    """Install ``key`` and its certificate chain into ``context`` (an ``ssl.SSLContext``).

    Pins the client signature algorithms to what the key can sign and returns
    the :class:`Binding` that the signing callback uses.
    """
    prof = profile_for(key)
    lib = _openssl.load()
    ec_meth, rsa_meth = _key_methods(lib)
    if not chain_der:
        raise TlsShimError("a TPM key needs its certificate (cert_chain) for TLS client auth")

    try:
        pub = serialization.load_der_public_key(key.public_key_der())
    except ValueError as e:
        raise TlsShimError(f"the {prof.alg} key's public key is not valid DER: {e}") from e
    leaf_pub = x509.load_der_x509_certificate(chain_der[0]).public_key()
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf_pub.public_bytes(*spki) != pub.public_bytes(*spki):
        raise KeyMismatchError(
            f"the client certificate does not belong to the {prof.alg} TPM key",
            hint="renew or re-enroll so that the certificate matches the key in the TPM",
        )

    ptr = lib.ssl_ctx(context)
    lib.use_certificate_chain(ptr, list(chain_der))
    if isinstance(pub, ec.EllipticCurvePublicKey):
        point = pub.public_bytes(serialization.Encoding.X962,
                                 serialization.PublicFormat.UncompressedPoint)
        pkey, native = lib.new_ec_pkey(ec_meth, prof.curve_nid, point)
        max_sig = lib.ECDSA_size(native)
    elif isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        pkey, native = lib.new_rsa_pkey(rsa_meth, nums.n, nums.e)
        max_sig = lib.RSA_size(native)
    else:
        raise TlsShimError(f"unsupported public key type {type(pub).__name__}")

    binding = Binding(key=key, profile=prof, lock=connection_lock(key), pending=pending,
                      max_sig=int(max_sig))  # type: ignore[call-overload]
    with _registry_lock:
        _registry[native] = binding
    try:
        lib.use_private_key(ptr, pkey)
        lib.set_client_sigalgs(ptr, prof.sigalgs)
    except BaseException:
        _unregister(native, binding)
        raise
    finally:
        lib.EVP_PKEY_free(pkey)
    # The SSL_CTX (and the EC_KEY/RSA in it) dies with the Python context object.
    binding._finalizer = weakref.finalize(context, _unregister, native, binding)
    return binding
