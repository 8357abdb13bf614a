"""One-shot enrollment of one identity: ``tpmid enroll NAME``.

:func:`enroll_identity` is the orchestration the CLI calls (and the renewal
engine can reuse with ``reenroll=True``). For identity ``NAME`` of the config it

1. takes the identity's store lock;
2. opens or creates the key (``identities.NAME.key``): a persistent or
   ek-derived key stays where it is; for ``kind: file`` a new TSS2 key file is
   created in the TPM and staged in the store (0600, ``keys/NAME/``), with a
   journal entry so that an interrupted run is rolled back or resumed;
3. builds the CSR with the TPM as signer (one TPM2_Sign) and closes the key
   again, unless proof-of-possession linking needs it during the request;
4. authenticates to the EST server as ``est.auth`` says: ``client: OTHER`` is
   mutual TLS with OTHER's TPM key and stored certificate, ``client: {cert,
   key}`` a software key file, ``headers``/``basic`` secrets resolved by the
   caller's resolver; the server is authenticated against ``est.trust_anchors``
   (or ``trust.est_anchors``), the system store only if ``trust.use_system_store``,
   or, with ``est.pin`` and no anchor, a pinned ``/cacerts`` bootstrap;
5. fetches ``/cacerts`` over that authenticated channel (unless
   ``est.issuer_anchors`` are configured), enrolls (``simpleenroll``, or
   ``simplereenroll`` authenticated with the identity's current certificate),
   verifies the result (:mod:`tpmid.est.verify`) and commits certificate,
   chain and key file to the store.

Every TPM transient object is flushed before it returns, on success and on
error. An EST ``202 Accepted`` that outlasts ``est.max_wait`` leaves the journal
in phase ``pending`` with the CSR, and the next run resends the same CSR
(RFC 7030 §4.2.3); any other failure rolls the staged key back.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tpmid.config import Config, EstConfig, IdentityConfig, SecretRef
from tpmid.errors import ConfigError, EstRetryLater, StoreError
from tpmid.est.verify import fingerprint_sha256, normalize_pin, verify_enrollment

if TYPE_CHECKING:
    import requests

    from tpmid.est.client import CsrFactory, EstClient, ServerCheck, TlsHandle
    from tpmid.store import JournalEntry, Store
    from tpmid.tls.context import ClientTls
    from tpmid.tpm.connection import TpmConnection
    from tpmid.tpm.keys import LoadedKey

log = logging.getLogger(__name__)

SecretResolver = Callable[[SecretRef], str]
Operation = Literal["simpleenroll", "simplereenroll"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class EnrollResult:
    """What one enrollment produced and where it is stored."""

    name: str
    operation: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    version: str
    cert_path: Path
    chain_path: Path
    key_path: Path | None
    requested_subject: str
    subject_rewritten: bool = False
    resumed: bool = field(default=False)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (what ``tpmid enroll`` prints)."""
        c = self.certificate
        return {
            "identity": self.name,
            "operation": self.operation,
            "version": self.version,
            "subject": c.subject.rfc4514_string(),
            "requested_subject": self.requested_subject,
            "subject_rewritten": self.subject_rewritten,
            "issuer": c.issuer.rfc4514_string(),
            "serial": f"{c.serial_number:x}",
            "not_before": c.not_valid_before_utc.isoformat(),
            "not_after": c.not_valid_after_utc.isoformat(),
            "sha256_fingerprint": fingerprint_sha256(c),
            "chain": [x.subject.rfc4514_string() for x in self.chain],
            "cert_path": str(self.cert_path),
            "chain_path": str(self.chain_path),
            "key_path": str(self.key_path) if self.key_path else None,
            "resumed": self.resumed,
        }


# --------------------------------------------------------------------------- helpers


def _resolver(secrets: SecretResolver | Mapping[str, str]) -> SecretResolver:
    if callable(secrets):
        return secrets
    from tpmid.secrets import resolve_secret

    env = secrets
    return lambda ref: resolve_secret(ref, env, None)


def load_pem_certificates(paths: Sequence[Path], what: str) -> list[x509.Certificate]:
    """Read every certificate from the PEM (or DER) files ``paths``; ConfigError if unusable."""
    out: list[x509.Certificate] = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {what} {p}: {e.strerror}") from e
        try:
            if b"-----BEGIN" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
        except ValueError as e:
            raise ConfigError(f"{what} {p} holds no readable certificate ({e})") from e
        out.extend(certs)
    return out


def _tls_chain(cert: x509.Certificate, chain: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    # RFC 8446 §4.4.2: the root may be omitted; the server has it as its anchor.
    return [cert, *(c for c in chain if c.issuer != c.subject)]


def _pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


@dataclass
class _Trust:
    anchors: list[x509.Certificate]
    use_system_store: bool
    pin: str | None
    cmc_ra: bool = False  # est.accept_cmc_ra: the client checks name-or-cmcRA itself


def _server_trust(config: Config, est: EstConfig) -> _Trust:
    paths = est.trust_anchors or config.trust.est_anchors
    anchors = load_pem_certificates(paths, "EST trust anchor file")
    return _Trust(anchors, config.trust.use_system_store, est.pin, est.accept_cmc_ra)


def _client_tls(
    trust: _Trust,
    *,
    key: LoadedKey | None = None,
    cert_chain: Sequence[x509.Certificate] = (),
    key_file: Path | None = None,
    verify_server: bool = True,
    max_version: ssl.TLSVersion | None = None,
) -> ClientTls:
    from tpmid.tls import client_tls

    # With accept_cmc_ra the chain is still verified here; the host name *or* the
    # id-kp-cmcRA EKU is then checked by EstClient before anything is sent.
    return client_tls(key=key, key_file=key_file, cert_chain=cert_chain,
                      trust_anchors=trust.anchors, use_system_store=trust.use_system_store,
                      verify_server=verify_server, max_version=max_version,
                      check_hostname=not trust.cmc_ra)


def _make_client(url: str, est: EstConfig | None, tls: TlsHandle | None,
                 session: requests.Session, *, headers: Mapping[str, str] | None = None,
                 basic: tuple[str, str] | None = None, pin: str | None = None,
                 allow_http: bool = False, sleep: Callable[[float], None] = time.sleep,
                 now: Callable[[], datetime] = _utcnow) -> EstClient:
    from tpmid.est.client import DEFAULT_TIMEOUT, EstClient

    timeout = (est.connect_timeout, est.read_timeout) if est else DEFAULT_TIMEOUT
    check: ServerCheck = (
        "pin" if pin else
        "hostname-or-cmc-ra" if est is not None and est.accept_cmc_ra else "hostname")
    return EstClient(
        url, session, tls=tls, server_check=check, pin=pin,
        basic=basic, headers=headers, allow_http=(est.allow_http if est else allow_http),
        timeout=timeout, max_wait=est.max_wait if est else 0.0, sleep=sleep, now=now,
    )


def bootstrap_root(url: str, pin: str, *, timeout: tuple[float, float] | None = None,
                   allow_http: bool = False,
                   now: Callable[[], datetime] = _utcnow) -> list[x509.Certificate]:
    """Pinned ``/cacerts`` bootstrap (RFC 7030 §4.1.1); return the CA certificates.

    The connection is made without verification; the answer is accepted only if
    one certificate is a root whose SHA-256 fingerprint is ``pin`` and the
    server's TLS certificate chains to that root for this host (see
    :class:`tpmid.est.client.EstClient`). The pinned root is first in the list.
    """
    from tpmid.est.client import DEFAULT_TIMEOUT, EstClient, make_session
    from tpmid.tls import client_tls

    with contextlib.ExitStack() as stack:
        tls = stack.enter_context(client_tls(verify_server=False))
        session = make_session(tls)
        stack.callback(session.close)
        client = EstClient(url, session, tls=tls, server_check="pin", pin=pin,
                           allow_http=allow_http, timeout=timeout or DEFAULT_TIMEOUT, now=now)
        certs = client.cacerts()
    want = normalize_pin(pin)
    from cryptography.hazmat.primitives import hashes

    root = [c for c in certs if c.fingerprint(hashes.SHA256()).hex() == want]
    return root + [c for c in certs if c not in root]


@dataclass(frozen=True)
class FetchResult:
    """Certificates or attributes fetched by ``tpmid est cacerts/csrattrs``."""

    url: str
    certificates: tuple[x509.Certificate, ...] = ()
    attributes: tuple[Any, ...] = ()
    server_auth: str = ""


def _fetch(op: Literal["cacerts", "csrattrs"], url: str, *,
           trusted_certs: Sequence[Path], pin: str | None, use_system_store: bool,
           allow_http: bool, timeout: tuple[float, float] | None) -> FetchResult:
    from tpmid.est.client import DEFAULT_TIMEOUT, EstClient, est_base_url, make_session
    from tpmid.tls import client_tls

    base = est_base_url(url)
    anchors = load_pem_certificates(trusted_certs, "trusted certificate file")
    how = "explicit trust anchors" if anchors else "system trust store"
    if not anchors and not use_system_store:
        if pin is None:
            raise ConfigError(
                f"no way to authenticate {base}: give --trusted-certs FILE (the CA of the "
                "server's TLS certificate) or --pin SHA256 (fingerprint of the EST root)",
                hint="RFC 7030 §3.6: tpmid never trusts an EST server it cannot authenticate",
            )
        roots = bootstrap_root(base, pin, timeout=timeout, allow_http=allow_http)
        if op == "cacerts":
            return FetchResult(base, tuple(roots), server_auth=f"pinned root {normalize_pin(pin)}")
        anchors, how = roots[:1], "pinned root"
    plain = base.startswith("http://")
    with contextlib.ExitStack() as stack:
        tls = None if plain else stack.enter_context(
            client_tls(trust_anchors=anchors, use_system_store=use_system_store))
        session = make_session(tls)
        stack.callback(session.close)
        client = EstClient(base, session, tls=tls, allow_http=allow_http,
                           timeout=timeout or DEFAULT_TIMEOUT, max_wait=0.0)
        if op == "cacerts":
            return FetchResult(base, tuple(client.cacerts()), server_auth=how)
        return FetchResult(base, attributes=tuple(client.csrattrs()), server_auth=how)


def fetch_cacerts(url: str, *, trusted_certs: Sequence[Path] = (), pin: str | None = None,
                  use_system_store: bool = False, allow_http: bool = False,
                  timeout: tuple[float, float] | None = None) -> FetchResult:
    """``tpmid est cacerts URL``: the label's CA certificates, server authenticated.

    With ``trusted_certs`` the server's TLS certificate must chain to them (and
    name the host); with only ``pin``, the pinned bootstrap of
    :func:`bootstrap_root` applies.
    """
    return _fetch("cacerts", url, trusted_certs=trusted_certs, pin=pin,
                  use_system_store=use_system_store, allow_http=allow_http, timeout=timeout)


def fetch_csrattrs(url: str, *, trusted_certs: Sequence[Path] = (), pin: str | None = None,
                   use_system_store: bool = False, allow_http: bool = False,
                   timeout: tuple[float, float] | None = None) -> FetchResult:
    """``tpmid est csrattrs URL``: the CSR attributes the label asks for (RFC 7030 §4.5)."""
    return _fetch("csrattrs", url, trusted_certs=trusted_certs, pin=pin,
                  use_system_store=use_system_store, allow_http=allow_http, timeout=timeout)


# --------------------------------------------------------------------------- enrollment


@dataclass
class _Key:
    """The identity key for this run and where its file lives."""

    loaded: LoadedKey | None
    spki: bytes
    key_path: Path | None  # the file committed with the certificate (None: not a file key)
    staged_version: str | None  # a key file this run staged (rolled back on failure)


def _hw_module(tpm: TpmConnection) -> tuple[str, bytes]:
    """The RFC 4108 hardwareModuleName of this TPM (same inputs as ``tpmid csr``)."""
    from tpmid.csr import hardware_module_name
    from tpmid.tpm.connection import PT_MANUFACTURER
    from tpmid.tpm.ek import primary_ek, read_eks

    ek = primary_ek(read_eks(tpm))
    return hardware_module_name(
        ek.cert_der, ek.public_key_der,
        tpm_manufacturer=tpm.fixed_property(PT_MANUFACTURER))


def _open_existing_key(tpm: TpmConnection, ident: IdentityConfig,
                       key_file: Path | None) -> LoadedKey:
    from tpmid.tpm.keys import load_identity_key

    pem = None
    if ident.key.kind == "file":
        if key_file is None:
            raise StoreError(f"{ident.name} has no key file in the store",
                             hint=f"enroll it first: tpmid enroll {ident.name}")
        try:
            pem = key_file.read_bytes()
        except OSError as e:
            raise StoreError(f"cannot read the key file of {ident.name} ({key_file}): "
                             f"{e.strerror}") from e
    return load_identity_key(tpm, ident.key, pem)


class _Enrollment:
    """The state of one :func:`enroll_identity` run (kept small and explicit)."""

    def __init__(self, config: Config, ident: IdentityConfig, est: EstConfig, *,
                 tpm: TpmConnection, store: Store, resolve: SecretResolver,
                 now: Callable[[], datetime], sleep: Callable[[float], None],
                 operation: Operation, stack: contextlib.ExitStack) -> None:
        self.config = config
        self.ident = ident
        self.name = ident.name
        self.est = est
        self.tpm = tpm
        self.store = store
        self.resolve = resolve
        self.now = now
        self.sleep = sleep
        self.operation: Operation = operation
        self.stack = stack
        self.entry: JournalEntry | None = None
        self.auth_with_current = operation == "simplereenroll"
        self.hw_module: tuple[str, bytes] | None = None

    # -- journal ---------------------------------------------------------------------

    def journal(self, **changes: Any) -> None:
        from tpmid.store import JournalEntry

        if self.entry is None:
            fields: dict[str, Any] = {
                "operation": "renew" if self.operation == "simplereenroll" else "enroll",
                "phase": "staged", "method": self.operation, "started": self.now(),
                "updated": self.now(),
            }
            fields.update(changes)
            self.entry = JournalEntry(**fields)
            self.store.journal_begin(self.name, self.entry)
        else:
            self.entry = replace(self.entry, updated=self.now(), **changes)
            self.store.journal_update(self.name, self.entry)

    def rollback(self) -> None:
        entry, self.entry = self.entry, None
        if entry is None:
            return
        with contextlib.suppress(StoreError):
            self.store.journal_clear(self.name)
            if entry.version is not None:
                self.store.discard_key(self.name, entry.version)
                log.info("%s: rolled back staged key version %s", self.name, entry.version)

    # -- key and CSR -----------------------------------------------------------------

    def resumable(self) -> JournalEntry | None:
        entry = self.store.journal_get(self.name)
        if entry is None:
            return None
        if (entry.method == self.operation and entry.phase in ("submitted", "pending", "issued")
                and entry.csr_pem and not self.est.pop):
            return entry
        raise StoreError(
            f"{self.name} has unfinished work in the store ({entry.operation}, phase "
            f"{entry.phase}) that this enrollment cannot resume",
            hint="the store's start-up recovery (run by the renewal daemon) resumes or rolls "
            f"it back; `tpmid reset {self.name}` starts over",
        )

    def new_key(self, current_key_file: Path | None) -> _Key:
        """Open the key the new certificate will certify (staging a new file key)."""
        from tpmid.tpm.keys import create_loaded_key_file, load_identity_key

        ident = self.ident
        if ident.key.kind != "file":
            loaded = load_identity_key(self.tpm, ident.key)
            self.stack.callback(loaded.close)
            return _Key(loaded, loaded.public_key_der(), None, None)
        if self.auth_with_current and not ident.renew.rotate_key:
            loaded = _open_existing_key(self.tpm, ident, current_key_file)
            self.stack.callback(loaded.close)
            return _Key(loaded, loaded.public_key_der(), current_key_file, None)
        pem, loaded = create_loaded_key_file(self.tpm, ident.key.alg)
        self.stack.callback(loaded.close)
        # Durable before it is used: the staged file and the journal entry let a crash
        # from here on be rolled back or resumed.
        path = self.store.stage_key(self.name, pem)
        version = self.store.key_version(path)
        try:
            self.journal(version=version)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(path).unlink()
            raise
        log.info("%s: created a new %s key in the TPM (key file version %s)", self.name,
                 ident.key.alg, version)
        return _Key(loaded, loaded.public_key_der(), path, version)

    def resumed_key(self, entry: JournalEntry, current_key_file: Path | None) -> _Key:
        ident = self.ident
        if ident.key.kind == "file":
            path = (self.store.key_path(self.name, entry.version) if entry.version
                    else current_key_file)
            loaded = _open_existing_key(self.tpm, ident, path)
            staged = entry.version
        else:
            from tpmid.tpm.keys import load_identity_key

            loaded, path, staged = load_identity_key(self.tpm, ident.key), None, None
        try:
            spki = loaded.public_key_der()
        finally:
            loaded.close()
        return _Key(None, spki, path, staged)

    def csr(self, key: LoadedKey, challenge_password: str | None = None
            ) -> x509.CertificateSigningRequest:
        from tpmid.csr import build_csr

        hw = None
        if self.ident.san.hardware_module_name:
            hw = self.hw_module or _hw_module(self.tpm)
        return build_csr(key.private_key(), self.ident.subject, self.ident.san,
                         hash_name=key.hash_name, hw_module=hw,
                         challenge_password=challenge_password)

    # -- EST -------------------------------------------------------------------------

    def client_tls_for(self, trust: _Trust, current: Any) -> ClientTls:
        """The TLS context that authenticates this request (RFC 7030 §3.3.2)."""
        auth = self.est.auth
        max_version = ssl.TLSVersion.TLSv1_2 if self.est.pop else None
        if self.auth_with_current:
            # RFC 7030 §4.2.2: re-enrollment is authenticated with the certificate
            # being renewed, i.e. this identity's current key and certificate.
            loaded = _open_existing_key(self.tpm, self.ident, current.key_file)
            self.stack.callback(loaded.close)
            return self.stack.enter_context(_client_tls(
                trust, key=loaded, cert_chain=_tls_chain(current.cert, current.chain),
                max_version=max_version))
        if auth.client is not None:
            other = self.config.identity(auth.client)
            stored = self.store.current(other.name)
            if stored is None:
                raise StoreError(
                    f"{self.name} authenticates with {other.name}'s certificate, but "
                    f"{other.name} is not enrolled yet",
                    hint=f"run `tpmid enroll {other.name}` first",
                )
            loaded = _open_existing_key(self.tpm, other, stored.key_file)
            self.stack.callback(loaded.close)
            return self.stack.enter_context(_client_tls(
                trust, key=loaded, cert_chain=_tls_chain(stored.cert, stored.chain),
                max_version=max_version))
        if auth.client_files is not None:
            from tpmid.secrets import check_private_file

            check_private_file(auth.client_files.key, "TLS client key file")
            chain = load_pem_certificates([auth.client_files.cert], "TLS client certificate")
            return self.stack.enter_context(_client_tls(
                trust, key_file=auth.client_files.key, cert_chain=chain,
                max_version=max_version))
        return self.stack.enter_context(_client_tls(trust, max_version=max_version))

    def credentials(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        auth = self.est.auth
        headers = {name: self.resolve(ref) for name, ref in auth.headers}
        basic = (auth.basic.username, self.resolve(auth.basic.password)) if auth.basic else None
        return headers, basic

    def trust(self) -> _Trust:
        trust = _server_trust(self.config, self.est)
        if not trust.anchors and not trust.use_system_store:
            if self.est.pin is None:
                raise ConfigError(
                    f"{self.config.source}: identities.{self.name}.est: no trust anchor for the "
                    "EST server",
                    hint="set trust.est_anchors (or est.trust_anchors) to the CA of the server's "
                    "TLS certificate, trust.use_system_store: true, or est.pin for a pinned "
                    "/cacerts bootstrap (RFC 7030 §3.6, §4.1.1)",
                )
            roots = bootstrap_root(self.est.url, self.est.pin,
                                   timeout=(self.est.connect_timeout, self.est.read_timeout),
                                   allow_http=self.est.allow_http, now=self.now)
            trust = _Trust(roots[:1], False, None)
        return trust


def enroll_identity(
    config: Config,
    name: str,
    *,
    tpm: TpmConnection,
    secrets: SecretResolver | Mapping[str, str],
    now: Callable[[], datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    store_dir: Path | None = None,
    reenroll: bool = False,
    auth_with_current: bool = False,
    hw_module: tuple[str, bytes] | None = None,
) -> EnrollResult:
    """Enroll (or with ``reenroll``, re-enroll) identity ``name``; see the module docstring.

    ``secrets`` resolves the :class:`~tpmid.config.SecretRef`s of ``est.auth``
    (a callback, or a mapping used as the environment). ``store_dir``
    overrides ``store.dir``. Raises ConfigError, TpmError, TlsShimError,
    EstError (EstRetryLater when the server keeps answering 202 beyond
    ``est.max_wait``), VerificationError or StoreError.

    ``auth_with_current`` makes a simpleenroll authenticate with the identity's
    own current key and certificate instead of ``est.auth`` (renewal with
    ``renew.method: simpleenroll``); simplereenroll always does.
    ``hw_module`` is the CSR's hardwareModuleName when the caller already read
    the EKs (provisioning); otherwise they are read when the SAN asks for it.
    """
    from tpmid.store import Store

    ident = config.identity(name)
    est = ident.est
    if est is None:
        raise ConfigError(f"{config.source}: identity {name!r} has no est section",
                          hint=f"add identities.{name}.est.url (see docs/config.md)")
    store = Store(store_dir or config.store.dir)
    operation: Operation = "simplereenroll" if reenroll else "simpleenroll"
    from tpmid.tpm.keys import storage_parent_scope

    with store.identity_lock(name), contextlib.ExitStack() as stack:
        # Closed last: the storage parent serves every key file this run touches.
        stack.enter_context(storage_parent_scope(tpm))
        run = _Enrollment(config, ident, est, tpm=tpm, store=store, resolve=_resolver(secrets),
                          now=now, sleep=sleep, operation=operation, stack=stack)
        current = store.current(name)
        run.auth_with_current = auth_with_current or reenroll
        run.hw_module = hw_module
        if run.auth_with_current and current is None:
            raise StoreError(f"{name} has no current certificate to re-enroll",
                             hint=f"enroll it first: tpmid enroll {name}")
        try:
            return _run(run, current)
        except EstRetryLater:
            raise  # the journal keeps the CSR for the next run (phase pending)
        except BaseException:
            run.rollback()
            raise


def _run(run: _Enrollment, current: Any) -> EnrollResult:
    from tpmid.est.client import make_session
    from tpmid.est.messages import decode_csr

    ident, est = run.ident, run.est
    requested = None
    if run.operation == "simplereenroll":
        from tpmid.csr import build_subject

        requested = build_subject(ident.subject)
        if requested != current.cert.subject:
            raise ConfigError(
                f"{ident.name}: the configured subject {requested.rfc4514_string()!r} differs "
                f"from the current certificate's {current.cert.subject.rfc4514_string()!r}; "
                "simplereenroll must keep it (RFC 7030 §4.2.2)",
                hint=f"use `tpmid enroll {ident.name}` (simpleenroll) for a new subject",
            )

    headers, basic = run.credentials()
    trust = run.trust()
    current_key_file = current.key_file if current is not None else None

    resume = run.resumable()
    csr: x509.CertificateSigningRequest | None = None
    factory: CsrFactory | None = None
    if resume is not None:
        run.entry = resume
        assert resume.csr_pem is not None
        csr = decode_csr(resume.csr_pem.encode())
        key = run.resumed_key(resume, current_key_file)
        log.info("%s: resuming the %s in flight (phase %s): resending the same CSR "
                 "(RFC 7030 §4.2.3)", ident.name, resume.method, resume.phase)
    else:
        key = run.new_key(current_key_file)
        assert key.loaded is not None
        if est.pop:
            loaded = key.loaded

            def pop_csr(tls_unique: bytes) -> x509.CertificateSigningRequest:
                # RFC 7030 §3.5: base64(tls-unique) as challengePassword, signed by the TPM.
                import base64

                return run.csr(loaded, base64.b64encode(tls_unique).decode("ascii"))

            factory = pop_csr
        else:
            csr = run.csr(key.loaded)
            # The key is no longer needed: free its TPM slot before the TLS key loads.
            key.loaded.close()
            key.loaded = None
    if csr is not None:
        run.journal(phase="submitted",
                    csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode())
    elif run.entry is not None:
        run.journal(phase="submitted")

    tls = run.client_tls_for(trust, current)
    session = make_session(tls)
    run.stack.callback(session.close)
    client = _make_client(est.url, est, tls, session, headers=headers, basic=basic,
                          sleep=run.sleep, now=run.now)

    if est.issuer_anchors:
        issuers = load_pem_certificates(est.issuer_anchors, "issuer anchor file")
    else:
        # RFC 7030 §4.1.3: the CA certificates of this label, over the channel
        # whose server was just authenticated.
        issuers = client.cacerts()

    payload: x509.CertificateSigningRequest | CsrFactory
    if csr is not None:
        payload = csr
    else:
        assert factory is not None
        payload = factory
    try:
        if run.operation == "simplereenroll":
            resp = client.simplereenroll(payload)
        else:
            resp = client.simpleenroll(payload)
    except EstRetryLater as e:
        if run.entry is not None and run.entry.csr_pem:
            # RFC 7030 §4.2.3: the same request is to be resent later; keep it.
            run.journal(phase="pending", retry_after=e.retry_after)
            e.hint = (f"the CSR is kept; run `tpmid enroll {ident.name}` again after "
                      f"{e.retry_after:g} s to resend it")
        else:
            # A PoP-linked CSR is bound to its TLS session and cannot be resent.
            run.rollback()
        raise

    if requested is None:
        from tpmid.csr import build_subject

        requested = build_subject(ident.subject)
    verified = verify_enrollment(
        resp.certificate, key_spki_der=key.spki, requested_subject=requested,
        issuers=issuers, extra_certs=resp.extra_certs,
        profile="ca" if ident.profile == "ca" else "device", now=run.now(),
        accept_rewritten_subject=est.accept_rewritten_subject,
    )
    stored = run.store.commit(ident.name, verified.certificate, verified.chain, key.key_path)
    run.entry = None  # commit cleared the journal
    log.info("%s: enrolled %s (serial %x, until %s) via %s", ident.name,
             verified.certificate.subject.rfc4514_string(), verified.certificate.serial_number,
             verified.certificate.not_valid_after_utc.isoformat(), run.operation)
    return EnrollResult(
        name=ident.name, operation=run.operation, certificate=stored.cert, chain=stored.chain,
        version=stored.version, cert_path=stored.cert_path, chain_path=stored.chain_path,
        key_path=stored.key_file, requested_subject=requested.rfc4514_string(),
        subject_rewritten=verified.subject_rewritten, resumed=resume is not None,
    )
