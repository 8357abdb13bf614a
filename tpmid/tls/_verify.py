"""Which certificate OpenSSL refused, and why: a verify callback that only records.

Python's ``ssl`` reports a failed server-chain verification as a code and a
short text ("invalid CA certificate"), without saying which certificate of the
chain it was. This module installs, through the same OpenSSL binding as the
signing shim (:mod:`tpmid.tls._openssl`), an ``SSL_CTX_set_verify`` callback
that never changes OpenSSL's decision: it returns the ``preverify_ok`` it is
given and remembers, per handshake thread, the first failure — error code,
depth in the chain and the certificate itself — so that the EST client can name
the certificate, the rule and the fix (:mod:`tpmid.est.client`). CPython keeps
a context's verify callback when ``verify_mode`` or ``check_hostname`` change
(``_set_verify_mode`` in ``Modules/_ssl.c``).

Where the binding is not available (another Python, a static OpenSSL), nothing
is installed and errors are reported as before, without the certificate.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from tpmid.errors import TlsShimError
from tpmid.tls import _openssl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyFailure:
    """The first certificate OpenSSL refused in one handshake."""

    code: int  # X509_V_ERR_*
    depth: int  # 0: the server's own certificate
    cert_der: bytes | None


class VerifyRecorder:
    """The callback installed in one ``SSL_CTX`` and what it recorded, per thread."""

    def __init__(self, lib: _openssl.OpenSsl, ctx_ptr: int) -> None:
        self._lib = lib
        self._lock = threading.Lock()
        self._failures: dict[int, VerifyFailure] = {}
        # Kept as an attribute: OpenSSL holds only the C pointer of the thunk.
        self._callback = _openssl.VERIFY_FN(self._on_verify)
        mode = lib.SSL_CTX_get_verify_mode(ctx_ptr)
        lib.SSL_CTX_set_verify(ctx_ptr, mode, self._callback)

    def _on_verify(self, preverify_ok: int, store_ctx: Any) -> int:
        try:
            if not preverify_ok:
                me = threading.get_ident()
                with self._lock:
                    if me not in self._failures:
                        lib = self._lib
                        cert = lib.X509_STORE_CTX_get_current_cert(store_ctx)
                        self._failures[me] = VerifyFailure(
                            code=int(lib.X509_STORE_CTX_get_error(store_ctx)),  # type: ignore[call-overload]
                            depth=int(lib.X509_STORE_CTX_get_error_depth(store_ctx)),  # type: ignore[call-overload]
                            cert_der=lib.cert_der(int(cert)) if cert else None)  # type: ignore[call-overload]
        except Exception:  # never let the recorder change or break a handshake
            log.debug("recording a certificate verification failure failed", exc_info=True)
        return preverify_ok

    def pop(self) -> VerifyFailure | None:
        """The current thread's recorded failure (and forget it)."""
        with self._lock:
            return self._failures.pop(threading.get_ident(), None)

    def clear(self) -> None:
        """Forget the current thread's failure before a new handshake."""
        self.pop()


def install(context: ssl.SSLContext) -> VerifyRecorder | None:
    """Install a :class:`VerifyRecorder` into ``context``; None where that is not possible."""
    try:
        lib = _openssl.load()
        lib.verify_api()
        return VerifyRecorder(lib, lib.ssl_ctx(context))
    except TlsShimError as e:
        log.debug("no certificate verification recorder: %s", e.message)
        return None
