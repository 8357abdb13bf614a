"""Client ``ssl.SSLContext`` construction, with the private key in the TPM.

:func:`client_tls` builds the one kind of TLS context tpmid uses towards EST
servers:

* server authentication against explicit trust anchors (RFC 7030 §3.6.1) and/or
  the system store (implicit TA), hostname checked;
* optionally client authentication with either a TPM key (through the signing
  shim: every private-key operation is one TPM2_Sign) or a software key file
  (ordinary ``load_cert_chain``, for bootstrap and benchmarks);
* no key at all for Secret-Value / HTTP Basic labels.

Before the first TPM-key context, :func:`self_test` proves the shim works in
this process with a complete handshake in memory.

When a signing callback fails (TPM gone, lockout, ...) OpenSSL only sees "sign
failed" and Python raises a bare ``ssl.SSLError``. The real error is kept on
the :class:`ClientTls`; call :meth:`ClientTls.raise_pending` (or use
:meth:`ClientTls.translate_errors`) where the handshake surfaces.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import ssl
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tpmid import __version__
from tpmid.errors import ConfigError, StoreError, TlsShimError
from tpmid.store.fsio import atomic_write
from tpmid.tls import _openssl, _shim, deadline
from tpmid.tls.keys import SoftwareSigningKey, TlsSigningKey, profile_for

log = logging.getLogger(__name__)

_DER = serialization.Encoding.DER


class ClientTls:
    """A client ``SSLContext`` plus what keeps its key usable.

    Use it as a context manager or call :meth:`close`; after closing, the
    context can no longer sign (handshakes that need the key fail).
    """

    def __init__(self, ssl_context: ssl.SSLContext, *, key: TlsSigningKey | None = None,
                 binding: _shim.Binding | None = None,
                 pending: _shim.PendingErrors | None = None) -> None:
        """Wrap an already configured context; use :func:`client_tls` to build one."""
        self.ssl_context = ssl_context
        self.key = key
        self._binding = binding
        self._pending = pending or _shim.PendingErrors()
        self._closed = False

    @property
    def uses_tpm_key(self) -> bool:
        """True when client authentication goes through the signing shim."""
        return self._binding is not None

    @property
    def signatures(self) -> int:
        """Signatures the shim made for this context (0 for software keys)."""
        return self._binding.signatures if self._binding is not None else 0

    def close(self) -> None:
        """Release the key; later handshakes that need it fail."""
        if self._binding is not None:
            self._binding.close()
        self.key = None
        self._closed = True

    def raise_pending(self, cause: BaseException | None = None) -> None:
        """Re-raise the error a signing callback captured on this thread, if any.

        Call it when a handshake on this context failed (an ``ssl.SSLError``
        or a library wrapping it). ``cause`` becomes the ``__cause__``. Does
        nothing when no callback failed, so the caller re-raises its own error.
        """
        err = self._pending.pop()
        if err is None:
            return
        if cause is not None:
            raise err from cause
        raise err

    def clear_pending(self) -> None:
        """Forget a captured error on this thread (call before a new handshake)."""
        self._pending.clear()

    @contextlib.contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Run a handshake; if it fails because of the key, raise the key's error instead.

        ``with tls.translate_errors(): sock = tls.ssl_context.wrap_socket(...)``
        """
        self._pending.clear()
        try:
            yield
        except (ssl.SSLError, OSError) as e:
            self.raise_pending(e)
            raise

    def __enter__(self) -> ClientTls:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _rank(v: ssl.TLSVersion) -> int:
    if v == ssl.TLSVersion.MAXIMUM_SUPPORTED:
        return 1 << 16
    if v == ssl.TLSVersion.MINIMUM_SUPPORTED:
        return 0
    return int(v)


def _write_chain(chain: Sequence[x509.Certificate], directory: str) -> str:
    path = os.path.join(directory, "chain.pem")
    with open(path, "wb") as f:
        for c in chain:
            f.write(c.public_bytes(serialization.Encoding.PEM))
    return path


def _load_key_file(ctx: ssl.SSLContext, key_file: Path,
                   chain: Sequence[x509.Certificate]) -> None:
    try:
        if chain:
            # load_cert_chain reads files only; certificates are public, the key
            # stays where the operator put it.
            with tempfile.TemporaryDirectory(prefix="tpmid-tls-") as d:
                ctx.load_cert_chain(certfile=_write_chain(chain, d), keyfile=str(key_file))
        else:
            ctx.load_cert_chain(certfile=str(key_file))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"cannot use key file {key_file} for TLS client auth: {e}",
            hint="the file must hold an unencrypted PEM private key matching the certificate "
                 "(or the certificate and key when no cert_chain is given)",
        ) from e


def _build(*, key: TlsSigningKey | None, key_file: Path | None,
           cert_chain: Sequence[x509.Certificate], trust_anchors: Sequence[x509.Certificate],
           use_system_store: bool, check_hostname: bool, max_version: ssl.TLSVersion | None,
           min_version: ssl.TLSVersion, verify_server: bool) -> ClientTls:
    if key is not None and key_file is not None:
        raise ConfigError("give either a TPM key or a key file for TLS client auth, not both")
    if key is not None and not cert_chain:
        raise ConfigError("a TPM key needs its certificate (cert_chain) for TLS client auth")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if key is not None and profile_for(key).alg.startswith("rsa"):
        # The shim signs RSA only as PKCS#1 v1.5 (see _shim); TLS 1.3 allows RSA
        # client signatures only as RSA-PSS (RFC 8446 §4.2.3, §4.4.3).
        if _rank(min_version) > _rank(ssl.TLSVersion.TLSv1_2):
            raise TlsShimError(
                "an RSA TPM key cannot authenticate over TLS 1.3: TLS 1.3 needs RSA-PSS, "
                "which a TPM identity key (sign-only, no decrypt) cannot produce through "
                "OpenSSL's key method",
                hint="allow TLS 1.2 for this server or use an ECC (H-2/H-3) identity key",
            )
        if max_version is None or _rank(max_version) > _rank(ssl.TLSVersion.TLSv1_2):
            log.info("RSA TPM key: TLS capped at 1.2 with rsa_pkcs1_sha256 "
                     "(TLS 1.3 needs RSA-PSS, see docs/tls-shim.md)")
            max_version = ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    if _rank(ctx.minimum_version) > _rank(ctx.maximum_version):
        raise ConfigError(
            f"TLS minimum version {min_version.name} is above the maximum {max_version}"
        )

    if verify_server:
        if not trust_anchors and not use_system_store:
            raise ConfigError(
                "no trust anchors for the server certificate",
                hint="pass the EST server's CA (explicit TA) or use_system_store=True",
            )
        if trust_anchors:
            ctx.load_verify_locations(cadata=b"".join(c.public_bytes(_DER) for c in trust_anchors))
        if use_system_store:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = check_hostname
    else:
        # RFC 7030 §4.1.1 bootstrap: the caller verifies what it receives out of band.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE

    pending = _shim.PendingErrors()
    # Every step on the wire respects the exchange deadline; a key that borrows the
    # TPM (tpmid.tpm.lease.LeasedKey) gives it back after each handshake.
    deadline.install(ctx, after_handshake=getattr(key, "after_handshake", None))
    if key is not None:
        binding = _shim.install_key(ctx, key, [c.public_bytes(_DER) for c in cert_chain],
                                    pending)
        return ClientTls(ctx, key=key, binding=binding, pending=pending)
    if key_file is not None:
        _load_key_file(ctx, Path(key_file), cert_chain)
    elif cert_chain:
        raise ConfigError("a client certificate was given without its key")
    return ClientTls(ctx, pending=pending)


def client_tls(*, key: TlsSigningKey | None = None, key_file: Path | None = None,
               cert_chain: Sequence[x509.Certificate] = (),
               trust_anchors: Sequence[x509.Certificate] = (), use_system_store: bool = False,
               check_hostname: bool = True, max_version: ssl.TLSVersion | None = None,
               min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
               verify_server: bool = True, selftest_record: Path | None = None) -> ClientTls:
    """Build a client TLS context for talking to an EST server.

    ``key`` is a TPM key (anything satisfying :class:`TlsSigningKey`) and
    ``cert_chain`` its certificate first, then intermediates; ``key_file`` is
    a PEM software key instead. Neither gives a server-auth-only context.
    RSA TPM keys are capped at TLS 1.2 (logged at INFO); ``min_version``
    TLS 1.3 with an RSA key raises :class:`TlsShimError`.
    ``verify_server=False`` is for RFC 7030 §4.1.1 bootstrap only.
    ``selftest_record`` is where a passed shim self-test is remembered (:func:`self_test`).

    Raises :class:`TlsShimError` when the shim cannot work in this process,
    :class:`~tpmid.errors.KeyMismatchError` when the certificate is not the
    key's, :class:`ConfigError` for inconsistent arguments or unusable files.
    """
    if key is not None:
        self_test(str(getattr(key, "alg", "ecc-p256")), record=selftest_record)
    return _build(key=key, key_file=key_file, cert_chain=cert_chain,
                  trust_anchors=trust_anchors, use_system_store=use_system_store,
                  check_hostname=check_hostname, max_version=max_version,
                  min_version=min_version, verify_server=verify_server)


# -- self-test ---------------------------------------------------------------------------------

_SELFTEST_HOST = "tpmid-selftest.invalid"


def _self_signed(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str,
                 san: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(hours=1)))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return b.sign(key, hashes.SHA256())


def memory_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext,
                     server_hostname: str) -> bytes | None:
    """Run one complete TLS handshake between two contexts in memory.

    Returns the client certificate the server received (DER) or ``None``.
    Raises ``ssl.SSLError`` from whichever side failed first.
    """
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(16):
        if not c_done:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                server.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if c_done and s_done:
            break
    if not (c_done and s_done):
        raise ssl.SSLError("in-memory handshake did not complete")
    return server.getpeercert(binary_form=True)


def _selftest_one(lib: _openssl.OpenSsl, alg: str, version: ssl.TLSVersion) -> None:
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _self_signed(server_key, "tpmid self-test server", _SELFTEST_HOST)
    client_key = SoftwareSigningKey.generate(alg)
    client_cert = _self_signed(client_key.private_key, "tpmid self-test client")

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = server_ctx.maximum_version = version
    sptr = lib.ssl_ctx(server_ctx)
    lib.use_certificate_chain(sptr, [server_cert.public_bytes(_DER)])
    lib.use_private_key_der(sptr, server_key.private_bytes(
        _DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=client_cert.public_bytes(_DER))

    with _build(key=client_key, key_file=None, cert_chain=[client_cert],
                trust_anchors=[server_cert], use_system_store=False, check_hostname=True,
                max_version=version, min_version=version, verify_server=True) as tls:
        try:
            peer = memory_handshake(tls.ssl_context, server_ctx, _SELFTEST_HOST)
        except ssl.SSLError as e:
            tls.raise_pending(e)
            raise
    if client_key.calls != 1:
        raise TlsShimError(
            f"{alg} over {version.name}: OpenSSL signed without the shim's callback "
            f"({client_key.calls} callback calls)"
        )
    if peer != client_cert.public_bytes(_DER):
        raise TlsShimError(f"{alg} over {version.name}: the server did not get the client cert")


_selftest_lock = threading.Lock()
_selftest_results: dict[str, TlsShimError | bool] = {}
# One handshake per key family: the EC and RSA key methods are separate code paths.
_SELFTEST_CASES = {"ecc": ("ecc-p256", ssl.TLSVersion.TLSv1_3),
                   "rsa": ("rsa-2048", ssl.TLSVersion.TLSv1_2)}


SELFTEST_RECORD = "tls-selftest.json"  # in the store directory (wiring passes the path)


def _runtime_id(lib: _openssl.OpenSsl, family: str) -> str:
    """What the self-test's verdict depends on: this Python, this OpenSSL (by file), tpmid."""
    files = []
    for path in (lib.ssl_path, lib.crypto_path):
        st = os.stat(path)
        files.append([path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns])
    facts = [family, __version__, sys.version, sys.executable, ssl.OPENSSL_VERSION, files]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()


def _passed(record: Path) -> list[str]:
    """The runtimes a record says passed; nothing for a missing or damaged record."""
    try:
        data = json.loads(record.read_bytes())
    except (OSError, ValueError):
        return []
    passed = data.get("passed") if isinstance(data, dict) else None
    return [p for p in passed if isinstance(p, str)] if isinstance(passed, list) else []


def _recorded(record: Path, runtime: str) -> bool:
    return runtime in _passed(record)


def _remember(record: Path, runtime: str) -> None:
    """Record a passed self-test; a record that cannot be written only costs the next run time."""
    body = json.dumps({"passed": [*_passed(record)[-7:], runtime]}).encode()
    try:
        atomic_write(record, body, 0o600, durable=False)
    except (OSError, StoreError) as e:
        log.debug("TLS self-test result not recorded in %s: %s", record, e)


def self_test(alg: str = "ecc-p256", *, record: Path | None = None) -> None:
    """Prove that the signing shim works here; raise :class:`TlsShimError` if not.

    Binds to the OpenSSL of Python's ``_ssl`` (see :mod:`tpmid.tls._openssl`)
    and runs an in-memory mTLS handshake against a throwaway server with a
    software signer behind the very same callbacks as the key ``alg`` will use:
    ECC over TLS 1.3 for ``ecc-*`` keys, RSA-2048 over TLS 1.2 for ``rsa-*``
    keys. The result, success or failure, is cached per key family for the
    process; a success is also kept in ``record`` (a file in the store), keyed by
    everything the verdict depends on (Python build, the libssl and libcrypto
    files by inode, size and mtime, tpmid's version), so that later commands on
    the same system skip the handshake. Binding to OpenSSL and the checks made
    on every SSL_CTX before the shim writes through it run every time.
    """
    family = "rsa" if alg.startswith("rsa") else "ecc"
    with _selftest_lock:
        cached = _selftest_results.get(family)
        if cached is True:
            return
        if isinstance(cached, TlsShimError):
            raise cached
        runtime = ""
        try:
            lib = _openssl.load()
            runtime = _runtime_id(lib, family)
            if record is not None and _recorded(record, runtime):
                _selftest_results[family] = True
                return
            _selftest_one(lib, *_SELFTEST_CASES[family])
        except TlsShimError as e:
            cached = TlsShimError(
                f"the TPM signing shim failed its self-test: {e}",
                hint=e.hint or "use a software key file (key_file=...) or report this "
                               "Python/OpenSSL combination",
            )
        except (ssl.SSLError, OSError, ValueError) as e:
            cached = TlsShimError(
                f"the TPM signing shim failed its self-test handshake: {e}",
                hint="this Python/OpenSSL combination is not supported by the shim; use a "
                     "software key file (key_file=...) and report the versions",
            )
        else:
            _selftest_results[family] = True
            log.debug("TLS signing shim self-test passed for %s keys (%s)", family,
                      ssl.OPENSSL_VERSION)
            if record is not None:
                _remember(record, runtime)
            return
        _selftest_results[family] = cached
        raise cached


def _reset_self_test_for_tests() -> None:
    with _selftest_lock:
        _selftest_results.clear()
