"""One-shot enrollment of one identity: ``tpmid enroll NAME``.

:func:`enroll_identity` is the orchestration the CLI calls (and the renewal
engine reuses with ``reenroll=True``). For identity ``NAME`` of the config it

1. takes the identity's store lock;
2. opens or creates the key through its :class:`~tpmid.tpm.identity.IdentityKey`:
   an IDevID stays where it is; a file key gets a new TSS2 key file, staged in
   the store (0600, ``keys/NAME/``) with a journal entry, so that an
   interrupted run is rolled back or resumed;
3. builds the CSR with the TPM as signer (one TPM2_Sign) and closes the key
   again, unless proof-of-possession linking needs it during the request;
4. authenticates to the EST server as ``est.auth`` says: ``client: OTHER`` is
   mutual TLS with OTHER's TPM key and stored certificate, ``client: {cert,
   key}`` a software key file, ``headers``/``basic`` the credentials the EST
   client factory resolves; the factory also authenticates the server;
5. fetches ``/cacerts`` over that authenticated channel (unless
   ``est.issuer_anchors`` are configured), enrolls (``simpleenroll``, or
   ``simplereenroll`` authenticated with the identity's current certificate),
   verifies the result (:mod:`tpmid.est.verify`) and commits certificate,
   chain and key file to the store.

The TPM is borrowed through a :class:`~tpmid.tpm.lease.TpmLease`: held for
the key and CSR work and the TLS handshake's signature, given back (objects
flushed, connection closed, host lock released) before the request goes out,
so a slow server never blocks the TPM for other commands. Every TPM transient
object is flushed before it returns, on success and on error.

An EST ``202 Accepted`` that outlasts ``est.max_wait`` leaves the journal in
phase ``pending`` with the CSR, and the next run resends the same CSR
(RFC 7030 §4.2.3); any other failure rolls the staged key back.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tpmid.cancel import Cancelled
from tpmid.certfiles import load_pem_certificates, spki_der
from tpmid.clock import utcnow
from tpmid.config import Config, EstConfig, IdentityConfig
from tpmid.csr import (
    ChannelBinding,
    ChannelBoundCsr,
    build_csr,
    build_csr_with_attribute,
    build_subject,
)
from tpmid.errors import (
    ConfigError,
    EstAuthError,
    EstProtocolError,
    EstRetryLater,
    EstServerError,
    EstTransportError,
    StoreError,
    TpmidError,
    VerificationError,
)
from tpmid.est.csrattrs import CsrPlan, DeviceFacts, plan_csr
from tpmid.est.messages import decode_csr
from tpmid.est.verify import (
    CacertsTrust,
    describe_cert,
    fingerprint_sha256,
    follow_root_key_update,
    verify_chain,
    verify_enrollment,
)
from tpmid.evidence import (
    ID_AA_ATTESTATION,
    TCG_ATTEST_TPM_CERTIFY,
    AttestationBundle,
    TpmCertifyStatement,
)
from tpmid.evidence import attribute as evidence_attribute
from tpmid.render import name as render_name
from tpmid.render import quoted_name
from tpmid.render import serial as render_serial
from tpmid.secrets import check_private_file
from tpmid.store import JournalEntry, Store, StoredIdentity
from tpmid.tpm.identity import IdentityKey, identity_key
from tpmid.tpm.lease import LeasedKey, TpmLease
from tpmid.tpm.specs import KEY_SPECS

if TYPE_CHECKING:
    from tpmid.est.client import CsrFactory, EstClient, ServerKeygenResponse
    from tpmid.tls.keys import TlsSigningKey
    from tpmid.tpm.connection import TpmConnection
    from tpmid.tpm.loaded import LoadedKey

log = logging.getLogger(__name__)

Operation = Literal["simpleenroll", "simplereenroll", "serverkeygen"]
# What a version whose key came from the EST server records (Store.commit key_origin).
SERVER_GENERATED = "server-generated"
# Journal extra: a new key was linked into the PKCS#11 token under this label.
PKCS11_STAGED = "pkcs11_staged"


class EstClientFactory(Protocol):
    """What enrollment needs from :class:`tpmid.wiring.est.EstClients`."""

    def trust(self, est: EstConfig, where: str) -> Any:
        """How to authenticate the server of ``est`` (may bootstrap a pinned root)."""
        ...

    def credentials(self, est: EstConfig) -> tuple[dict[str, str], tuple[str, str] | None]:
        """The resolved header and Basic credentials of ``est``."""
        ...

    def fetch_cacerts(self, est: EstConfig) -> Any:
        """``GET /cacerts`` with server authentication only (no client key, no TPM)."""
        ...

    def open(self, est: EstConfig, trust: Any, *, key: TlsSigningKey | None = None,
             cert: x509.Certificate | None = None, chain: Sequence[x509.Certificate] = (),
             key_file: Path | None = None,
             credentials: tuple[Mapping[str, str], tuple[str, str] | None] | None = None,
             ) -> AbstractContextManager[EstClient]:
        """An EST client authenticated with that TLS identity and those credentials."""
        ...


class KeyMirror(Protocol):
    """What enrollment needs from :class:`tpmid.lifecycle.pkcs11.TokenMirror` (PKCS#11 token)."""

    def enabled(self, name: str) -> bool:
        """True when ``name``'s key belongs in the token."""
        ...

    def staged(self, tpm: Callable[[], TpmConnection], name: str, key_file: Path) -> str:
        """Link a freshly staged key under its waiting label; return that label."""
        ...

    def committed(self, tpm: Callable[[], TpmConnection] | None, name: str,
                  store: Store) -> list[str]:
        """After the commit: the committed key and certificate under the identity's label."""
        ...

    def abandoned(self, name: str) -> None:
        """The renewal was rolled back: remove what waits for it."""
        ...


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
    fullchain_path: Path | None = None
    subject_rewritten: bool = False
    resumed: bool = field(default=False)
    key_origin: str | None = None  # "server-generated" (RFC 7030 §4.4)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (what ``tpmid enroll`` prints)."""
        c = self.certificate
        return {
            "identity": self.name,
            "operation": self.operation,
            "version": self.version,
            "subject": render_name(c.subject),
            "requested_subject": self.requested_subject,
            "subject_rewritten": self.subject_rewritten,
            "issuer": render_name(c.issuer),
            "serial": f"{render_serial(c.serial_number)}",
            "not_before": c.not_valid_before_utc.isoformat(),
            "not_after": c.not_valid_after_utc.isoformat(),
            "sha256_fingerprint": fingerprint_sha256(c),
            "chain": [render_name(x.subject) for x in self.chain],
            "cert_path": str(self.cert_path),
            "chain_path": str(self.chain_path),
            "fullchain_path": str(self.fullchain_path) if self.fullchain_path else None,
            "key_path": str(self.key_path) if self.key_path else None,
            "key_origin": self.key_origin,
            "resumed": self.resumed,
        }


@dataclass
class _Key:
    """The key the new certificate certifies, and where its file lives."""

    loaded: LoadedKey | None
    spki: bytes
    key_path: Path | None  # the file committed with the certificate (None: not a file key)


class _Enrollment:
    """The state of one :func:`enroll_identity` run (kept small and explicit)."""

    def __init__(self, config: Config, ident: IdentityConfig, est: EstConfig, *,
                 lease: TpmLease, store: Store, clients: EstClientFactory,
                 now: Callable[[], datetime], operation: Operation,
                 auth_with_current: bool, hw_module: tuple[str, bytes] | None,
                 stack: contextlib.ExitStack, mirror: KeyMirror | None = None) -> None:
        self.config = config
        self.ident = ident
        self.name = ident.name
        self.key: IdentityKey = identity_key(ident)
        self.est = est
        self.lease = lease
        self.store = store
        self.clients = clients
        self.now = now
        self.operation: Operation = operation
        self.auth_with_current = auth_with_current
        self.hw_module = hw_module
        self.stack = stack
        self.entry: JournalEntry | None = None
        # The server's CSR attributes as followed for this request (None: not read).
        self.plan: CsrPlan | None = None
        # est.attestation: include → always; required-by-server → when /csrattrs asks.
        self.attest = est.attestation == "include"
        # The PKCS#11 token the key is linked into, if it is (tpmid.lifecycle.pkcs11).
        self.mirror = mirror if mirror is not None and mirror.enabled(ident.name) else None

    # -- journal ---------------------------------------------------------------------

    def journal(self, **changes: Any) -> None:
        """Record (or update) the work in flight before the next step that can be lost."""
        if self.entry is None:
            fields: dict[str, Any] = {
                "operation": "renew" if self.operation == "simplereenroll" or (
                    self.operation == "serverkeygen" and self.auth_with_current) else "enroll",
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
        """Forget the work in flight and the key file it staged."""
        entry, self.entry = self.entry, None
        if entry is None:
            return
        with contextlib.suppress(StoreError):
            self.store.journal_clear(self.name)
            if entry.version is not None:
                self.store.discard_key(self.name, entry.version)
                log.info("%s: rolled back staged key version %s", self.name, entry.version)
        if self.mirror is not None and entry.extra.get(PKCS11_STAGED):
            try:
                self.mirror.abandoned(self.name)
            except TpmidError as e:  # the next recovery's token sync removes it
                log.warning("%s: could not remove the rolled-back key from the PKCS#11 "
                            "token: %s", self.name, e)

    # -- key and CSR -----------------------------------------------------------------

    def resumable(self) -> JournalEntry | None:
        """The journal entry this run resends (RFC 7030 §4.2.3), if there is one."""
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

    @property
    def rotates(self) -> bool:
        """True when the new certificate gets a new key (always, except renew.rotate_key: false)."""
        return not (self.auth_with_current and not self.ident.renew.rotate_key)

    def facts(self) -> DeviceFacts:
        """What the CSR-attributes plan needs to know about this identity and request."""
        subject = self.ident.subject
        san = self.ident.san
        return DeviceFacts(
            alg=self.key.alg,
            alg_fixed=not (self.key.chooses_alg and self.rotates),
            subject=frozenset(k for k in ("cn", "o", "ou", "serial_number")
                              if getattr(subject, k)),
            san=bool(san.dns or san.ip or san.uri or san.hardware_module_name),
            pop=self.est.pop,
            attestation=self.est.attestation != "off",
            kind_note=f"{self.name}'s key ({self.key.describe()})",
        )

    def new_key(self, current_key_file: Path | None) -> _Key:
        """Open the key the new certificate will certify (staging a new file key)."""
        new = self.key.for_new_certificate(self.lease.tpm(), rotate=self.rotates,
                                           current_file=current_key_file,
                                           alg=self.plan.alg if self.plan else None)
        self.lease.keep(new.loaded)
        if new.key_file is None:
            path = current_key_file if not self.rotates else None
            return _Key(new.loaded, new.loaded.public_key_der(), path)
        # Durable before it is used: the staged file and the journal entry let a crash
        # from here on be rolled back or resumed.
        path = self.store.stage_key(self.name, new.key_file)
        version = self.store.key_version(path)
        try:
            self.journal(version=version)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(path).unlink()
            raise
        log.info("%s: created a new %s key in the TPM (key file version %s)", self.name,
                 new.loaded.alg, version)
        self.stage_in_token(path)
        return _Key(new.loaded, new.loaded.public_key_der(), path)

    def stage_in_token(self, path: Path) -> None:
        """Link a staged key file into the PKCS#11 token under its waiting label.

        Consumers of the PKCS#11 URI keep the current key until the commit; the new
        one waits under its own label, journalled first so a rollback removes it.
        """
        if self.mirror is None:
            return
        self.journal(extra={**(self.entry.extra if self.entry else {}), PKCS11_STAGED: "yes"})
        self.mirror.staged(self.lease.tpm, self.name, path)

    def resumed_key(self, entry: JournalEntry, current_key_file: Path | None) -> _Key:
        """The key of the request being resent (its staged file, or the current key)."""
        if self.operation == "serverkeygen":
            return _Key(None, b"", None)  # the key comes with the answer
        path = (self.store.key_path(self.name, entry.version) if entry.version
                else current_key_file)
        spki = self.key.public_key_der(self.lease.tpm(), path)
        return _Key(None, spki, path)

    def csr(self, key: LoadedKey, challenge_password: str | None = None
            ) -> x509.CertificateSigningRequest:
        """A CSR for ``key`` (one TPM2_Sign), with the hardwareModuleName if configured."""
        hw = None
        if self.ident.san.hardware_module_name:
            hw = self.hw_module or self.lease.tpm().hardware_module_name()
        return build_csr(key.private_key(), self.ident.subject, self.ident.san,
                         hash_name=key.hash_name, hw_module=hw,
                         challenge_password=challenge_password)

    def attested_csr(self, tpm: TpmConnection, key: LoadedKey, binding: ChannelBinding,
                     challenge_password: str | None) -> x509.CertificateSigningRequest:
        """A CSR carrying TPM2_Certify evidence of ``key`` by the IAK, bound to ``binding``.

        draft-ietf-lamps-csr-attestation (tpmid.evidence): one tcg-attest-tpm-certify
        statement, the IAK certificate and its chain; TPMS_ATTEST.extraData is the
        TLS channel binding of the connection the request goes over.
        """
        owner = self.config.attestation_identity()
        assert owner is not None  # the config refuses attestation without an IAK
        certs = self.store.attestation_certs(owner.name)
        if not certs:
            raise StoreError(
                f"{self.name}: est.attestation needs the IAK certificate of {owner.name}, and "
                "the store has none", hint="obtain it by provisioning the device "
                f"(tpmid provision), which enrolls {owner.name} and its IAK")
        iak = identity_key(owner).open_iak(tpm)
        try:
            if iak.public_key_der() != spki_der(certs[0].public_key()):
                raise StoreError(
                    f"the stored IAK certificate of {owner.name} is not for this TPM's IAK",
                    hint="provision the device again (tpmid provision)")
            attest, signature, public = tpm.certify(key, iak, binding.value)
        finally:
            iak.close()
        bundle = AttestationBundle(
            ((TCG_ATTEST_TPM_CERTIFY, TpmCertifyStatement(attest, signature, public).encode()),),
            tuple(c.public_bytes(serialization.Encoding.DER) for c in certs))
        hw = None
        if self.ident.san.hardware_module_name:
            hw = self.hw_module or tpm.hardware_module_name()
        log.info("%s: CSR with TPM2_Certify evidence by the IAK (%s binding)", self.name,
                 binding.kind)
        return build_csr_with_attribute(
            key.private_key(), self.ident.subject, self.ident.san, hash_name=key.hash_name,
            attribute_der=evidence_attribute(bundle), hw_module=hw,
            challenge_password=challenge_password)

    # -- EST -------------------------------------------------------------------------

    def client(self, trust: Any, current: StoredIdentity | None,
               credentials: tuple[dict[str, str], tuple[str, str] | None]) -> EstClient:
        """The EST client authenticated as this request needs (RFC 7030 §3.3.2)."""
        auth = self.est.auth
        if self.auth_with_current:
            # RFC 7030 §4.2.2: re-enrollment is authenticated with the certificate
            # being renewed, i.e. this identity's current key and certificate.
            assert current is not None
            return self._client_as(self.key, current, trust, credentials)
        if auth.client is not None:
            other = self.config.identity(auth.client)
            stored = self.store.current(other.name)
            if stored is None:
                raise StoreError(
                    f"{self.name} authenticates with {other.name}'s certificate, but "
                    f"{other.name} is not enrolled yet",
                    hint=f"run `tpmid enroll {other.name}` first",
                )
            return self._client_as(identity_key(other), stored, trust, credentials)
        if auth.client_files is not None:
            check_private_file(auth.client_files.key, "TLS client key file")
            chain = load_pem_certificates([auth.client_files.cert], "TLS client certificate")
            return self.stack.enter_context(self.clients.open(
                self.est, trust, key_file=auth.client_files.key, chain=chain,
                credentials=credentials))
        return self.stack.enter_context(self.clients.open(self.est, trust,
                                                          credentials=credentials))

    def _client_as(self, key: IdentityKey, stored: StoredIdentity, trust: Any,
                   credentials: tuple[dict[str, str], tuple[str, str] | None]) -> EstClient:
        # Loaded when the handshake signs, and given back right after (tpmid.tpm.lease).
        spki = spki_der(stored.cert.public_key())
        leased = LeasedKey(self.lease, lambda tpm: key.open(tpm, stored.key_file), spki,
                           description=f"{key.name}'s key ({key.describe()})",
                           identity=key.name)
        return self.stack.enter_context(self.clients.open(
            self.est, trust, key=leased, cert=stored.cert, chain=stored.chain,
            credentials=credentials))


def enroll_identity(
    config: Config,
    name: str,
    *,
    store: Store,
    lease: TpmLease,
    clients: EstClientFactory,
    now: Callable[[], datetime] = utcnow,
    reenroll: bool = False,
    auth_with_current: bool = False,
    hw_module: tuple[str, bytes] | None = None,
    serverkeygen: bool = False,
    mirror: KeyMirror | None = None,
) -> EnrollResult:
    """Enroll (or with ``reenroll``, re-enroll) identity ``name``; see the module docstring.

    Raises ConfigError, TpmError, TlsShimError, EstError (EstRetryLater when the
    server keeps answering 202 beyond ``est.max_wait``), VerificationError or
    StoreError.

    ``auth_with_current`` makes a simpleenroll authenticate with the identity's
    own current key and certificate instead of ``est.auth`` (renewal with
    ``renew.method: simpleenroll``); simplereenroll always does.
    ``hw_module`` is the CSR's hardwareModuleName when the caller already read
    the EKs (provisioning); otherwise they are read when the SAN asks for it.
    ``lease`` lends the TPM (see the module docstring); it is released when this
    returns or raises.

    ``serverkeygen`` (or ``est.serverkeygen``) asks the server for the key (RFC 7030
    §4.4, ``/serverkeygen``, authenticated as a simpleenroll would be, or with the
    current certificate when re-enrolling): the private key that comes back is
    imported into the TPM (TPM2_Import under the storage root key) and becomes the
    version's TSS2 key file; its bytes are never written or logged.

    returns or raises. ``mirror`` keeps a PKCS#11 token in step: a new key is
    linked under a waiting label when it is staged and takes the identity's
    label at the commit (:mod:`tpmid.lifecycle.pkcs11`).
    """
    ident = config.identity(name)
    est = ident.est
    if est is None:
        raise ConfigError(f"{config.source}: identity {name!r} has no est section",
                          hint=f"add identities.{name}.est.url (see docs/config.md)")
    operation: Operation = "simplereenroll" if reenroll else "simpleenroll"
    if est.attestation != "off" and identity_key(ident).birth:
        raise ConfigError(
            f"{config.source}: identities.{name}.est.attestation: an IDevID is certified by "
            "the IAK when the device is provisioned, not in its own CSR",
            hint="use est.attestation for key-file identities (LDevID, Edge CA)")
    if (serverkeygen or est.serverkeygen) and est.attestation != "off":
        raise ConfigError(
            f"{config.source}: identities.{name}: a server-generated key cannot be attested "
            "(it was not made in the TPM), but est.attestation is "
            f"{est.attestation}", hint=f"set identities.{name}.est.attestation: off to "
            "enroll with --serverkeygen, or let the TPM make the key")
    if serverkeygen or est.serverkeygen:
        _check_serverkeygen(config, ident)
        operation = "serverkeygen"

    with store.identity_lock(name), contextlib.ExitStack() as stack:
        # Released last: nothing of the TPM is held once this returns.
        stack.callback(lease.release)
        run = _Enrollment(config, ident, est, lease=lease, store=store, clients=clients,
                          now=now, operation=operation,
                          auth_with_current=auth_with_current or reenroll,
                          hw_module=hw_module, stack=stack, mirror=mirror)
        current = store.current(name)
        if run.auth_with_current and current is None:
            raise StoreError(f"{name} has no current certificate to re-enroll",
                             hint=f"enroll it first: tpmid enroll {name}")
        try:
            return _run(run, current)
        except EstRetryLater:
            raise  # the journal keeps the CSR for the next run (phase pending)
        except Cancelled:
            # Stopping: a request already sent stays in the journal and is resent at
            # the next start (RFC 7030 §4.2.3), as after a crash.
            if run.entry is None or run.entry.phase not in ("submitted", "pending") \
                    or not run.entry.csr_pem:
                run.rollback()
            raise
        except BaseException:
            run.rollback()
            raise


def _check_serverkeygen(config: Config, ident: IdentityConfig) -> None:
    """ConfigError unless ``ident`` can take a server-generated key (RFC 7030 §4.4)."""
    identity_key(ident).check_server_keygen()
    if ident.san.hardware_module_name:
        raise ConfigError(
            f"{config.source}: identities.{ident.name}: a server-generated key is imported into "
            "the TPM, so it cannot carry a hardwareModuleName (the TPM did not make it and "
            "cannot attest it)",
            hint=f"set identities.{ident.name}.san.hardware_module_name: false, or let the TPM "
            "make the key (no --serverkeygen, est.serverkeygen: false)")


def _run(run: _Enrollment, current: StoredIdentity | None) -> EnrollResult:
    requested = _requested_subject(run, current)
    credentials = run.clients.credentials(run.est)
    trust = run.clients.trust(run.est, f"identities.{run.name}.est")
    resume = run.resumable()
    client: EstClient | None = None
    if resume is None and run.est.csrattrs != "ignore":
        # RFC 7030 §4.5: the CSR attributes come first, they choose the key.
        run.plan, client = _follow_csrattrs(run, trust, current, credentials)
        if run.plan is not None and run.plan.pop and not run.est.pop:
            # challengePassword asked for: a connection capped at TLS 1.2 (tls-unique).
            run.est = replace(run.est, pop=True)
            client = None
    key, payload, resumed = _key_and_request(run, current, resume)
    if client is not None:
        # The connection is up already: nothing of the TPM is held across the network.
        run.lease.release()
    else:
        client = run.client(trust, current, credentials)
        if not isinstance(getattr(client.tls, "key", None), LeasedKey):
            # No TPM signature in the handshake: give the TPM back before the network.
            run.lease.release()
    issuers = _issuers(run, client, current)
    if run.est.attestation == "required-by-server":
        run.attest = _server_wants_evidence(run, client)
        log.info("%s: the server %s attestation evidence", run.name,
                 "asks for" if run.attest else "does not ask for")
    response = _send(run, client, payload)
    return _verify_and_commit(run, key, response, requested, issuers, resumed)


def _requested_subject(run: _Enrollment, current: StoredIdentity | None) -> x509.Name:
    """The subject to ask for; simplereenroll must keep the current one (RFC 7030 §4.2.2)."""
    requested = build_subject(run.ident.subject)
    if run.operation == "simplereenroll":
        assert current is not None
        if requested != current.cert.subject:
            raise ConfigError(
                f"{run.name}: the configured subject {quoted_name(requested)} differs "
                f"from the current certificate's {quoted_name(current.cert.subject)}; "
                "simplereenroll must keep it (RFC 7030 §4.2.2)",
                hint=f"use `tpmid enroll {run.name}` (simpleenroll) for a new subject",
            )
    return requested


def _follow_csrattrs(run: _Enrollment, trust: Any, current: StoredIdentity | None,
                     credentials: tuple[dict[str, str], tuple[str, str] | None],
                     ) -> tuple[CsrPlan | None, EstClient | None]:
    """Read the label's CSR attributes and decide what the CSR honours (est.csrattrs).

    The attributes are asked for first on a connection without client
    authentication (no client certificate, no credential: the TPM is not touched
    and the enrollment's TPM work keeps its order); a label that wants the client
    authenticated for /csrattrs (401, 403, or a TLS handshake that needs a client
    certificate) is asked again on the enrollment's own connection, which is then
    returned for the rest of the exchange.

    ``follow`` warns about what cannot be honoured and goes on; ``require`` refuses.
    A server whose /csrattrs answers an error or garbage is, under ``follow``, a
    warning too: the CSR is then built from the config alone.
    """
    mode = run.est.csrattrs
    client: EstClient | None = None
    try:
        try:
            with run.clients.open(run.est, trust, credentials=({}, None)) as anonymous:
                attrs = anonymous.csrattrs()
        except (EstAuthError, EstTransportError) as e:
            log.debug("%s: /csrattrs without client authentication failed (%s); asking on "
                      "the authenticated connection", run.name, e.message)
            client = run.client(trust, current, credentials)
            attrs = client.csrattrs()
    except (EstServerError, EstProtocolError) as e:
        if mode == "require":
            e.hint = e.hint or (f"the label's CSR attributes are required "
                                f"(identities.{run.name}.est.csrattrs: require)")
            raise
        log.warning("%s: cannot read the label's CSR attributes (%s); building the CSR from "
                    "the config", run.name, e.message)
        return None, client
    plan = plan_csr(attrs, run.facts())
    for item in plan.honoured:
        log.info("%s: CSR attributes: %s", run.name, item)
    if plan.unhonoured:
        listed = "; ".join(plan.unhonoured)
        if mode == "require":
            raise ConfigError(
                f"{run.name}: the EST label's CSR attributes ask for what this identity "
                f"cannot put in its CSR: {listed}",
                hint=f"change the identity's config (key, subject, san) or the label's CSR "
                f"attributes, or set identities.{run.name}.est.csrattrs: follow to enroll "
                "with a warning instead")
        for item in plan.unhonoured:
            log.warning("%s: CSR attributes: cannot honour %s", run.name, item)
    return plan, client


def _key_and_request(run: _Enrollment, current: StoredIdentity | None,
                     resume: JournalEntry | None,
                     ) -> tuple[_Key, x509.CertificateSigningRequest | CsrFactory
                                | ChannelBoundCsr, bool]:
    """The key and what to send: the journalled CSR, a new CSR, or a CSR made later
    on the connection (proof-of-possession linking, attestation evidence)."""
    current_key_file = current.key_file if current is not None else None
    if resume is not None:
        run.entry = resume
        assert resume.csr_pem is not None
        csr = decode_csr(resume.csr_pem.encode())
        key = run.resumed_key(resume, current_key_file)
        log.info("%s: resuming the %s in flight (phase %s): resending the same CSR "
                 "(RFC 7030 §4.2.3)", run.name, resume.method, resume.phase)
        run.journal(phase="submitted")
        return key, csr, True
    if run.operation == "serverkeygen":
        return _serverkeygen_request(run)
    key = run.new_key(current_key_file)
    assert key.loaded is not None
    if run.est.attestation != "off":
        return key, _channel_bound_request(run, key), False
    if run.est.pop:
        # The CSR is signed after the handshake (it carries tls-unique); the TPM is
        # given back in between, so the key is loaded again then.
        key.loaded.close()
        key.loaded = None
        path = key.key_path

        def pop_csr(tls_unique: bytes) -> x509.CertificateSigningRequest:
            # RFC 7030 §3.5: base64(tls-unique) as challengePassword, signed by the TPM.
            with run.lease.session() as tpm:
                loaded = run.lease.keep(run.key.open(tpm, path))
                return run.csr(loaded, base64.b64encode(tls_unique).decode("ascii"))

        if run.entry is not None:
            run.journal(phase="submitted")
        return key, pop_csr, False
    csr = run.csr(key.loaded)
    # The key is no longer needed: free its TPM slot before the TLS key loads.
    key.loaded.close()
    key.loaded = None
    run.journal(phase="submitted", csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode())
    return key, csr, False


def _channel_bound_request(run: _Enrollment, key: _Key) -> ChannelBoundCsr:
    """A CSR made after the handshake: evidence (and PoP) bound to that connection."""
    # The CSR is signed after the handshake; the TPM is given back in between, so
    # the key is loaded again then.
    assert key.loaded is not None
    key.loaded.close()
    key.loaded = None
    path = key.key_path

    def make(binding: ChannelBinding) -> x509.CertificateSigningRequest:
        password = None
        if run.est.pop:
            if binding.kind != "tls-unique":
                raise EstProtocolError(
                    "proof-of-possession linking needs TLS 1.2 (tls-unique), but the "
                    f"connection offers {binding.kind}",
                    hint="cap the connection at TLS 1.2 (tpmid does this when est.pop is set)")
            # RFC 7030 §3.5: base64(tls-unique) as challengePassword.
            password = base64.b64encode(binding.value).decode("ascii")
        with run.lease.session() as tpm:
            loaded = run.lease.keep(run.key.open(tpm, path))
            if run.attest:
                return run.attested_csr(tpm, loaded, binding, password)
            return run.csr(loaded, password)

    if run.entry is not None:
        run.journal(phase="submitted")
    return ChannelBoundCsr(make)


def _server_wants_evidence(run: _Enrollment, client: EstClient) -> bool:
    """True when the label's /csrattrs lists id-aa-attestation (est.attestation:
    required-by-server); the attributes already read for the CSR are reused."""
    if run.plan is not None:
        return run.plan.attestation
    return any(a.oid.dotted_string == ID_AA_ATTESTATION for a in client.csrattrs())


def _serverkeygen_request(run: _Enrollment
                          ) -> tuple[_Key, x509.CertificateSigningRequest | CsrFactory, bool]:
    """The CSR of a server-side key generation (RFC 7030 §4.4.1).

    The server ignores the CSR's public key and signature and makes the key itself;
    the CSR carries the subject and subjectAltName (and, with PoP, tls-unique). It is
    signed with a throwaway software key of the algorithm the new key should have
    (some servers make a key of the CSR's type), which certifies nothing and is
    dropped at once. No TPM work happens until the answer arrives.
    """
    alg = run.plan.alg if run.plan is not None else run.key.alg
    throwaway: Any = (rsa.generate_private_key(65537, 2048) if alg.startswith("rsa")
                      else ec.generate_private_key(ec.SECP384R1() if alg == "ecc-p384"
                                                   else ec.SECP256R1()))
    hash_name = KEY_SPECS[alg].hash_name

    def make(challenge: str | None = None) -> x509.CertificateSigningRequest:
        return build_csr(throwaway, run.ident.subject, run.ident.san, hash_name=hash_name,
                         challenge_password=challenge)

    key = _Key(None, b"", None)
    if run.est.pop:
        def pop_csr(tls_unique: bytes) -> x509.CertificateSigningRequest:
            return make(base64.b64encode(tls_unique).decode("ascii"))

        return key, pop_csr, False
    csr = make()
    run.journal(phase="submitted", csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode())
    return key, csr, False


def _import_server_key(run: _Enrollment, response: ServerKeygenResponse) -> _Key:
    """Import the server-generated key into the TPM and stage its key file (RFC 7030 §4.4.2).

    The key's bytes live in memory only, for as long as the import takes; the store
    gets the TPM's key file, whose private part only this TPM can decrypt.
    """
    try:
        private = serialization.load_der_private_key(response.private_key_der, password=None)
    except (ValueError, TypeError) as e:
        raise EstProtocolError(f"{run.est.url}: the server-generated key does not parse "
                               f"as a PKCS#8 private key ({type(e).__name__})") from None
    try:
        if not isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise EstProtocolError(
                f"{run.est.url}: the server generated a {type(private).__name__.lstrip('_')}, "
                "which cannot become a TPM identity key (ECC P-256, P-384 or RSA-2048)",
                hint="configure the label to generate ECC P-256, P-384 or RSA-2048 keys")
        new = run.key.import_server_key(run.lease.tpm(), private)
    finally:
        del private
    run.lease.keep(new.loaded)
    assert new.key_file is not None
    path = run.store.stage_key(run.name, new.key_file)
    try:
        run.journal(version=run.store.key_version(path))
    except BaseException:
        with contextlib.suppress(OSError):
            Path(path).unlink()
        raise
    run.stage_in_token(path)
    spki = new.loaded.public_key_der()
    new.loaded.close()
    log.info("%s: imported the server-generated %s key into the TPM (key file version %s)",
             run.name, new.loaded.alg, run.store.key_version(path))
    return _Key(None, spki, path)


def _issuers(run: _Enrollment, client: EstClient,
             current: StoredIdentity | None) -> CacertsTrust:
    """The CAs the issued certificate must chain to.

    ``est.issuer_anchors`` (the operator's explicit anchors) when configured. Else the
    label's ``/cacerts`` over the channel whose server was just authenticated (RFC 7030
    §4.1.3): all of it for an identity's first certificate; for the next ones, what
    chains to the anchor stored with the current certificate — a new root only through
    NewWithOld (a CA rollover), never just because the server offers it.
    """
    if run.est.issuer_anchors:
        return CacertsTrust(tuple(load_pem_certificates(run.est.issuer_anchors,
                                                        "issuer anchor file")))
    offered = client.cacerts()
    if current is None or not current.chain:
        return CacertsTrust(tuple(offered))
    anchor = current.chain[-1]
    trust = follow_root_key_update(offered, anchor, now=run.now())
    for root in trust.new_roots:
        log.info("%s: /cacerts offers the new root %s, vouched for by the current anchor %s "
                 "through NewWithOld (RFC 7030 §4.1.3 Root CA Key Update)", run.name,
                 describe_cert(root), describe_cert(anchor))
    for u in trust.unvouched:
        log.warning("%s: /cacerts offers the root %s, which this identity's anchor %s does not "
                    "vouch for (%s); it is not trusted", run.name, describe_cert(u.root),
                    describe_cert(anchor), u.reason)
    return trust


def _explain_unvouched_root(run: _Enrollment, response: Any, trust: CacertsTrust,
                            error: VerificationError) -> None:
    """A certificate issued under a root nothing vouches for: say that, and what to do."""
    for u in trust.unvouched:
        try:
            verify_chain(response.certificate, issuers=[u.root],
                         intermediates=[*response.extra_certs, *trust.intermediates],
                         profile="ca" if run.ident.profile == "ca" else "device",
                         now=run.now(), trust=run.config.trust.profile)
        except VerificationError:
            continue
        raise VerificationError(
            f"{run.name}: the certificate the EST server issued chains to the root "
            f"{describe_cert(u.root)} that /cacerts now offers, but this identity's trust "
            f"anchor {describe_cert(trust.anchors[0])} does not vouch for it: {u.reason} "
            "(RFC 7030 §4.1.3 Root CA Key Update), so the new root is refused",
            hint=f"if the CA operator really replaced the CA, check the new root's SHA-256 "
            f"fingerprint with them and configure identities.{run.name}.est.issuer_anchors "
            "with it; the identity keeps its current certificate meanwhile") from error


def _send(run: _Enrollment, client: EstClient,
          payload: x509.CertificateSigningRequest | CsrFactory | ChannelBoundCsr) -> Any:
    """simpleenroll / simplereenroll; a 202 that outlasts est.max_wait keeps the CSR."""
    try:
        if run.operation == "serverkeygen":
            return client.serverkeygen(payload)
        if run.operation == "simplereenroll":
            return client.simplereenroll(payload)
        return client.simpleenroll(payload)
    except EstRetryLater as e:
        if run.entry is not None and run.entry.csr_pem:
            # RFC 7030 §4.2.3: the same request is to be resent later; keep it.
            run.journal(phase="pending", retry_after=e.retry_after)
            e.hint = (f"the CSR is kept: `tpmid renew {run.name}` (or the daemon) resends it "
                      f"after {e.retry_after:g} s")
        else:
            # A PoP-linked CSR is bound to its TLS session and cannot be resent.
            run.rollback()
        raise


def _verify_and_commit(run: _Enrollment, key: _Key, response: Any, requested: x509.Name,
                       trust: CacertsTrust, resumed: bool) -> EnrollResult:
    """Verify the issued certificate (key, chain, subject, validity, EKU) and commit it."""
    origin = None
    if run.operation == "serverkeygen":
        # The certificate must be for the key now in the TPM, as for any other key.
        key = _import_server_key(run, response)
        run.lease.release()
        origin = SERVER_GENERATED
    try:
        verified = verify_enrollment(
            response.certificate, key_spki_der=key.spki, requested_subject=requested,
            issuers=trust.anchors, extra_certs=[*response.extra_certs, *trust.intermediates],
            profile="ca" if run.ident.profile == "ca" else "device", now=run.now(),
            accept_rewritten_subject=run.est.accept_rewritten_subject,
            trust=run.config.trust.profile,
        )
    except VerificationError as e:
        _explain_unvouched_root(run, response, trust, e)
        raise
    if verified.chain and verified.chain[-1] in trust.new_roots:
        log.warning("%s: after the CA's Root CA Key Update its trust anchor is now %s (was %s), "
                    "stored with the new certificate", run.name,
                    describe_cert(verified.chain[-1]), describe_cert(trust.anchors[0]))
    stored = run.store.commit(run.name, verified.certificate, verified.chain, key.key_path,
                              key_origin=origin, server_sent=response.extra_certs)
    run.entry = None  # commit cleared the journal
    if run.mirror is not None:
        try:
            run.mirror.committed(run.lease.tpm, run.name, run.store)
        except TpmidError as e:
            # The renewal stands; recovery's token sync (tpmid renew, the daemon) or
            # `tpmid pkcs11 sync` brings the token in step.
            log.error("%s: committed version %s, but the PKCS#11 token is not in step: %s "
                      "(`tpmid pkcs11 sync` repairs it)", run.name, stored.version, e)
    log.info("%s: enrolled %s (serial %x, until %s) via %s", run.name,
             render_name(verified.certificate.subject), verified.certificate.serial_number,
             verified.certificate.not_valid_after_utc.isoformat(), run.operation)
    return EnrollResult(
        name=run.name, operation=run.operation, certificate=stored.cert, chain=stored.chain,
        version=stored.version, cert_path=stored.cert_path, chain_path=stored.chain_path,
        fullchain_path=stored.fullchain_path, key_path=stored.key_file,
        requested_subject=render_name(requested),
        subject_rewritten=verified.subject_rewritten, resumed=resumed,
        key_origin=stored.key_origin,
    )
