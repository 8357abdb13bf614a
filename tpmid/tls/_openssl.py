"""ctypes bindings to the very libssl/libcrypto that Python's own ``_ssl`` uses.

The TLS shim has to hand a key object to the ``SSL_CTX`` inside an
``ssl.SSLContext``. That only works if the functions we call live in the same
shared objects as the ones ``_ssl`` was linked against: a second OpenSSL in
the process would have its own ``SSL_CTX`` layout, its own method tables and
its own error queues. So the libraries are located from ``/proc/self/maps``
after ``import _ssl`` and opened by that exact path with ``RTLD_NOLOAD`` (which
fails unless the object is already mapped), and the load is refused unless

* exactly one libssl and one libcrypto are mapped (before and after),
* ``OpenSSL_version()`` of that libcrypto equals ``ssl.OPENSSL_VERSION``, and
* every symbol the shim needs is exported.

The ``SSL_CTX *`` of an ``ssl.SSLContext`` is read from CPython's private
``PySSLContext`` struct (``Modules/_ssl.c``: the first field after
``PyObject_HEAD``); :meth:`OpenSsl.ssl_ctx` checks the pointer lies in mapped
writable memory and that OpenSSL reads the same options and verify mode from it
as Python does before anything is written through it.

Every failure raises :class:`~tpmid.errors.TlsShimError` naming what is
unsupported. Nothing here logs key material.
"""

from __future__ import annotations

import _ssl  # noqa: F401  (maps the libssl/libcrypto that Python's ssl uses)
import ctypes
import os
import re
import ssl
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from tpmid.errors import TlsShimError

# ssl.h / evp.h / obj_mac.h constants (OpenSSL 3.0).
SSL_CTRL_CHAIN_CERT = 89
SSL_CTRL_SET_CLIENT_SIGALGS_LIST = 102
EVP_PKEY_RSA = 6
EVP_PKEY_EC = 408
NID_SHA256 = 672
NID_SHA384 = 673
OPENSSL_VERSION = 0

_LIB_RE = re.compile(r"/lib(ssl|crypto)\.so(\.[0-9.]+)?$")

_HINT = (
    "run tpmid with a CPython whose ssl module is dynamically linked against the system "
    "OpenSSL 3 (e.g. Debian's python3 or a pyenv build against libssl-dev), or use a "
    "software key file (key_file=...) instead of a TPM key"
)

# Callback signatures (OpenSSL 3.0 ec.h / rsa.h):
#   int (*sign)(int type, const unsigned char *dgst, int dlen, unsigned char *sig,
#               unsigned int *siglen, const BIGNUM *kinv, const BIGNUM *r, EC_KEY *eckey)
#   int (*rsa_sign)(int type, const unsigned char *m, unsigned int m_length,
#                   unsigned char *sigret, unsigned int *siglen, const RSA *rsa)
EC_SIGN_FN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
)
RSA_SIGN_FN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
)


def read_maps() -> str:
    """The text of ``/proc/self/maps`` (a seam: tests replace it to fake a second libssl)."""
    return Path("/proc/self/maps").read_text()


class Mapping(NamedTuple):
    """One line of ``/proc/self/maps`` (a tuple: a process maps a thousand of them)."""

    start: int
    end: int
    perms: str
    path: str


def parse_maps(text: str) -> list[Mapping]:
    """Parse ``/proc/self/maps`` text into :class:`Mapping` rows."""
    rows = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        try:
            start, end = int(lo, 16), int(hi, 16)
        except ValueError:
            continue
        rows.append(Mapping(start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return rows


def mapped_openssl(maps: list[Mapping]) -> tuple[list[str], list[str]]:
    """Distinct paths of mapped libssl and libcrypto objects, sorted."""
    ssl_paths: set[str] = set()
    crypto_paths: set[str] = set()
    for m in maps:
        match = _LIB_RE.search(m.path)
        if match:
            (ssl_paths if match.group(1) == "ssl" else crypto_paths).add(m.path)
    return sorted(ssl_paths), sorted(crypto_paths)


def _one(kind: str, paths: list[str]) -> str:
    if not paths:
        raise TlsShimError(
            f"Python's ssl module does not use a shared {kind} in this process (statically "
            f"linked OpenSSL?), so the TPM signing shim cannot reach its SSL_CTX",
            hint=_HINT,
        )
    if len(paths) > 1:
        raise TlsShimError(
            f"{len(paths)} different {kind} libraries are mapped in this process "
            f"({', '.join(paths)}); the TPM signing shim cannot tell which one Python's ssl "
            f"module uses",
            hint="find the extension that loads the second OpenSSL and remove it; " + _HINT,
        )
    return paths[0]


class OpenSsl:
    """The functions of the process's libssl/libcrypto the shim uses."""

    def __init__(self, ssl_path: str, crypto_path: str) -> None:
        self.ssl_path = ssl_path
        self.crypto_path = crypto_path
        mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_NOW", 0)
        try:
            self.libssl = ctypes.CDLL(ssl_path, mode=mode)
            self.libcrypto = ctypes.CDLL(crypto_path, mode=mode)
        except OSError as e:
            raise TlsShimError(
                f"cannot bind to the OpenSSL Python's ssl module uses ({ssl_path}, "
                f"{crypto_path}): {e}",
                hint=_HINT,
            ) from e
        self._declare()

    def _fn(
        self, lib: ctypes.CDLL, name: str, restype: object, argtypes: list[object]
    ) -> Callable[..., object]:
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise TlsShimError(
                f"{lib._name} does not export {name}, which the TPM signing shim needs "
                f"(OpenSSL {ssl.OPENSSL_VERSION} built without deprecated APIs?)",
                hint=_HINT,
            ) from e
        fn.restype = restype
        fn.argtypes = argtypes
        return fn

    def _declare(self) -> None:
        c = self.libcrypto
        s = self.libssl
        vp, i, ul = ctypes.c_void_p, ctypes.c_int, ctypes.c_ulong
        f = self._fn
        self.OpenSSL_version = f(c, "OpenSSL_version", ctypes.c_char_p, [i])
        self.OpenSSL_version_num = f(c, "OpenSSL_version_num", ul, [])
        self.ERR_get_error = f(c, "ERR_get_error", ul, [])
        self.ERR_error_string_n = f(c, "ERR_error_string_n", None,
                                    [ul, ctypes.c_char_p, ctypes.c_size_t])
        self.ERR_clear_error = f(c, "ERR_clear_error", None, [])
        self.EC_KEY_OpenSSL = f(c, "EC_KEY_OpenSSL", vp, [])
        self.EC_KEY_METHOD_new = f(c, "EC_KEY_METHOD_new", vp, [vp])
        self.EC_KEY_METHOD_get_sign = f(
            c, "EC_KEY_METHOD_get_sign", None,
            [vp, ctypes.POINTER(vp), ctypes.POINTER(vp), ctypes.POINTER(vp)],
        )
        self.EC_KEY_METHOD_set_sign = f(c, "EC_KEY_METHOD_set_sign", None, [vp, EC_SIGN_FN, vp, vp])
        self.EC_KEY_new_by_curve_name = f(c, "EC_KEY_new_by_curve_name", vp, [i])
        self.EC_KEY_oct2key = f(c, "EC_KEY_oct2key", i, [vp, ctypes.c_char_p, ctypes.c_size_t, vp])
        self.EC_KEY_set_method = f(c, "EC_KEY_set_method", i, [vp, vp])
        self.EC_KEY_free = f(c, "EC_KEY_free", None, [vp])
        self.ECDSA_size = f(c, "ECDSA_size", i, [vp])
        self.RSA_PKCS1_OpenSSL = f(c, "RSA_PKCS1_OpenSSL", vp, [])
        self.RSA_meth_dup = f(c, "RSA_meth_dup", vp, [vp])
        self.RSA_meth_set1_name = f(c, "RSA_meth_set1_name", i, [vp, ctypes.c_char_p])
        self.RSA_meth_set_sign = f(c, "RSA_meth_set_sign", i, [vp, RSA_SIGN_FN])
        self.RSA_new = f(c, "RSA_new", vp, [])
        self.RSA_set0_key = f(c, "RSA_set0_key", i, [vp, vp, vp, vp])
        self.RSA_set_method = f(c, "RSA_set_method", i, [vp, vp])
        self.RSA_size = f(c, "RSA_size", i, [vp])
        self.RSA_free = f(c, "RSA_free", None, [vp])
        self.BN_bin2bn = f(c, "BN_bin2bn", vp, [ctypes.c_char_p, i, vp])
        self.BN_free = f(c, "BN_free", None, [vp])
        self.EVP_PKEY_new = f(c, "EVP_PKEY_new", vp, [])
        self.EVP_PKEY_assign = f(c, "EVP_PKEY_assign", i, [vp, i, vp])
        self.EVP_PKEY_free = f(c, "EVP_PKEY_free", None, [vp])
        self.d2i_X509 = f(c, "d2i_X509", vp, [vp, ctypes.POINTER(vp), ctypes.c_long])
        self.X509_free = f(c, "X509_free", None, [vp])
        self.d2i_AutoPrivateKey = f(c, "d2i_AutoPrivateKey", vp,
                                    [vp, ctypes.POINTER(vp), ctypes.c_long])
        self.SSL_CTX_use_certificate = f(s, "SSL_CTX_use_certificate", i, [vp, vp])
        self.SSL_CTX_use_PrivateKey = f(s, "SSL_CTX_use_PrivateKey", i, [vp, vp])
        self.SSL_CTX_check_private_key = f(s, "SSL_CTX_check_private_key", i, [vp])
        self.SSL_CTX_ctrl = f(s, "SSL_CTX_ctrl", ctypes.c_long, [vp, i, ctypes.c_long, vp])
        self.SSL_CTX_get_options = f(s, "SSL_CTX_get_options", ctypes.c_uint64, [vp])

    # -- process checks --------------------------------------------------------------------

    def check_version(self) -> None:
        """Refuse unless this libcrypto reports the version Python's ssl reports."""
        raw = self.OpenSSL_version(OPENSSL_VERSION)
        version = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        num = self.OpenSSL_version_num()
        if version != ssl.OPENSSL_VERSION or num != ssl.OPENSSL_VERSION_NUMBER:
            raise TlsShimError(
                f"the libcrypto at {self.crypto_path} reports {version!r} (0x{num:x}) but "
                f"Python's ssl module runs {ssl.OPENSSL_VERSION!r} "
                f"(0x{ssl.OPENSSL_VERSION_NUMBER:x}); the TPM signing shim would patch the "
                f"wrong library",
                hint=_HINT,
            )

    def errors(self) -> str:
        """Drain this thread's OpenSSL error queue into one readable string."""
        msgs = []
        for _ in range(32):
            code = self.ERR_get_error()
            if not code:
                break
            buf = ctypes.create_string_buffer(256)
            self.ERR_error_string_n(code, buf, len(buf))
            msgs.append(buf.value.decode(errors="replace"))
        self.ERR_clear_error()
        return "; ".join(msgs) or "no OpenSSL error recorded"

    # -- SSL_CTX access ----------------------------------------------------------------------

    def ssl_ctx(self, context: ssl.SSLContext) -> int:
        """The ``SSL_CTX *`` inside ``context``, verified before use.

        CPython's ``PySSLContext`` starts with ``PyObject_HEAD`` followed by
        ``SSL_CTX *ctx`` (Modules/_ssl.c, unchanged from 3.6 to 3.13); the size
        of ``PyObject_HEAD`` is ``object.__basicsize__`` on every build.
        """
        if sys.implementation.name != "cpython" or not isinstance(context, ssl.SSLContext):
            raise TlsShimError(
                f"the TPM signing shim needs CPython's ssl.SSLContext, not "
                f"{sys.implementation.name} {type(context).__name__}",
                hint=_HINT,
            )
        offset = object.__basicsize__
        if type(context).__basicsize__ < offset + ctypes.sizeof(ctypes.c_void_p):
            raise TlsShimError(
                "ssl.SSLContext has an unexpected memory layout in this Python "
                f"({sys.version.split()[0]})",
                hint=_HINT,
            )
        ptr = ctypes.c_void_p.from_address(id(context) + offset).value
        if not ptr or not any(
            m.start <= ptr < m.end and m.perms.startswith("rw") for m in parse_maps(read_maps())
        ):
            raise TlsShimError(
                f"ssl.SSLContext of Python {sys.version.split()[0]} does not hold an SSL_CTX "
                "pointer where the TPM signing shim expects it",
                hint=_HINT,
            )
        if self.SSL_CTX_get_options(ptr) != int(context.options):
            raise TlsShimError(
                f"the SSL_CTX found in ssl.SSLContext (Python {sys.version.split()[0]}) does not "
                "match what the ssl module reports; the shim will not write through it",
                hint=_HINT,
            )
        return int(ptr)

    # -- building blocks -----------------------------------------------------------------------

    def _d2i(self, fn: Callable[..., object], der: bytes, what: str) -> int:
        buf = ctypes.create_string_buffer(der, len(der))
        p = ctypes.c_void_p(ctypes.addressof(buf))
        obj = fn(None, ctypes.byref(p), len(der))
        if not obj:
            raise TlsShimError(f"OpenSSL could not parse the {what}: {self.errors()}")
        return int(obj)  # type: ignore[call-overload]

    def use_certificate_chain(self, ctx: int, chain_der: list[bytes]) -> None:
        """Install the leaf certificate and its chain (leaf first) into ``ctx``."""
        if not chain_der:
            raise TlsShimError("a client certificate is required to use a TPM key for TLS")
        leaf = self._d2i(self.d2i_X509, chain_der[0], "client certificate")
        try:
            if self.SSL_CTX_use_certificate(ctx, leaf) != 1:
                raise TlsShimError(f"SSL_CTX_use_certificate failed: {self.errors()}")
        finally:
            self.X509_free(leaf)
        for der in chain_der[1:]:
            x = self._d2i(self.d2i_X509, der, "chain certificate")
            try:
                # SSL_CTX_add1_chain_cert (ssl.h macro): takes its own reference.
                if self.SSL_CTX_ctrl(ctx, SSL_CTRL_CHAIN_CERT, 1, x) != 1:
                    raise TlsShimError(f"SSL_CTX_add1_chain_cert failed: {self.errors()}")
            finally:
                self.X509_free(x)

    def use_private_key(self, ctx: int, pkey: int) -> None:
        """``SSL_CTX_use_PrivateKey`` + consistency check; the context takes its own reference."""
        if self.SSL_CTX_use_PrivateKey(ctx, pkey) != 1:
            raise TlsShimError(f"SSL_CTX_use_PrivateKey refused the key: {self.errors()}")
        if self.SSL_CTX_check_private_key(ctx) != 1:
            raise TlsShimError(
                f"the key does not match the client certificate: {self.errors()}"
            )

    def use_private_key_der(self, ctx: int, der: bytes) -> None:
        """Install an ordinary software private key (DER, PKCS#8) held in memory."""
        pkey = self._d2i(self.d2i_AutoPrivateKey, der, "private key")
        try:
            self.use_private_key(ctx, pkey)
        finally:
            self.EVP_PKEY_free(pkey)

    def set_client_sigalgs(self, ctx: int, sigalgs: str) -> None:
        """``SSL_CTX_set1_client_sigalgs_list``: a client's CertificateVerify choices,
        a server's CertificateRequest list (RFC 8446 §4.3.2, RFC 5246 §7.4.4)."""
        arg = ctypes.c_char_p(sigalgs.encode())
        if self.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_CLIENT_SIGALGS_LIST, 0,
                             ctypes.cast(arg, ctypes.c_void_p)) != 1:
            raise TlsShimError(
                f"OpenSSL rejected signature algorithms {sigalgs!r}: {self.errors()}")

    def new_ec_pkey(self, method: int, curve_nid: int, point: bytes) -> tuple[int, int]:
        """An ``EVP_PKEY`` around an ``EC_KEY`` with only the public point and ``method``.

        The method must be set before ``EVP_PKEY_assign``: OpenSSL 3.0 marks a
        legacy key "foreign" at assignment (``detect_foreign_key``), and only a
        foreign key is signed through its ``EC_KEY_METHOD`` instead of being
        exported to the default provider. Returns ``(evp_pkey, ec_key)``.
        """
        eckey = self.EC_KEY_new_by_curve_name(curve_nid)
        if not eckey:
            raise TlsShimError(f"EC_KEY_new_by_curve_name({curve_nid}) failed: {self.errors()}")
        try:
            if self.EC_KEY_oct2key(eckey, point, len(point), None) != 1:
                raise TlsShimError(f"OpenSSL rejected the EC public key: {self.errors()}")
            if self.EC_KEY_set_method(eckey, method) != 1:
                raise TlsShimError(f"EC_KEY_set_method failed: {self.errors()}")
            pkey = self.EVP_PKEY_new()
            if not pkey:
                raise TlsShimError(f"EVP_PKEY_new failed: {self.errors()}")
            if self.EVP_PKEY_assign(pkey, EVP_PKEY_EC, eckey) != 1:
                self.EVP_PKEY_free(pkey)
                raise TlsShimError(f"EVP_PKEY_assign(EC) failed: {self.errors()}")
        except BaseException:
            self.EC_KEY_free(eckey)
            raise
        return int(pkey), int(eckey)  # type: ignore[call-overload]

    def new_rsa_pkey(self, method: int, n: int, e: int) -> tuple[int, int]:
        """An ``EVP_PKEY`` around an ``RSA`` with only (n, e) and ``method``.

        Returns ``(evp_pkey, rsa)``; see :meth:`new_ec_pkey` for the ordering.
        """
        rsa = self.RSA_new()
        if not rsa:
            raise TlsShimError(f"RSA_new failed: {self.errors()}")
        try:
            nb = n.to_bytes((n.bit_length() + 7) // 8, "big")
            eb = e.to_bytes((e.bit_length() + 7) // 8, "big")
            bn_n = self.BN_bin2bn(nb, len(nb), None)
            bn_e = self.BN_bin2bn(eb, len(eb), None)
            if not bn_n or not bn_e or self.RSA_set0_key(rsa, bn_n, bn_e, None) != 1:
                for bn in (bn_n, bn_e):
                    if bn:
                        self.BN_free(bn)
                raise TlsShimError(f"OpenSSL rejected the RSA public key: {self.errors()}")
            if self.RSA_set_method(rsa, method) != 1:
                raise TlsShimError(f"RSA_set_method failed: {self.errors()}")
            pkey = self.EVP_PKEY_new()
            if not pkey:
                raise TlsShimError(f"EVP_PKEY_new failed: {self.errors()}")
            if self.EVP_PKEY_assign(pkey, EVP_PKEY_RSA, rsa) != 1:
                self.EVP_PKEY_free(pkey)
                raise TlsShimError(f"EVP_PKEY_assign(RSA) failed: {self.errors()}")
        except BaseException:
            self.RSA_free(rsa)
            raise
        return int(pkey), int(rsa)  # type: ignore[call-overload]


_lock = threading.Lock()
_instance: OpenSsl | None = None


def load() -> OpenSsl:
    """Bind to the process's OpenSSL once, after proving it is the one ``_ssl`` uses.

    Raises :class:`TlsShimError` (not cached: a test may repair the seam).
    """
    global _instance
    with _lock:
        if _instance is not None:
            return _instance
        if not sys.platform.startswith("linux"):
            raise TlsShimError(
                f"the TPM signing shim supports Linux only (this is {sys.platform})", hint=_HINT
            )
        try:
            maps = parse_maps(read_maps())
        except OSError as e:
            raise TlsShimError(f"cannot read /proc/self/maps: {e}", hint=_HINT) from e
        ssl_paths, crypto_paths = mapped_openssl(maps)
        lib = OpenSsl(_one("libssl", ssl_paths), _one("libcrypto", crypto_paths))
        lib.check_version()
        # RTLD_NOLOAD already refuses to map anything new; re-checking catches a
        # library that a constructor in it pulled in.
        after = mapped_openssl(parse_maps(read_maps()))
        if after != ([lib.ssl_path], [lib.crypto_path]):
            raise TlsShimError(
                f"binding to {lib.ssl_path} mapped another OpenSSL ({after})", hint=_HINT
            )
        _instance = lib
        return lib


def reset_for_tests() -> None:
    """Forget the cached binding so that a test can exercise :func:`load` again."""
    global _instance
    with _lock:
        _instance = None
