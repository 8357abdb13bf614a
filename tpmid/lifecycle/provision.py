"""Manufacturing-line provisioning of a device's IDevID: ``tpmid provision``.

:func:`provision` runs on the device under test against its own TPM and does,
for the identity ``idevid`` of the config (``--identity`` picks another):

1. **reading EK** — the endorsement keys, the device fingerprint (SHA-256 of
   the primary EK's public key, :func:`tpmid.tpm.ek.device_fingerprint`) and the
   fingerprints of the EK certificates in NV.
2. **IDevID key** — create the key per ``identities.NAME.key`` (TCG DevID
   template made persistent at ``key.handle``, or ek-derived), or keep the one
   that is already there. A different key at the handle is never replaced.
3. **certificate** — one of three ways:

   * *enroll*: a CSR (subject from the config, the device serial in
     serialNumber and in ``{serial}`` of the CN, optional hardwareModuleName),
     ``simpleenroll`` with the bootstrap credentials, verification and the
     store commit — all of it :func:`tpmid.lifecycle.enroll.enroll_identity`;
   * *already provisioned*: the store holds a certificate and ``force`` is
     off, so nothing is sent to any server;
   * *adopt*: the TPM vendor provisioned the key (at ``key.handle``) and its
     certificate (in NV ``nv_index``); tpmid checks and stores them.

4. **proving the identity** — the certificate certifies exactly the TPM key,
   the TPM signs a fresh challenge that verifies with the certificate's public
   key, the certificate chains to the manufacturer anchor as a device
   certificate (validity, clientAuth EKU) and carries the expected serial.
5. **TPM NV copy** — with ``nv_index`` (and not adopting), the certificate
   DER is written to that NV index so a re-imaged disk can :func:`provision`
   with ``adopt`` to get it back.
6. **manifest** — one :class:`~tpmid.manifest.ProvisionRecord` appended to
   ``manifest_path``, for every outcome including failures.

Failures do not raise: they end in a record with ``outcome="fail"``, the error
class and its exit code, because a station records devices, not exceptions.
Only an unusable manifest (StoreError, before anything is touched) and bugs
raise (the latter after their record is written).

The TPM's IDevID is never destroyed: a key that existed before the run is
left as it is whatever happens. A persistent key *created by this run* is
evicted again when the run fails before a certificate for it was stored; the
TCG templates derive the same key from the endorsement seed every time
(TPM 2.0 Part 1 §26.2), so nothing is lost and the TPM is left as it was found.

The manufacturer anchor is ``est.issuer_anchors`` when configured (recommended
on a production line). Otherwise an enrollment uses the ``/cacerts`` answer
over the authenticated channel (as ``enroll_identity`` does), later runs use
the root stored with the chain at enrollment time, and adoption fetches
``/cacerts``.

"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from tpmid import __version__
from tpmid.certfiles import load_pem_certificates
from tpmid.clock import utcnow
from tpmid.config import Config, IdentityConfig
from tpmid.errors import (
    ConfigError,
    IdentityMismatchError,
    KeyMismatchError,
    StoreError,
    TpmidError,
    VerificationError,
)
from tpmid.est.verify import TrustProfile, verify_chain
from tpmid.lifecycle.enroll import EstClientFactory, enroll_identity
from tpmid.manifest import EkCertificate, ProvisionRecord, append_record, open_manifest
from tpmid.render import name as render_name
from tpmid.render import serial as render_serial
from tpmid.render import sha256_hex
from tpmid.store import Store, StoredIdentity
from tpmid.tpm.connection import already_open
from tpmid.tpm.identity import IdentityKey, identity_key, spki_of
from tpmid.tpm.lease import TpmLease
from tpmid.tpm.specs import check_nv_index

if TYPE_CHECKING:
    from pathlib import Path

    from tpmid.tpm.connection import TpmConnection, TpmOpener

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class ProvisionClients(EstClientFactory, Protocol):
    """The EST client factory (:class:`tpmid.wiring.est.EstClients`), with ``/cacerts``."""

    def fetch_cacerts(self, est: Any) -> Any:
        """``GET /cacerts`` of ``est``'s label with the configured server trust."""
        ...

TOTAL_STEPS = 7
DEFAULT_IDENTITY = "idevid"
EXIT_INTERRUPTED = 130
# X.520 serialNumber is a PrintableString (RFC 5280 Appendix A: ub-serial-number 64).
_SERIAL_RE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]{1,64}")


# RFC 4514 has no short name for serialNumber; spell it out rather than "2.5.4.5=".


def _short(fp: str) -> str:
    return fp[:16] + "…"


# --------------------------------------------------------------------------- run bookkeeping


class _Status:
    """What a step reports on its progress line when it succeeds."""

    def __init__(self) -> None:
        self.text = "ok"


class _Run:
    """The record being built and the progress lines of one provisioning run."""

    def __init__(self, *, identity: str, station: str, serial: str | None, started: datetime,
                 progress: Progress, trust: TrustProfile = "rfc5280") -> None:
        self.progress = progress
        self.trust: TrustProfile = trust  # trust.profile: how the IDevID's chain is judged
        self.started = started
        self.t0 = time.monotonic()
        self.index = 0
        self.fields: dict[str, Any] = {
            "time": started.astimezone(UTC).isoformat(),
            "station": station,
            "tpmid_version": __version__,
            "identity": identity,
            "device_serial": serial,
        }

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[_Status]:
        """One numbered step: ``[i/7] label ... status`` or ``... FAILED``."""
        self.index += 1
        status = _Status()
        try:
            yield status
        except BaseException:
            self.fields.setdefault("failed_step", label)
            self.progress(f"[{self.index}/{TOTAL_STEPS}] {label} ... FAILED")
            raise
        self.progress(f"[{self.index}/{TOTAL_STEPS}] {label} ... {status.text}")

    def set_certificate(self, cert: x509.Certificate) -> None:
        self.fields.update(
            idevid_cert_sha256=sha256_hex(cert.public_bytes(serialization.Encoding.DER)),
            idevid_cert_serial=f"{render_serial(cert.serial_number)}",
            idevid_cert_issuer=render_name(cert.issuer),
            idevid_cert_subject=render_name(cert.subject),
            idevid_cert_not_after=cert.not_valid_after_utc.isoformat(),
        )

    def fail(self, error: BaseException) -> None:
        if isinstance(error, TpmidError):
            code, message, hint, rc = (type(error).__name__, error.message, error.hint,
                                       error.exit_code)
        elif isinstance(error, KeyboardInterrupt):
            code, message, hint, rc = "KeyboardInterrupt", "interrupted", None, EXIT_INTERRUPTED
        else:
            # Only the class: an arbitrary exception's text may hold anything.
            code, message, hint, rc = (type(error).__name__,
                                       f"internal error ({type(error).__name__})",
                                       "this is a bug in tpmid; report it with the traceback", 1)
        self.fields.update(outcome="fail", error_code=code, error=message, hint=hint,
                           exit_code=rc)
        self.fields.setdefault("failed_step", "configuration")

    def record(self) -> ProvisionRecord:
        self.fields["duration_s"] = round(time.monotonic() - self.t0, 3)
        return ProvisionRecord(**self.fields)


# --------------------------------------------------------------------------- public API


def provision(
    config: Config,
    *,
    store: Store,
    tpm: TpmConnection | TpmOpener,
    clients: ProvisionClients,
    serial: str | None = None,
    station_id: str,
    manifest_path: Path | None = None,
    identity: str = DEFAULT_IDENTITY,
    force: bool = False,
    nv_index: int | None = None,
    adopt: bool = False,
    now: Callable[[], datetime] = utcnow,
    progress: Progress = lambda line: None,
) -> ProvisionRecord:
    """Provision the IDevID of the attached TPM; return (and append) its manifest record.

    ``tpm`` is an open connection or a zero-argument callable returning a
    context manager that opens one (so that "TPM not reachable" is recorded
    like every other failure). ``clients`` builds the EST clients (bootstrap
    credentials, server trust). ``serial``
    goes into the subject's serialNumber and replaces ``{serial}`` in its CN
    (default: ``subject.serial_number`` of the config). ``force`` re-enrolls a
    provisioned device. ``nv_index`` is where the certificate is written (or,
    with ``adopt``, read from). ``progress`` receives one short line per step.

    Failures come back as a record with ``outcome == "fail"`` and the error's
    ``exit_code``; see the module docstring. Raises StoreError when the
    manifest cannot be opened (before the device is touched).
    """
    run = _Run(identity=identity, station=station_id, serial=serial, started=now(),
               progress=progress, trust=config.trust.profile)
    fd = open_manifest(manifest_path) if manifest_path is not None else None
    try:
        try:
            _check_request(serial, nv_index, adopt)
            with contextlib.ExitStack() as stack:
                _provision(run, config, store, tpm, clients, stack, force=force,
                           nv_index=nv_index, adopt=adopt, now=now)
        except TpmidError as e:
            log.info("provisioning failed at %s: %s", run.fields.get("failed_step"), e)
            run.fail(e)
        except BaseException as e:
            # Still one record per device, then the bug (or Ctrl-C) goes on up.
            run.fail(e)
            record = run.record()
            _write(run, record, manifest_path, fd)
            fd = None
            raise
        record = run.record()
        _write(run, record, manifest_path, fd)
        fd = None
        return record
    finally:
        if fd is not None:
            os.close(fd)


def record_failure(
    error: TpmidError,
    *,
    station_id: str,
    manifest_path: Path | None,
    identity: str = DEFAULT_IDENTITY,
    serial: str | None = None,
    step: str = "configuration",
    now: Callable[[], datetime] = utcnow,
    progress: Progress = lambda line: None,
) -> ProvisionRecord:
    """Record a run that failed before :func:`provision` could start (e.g. no config file)."""
    run = _Run(identity=identity, station=station_id, serial=serial, started=now(),
               progress=progress)
    run.fields["failed_step"] = step
    run.fail(error)
    record = run.record()
    _write(run, record, manifest_path, None)
    return record


def _write(run: _Run, record: ProvisionRecord, path: Path | None, fd: int | None) -> None:
    run.index = TOTAL_STEPS - 1
    if path is None:
        with run.step("manifest") as st:
            st.text = "not written (no manifest file given)"
        return
    with run.step("manifest") as st:
        append_record(path, record, fd)
        st.text = f"appended to {path}"


def _check_serial(serial: str) -> None:
    if not _SERIAL_RE.fullmatch(serial):
        raise ConfigError(
            f"device serial {serial!r} is not usable in a certificate: 1 to 64 letters, digits, "
            "spaces or ' ( ) + , - . / : = ? (X.520 serialNumber is a PrintableString)"
        )


def _check_request(serial: str | None, nv_index: int | None, adopt: bool) -> None:
    if serial is not None:
        _check_serial(serial)
    if adopt and nv_index is None:
        raise ConfigError("adopting a vendor-provisioned IDevID needs the NV index of its "
                          "certificate",
                          hint="pass --cert-nv with the NV index the vendor wrote the "
                          "certificate to (tpm2_getcap handles-nv-index lists them), or set "
                          "key.cert_nv")
    if nv_index is not None:
        check_nv_index(nv_index)


# --------------------------------------------------------------------------- the steps


def _provision(run: _Run, config: Config, store: Store,
               tpm_source: TpmConnection | TpmOpener, clients: ProvisionClients,
               stack: contextlib.ExitStack, *, force: bool,
               nv_index: int | None, adopt: bool, now: Callable[[], datetime]) -> None:
    ident = config.identity(run.fields["identity"])
    key = identity_key(ident)
    if not key.birth:
        raise ConfigError(
            f"{config.source}: identities.{ident.name}.key: an IDevID lives in the endorsement "
            "hierarchy (TCG DevID §7.3); use kind persistent or ek-derived, not file"
        )
    if adopt and not key.adoptable:
        raise ConfigError(f"{config.source}: identities.{ident.name}.key: adopting needs kind "
                          "persistent (the vendor's key at key.handle)")
    if not adopt and ident.est is None:
        raise ConfigError(f"{config.source}: identity {ident.name!r} has no est section",
                          hint=f"add identities.{ident.name}.est (url, auth) — see "
                          "docs/manufacturing.md")
    facts = key.facts()
    run.fields.update(idevid_kind=facts["kind"], idevid_template=facts["template"],
                      idevid_handle=facts["handle"])
    if nv_index is not None:
        run.fields["nv_index"] = f"{nv_index:#010x}"

    current = store.current(ident.name)
    with run.step("configuration") as st:
        # Pre-flight: what can fail without the TPM or the CA fails before either is
        # touched (a missing secret, an unreadable anchor file).
        if adopt or ident.est is None or (current is not None and not force):
            st.text = "ok  no EST enrollment ahead"
        else:
            headers, basic = clients.credentials(ident.est)
            clients.trust(ident.est, f"identities.{ident.name}.est")
            what = [*(f"header {h}" for h in headers), *(["Basic password"] if basic else [])]
            st.text = (f"ok  credentials resolved ({', '.join(what) or 'none needed'}), "
                       "EST server trust loaded")

    with run.step("reading EK") as st:
        tpm = tpm_source if not callable(tpm_source) else stack.enter_context(tpm_source())
        st.text = _read_ek(run, tpm)

    if adopt:
        _adopt(run, ident, key, tpm, store, clients, current, nv_index, force=force, now=now)
    elif current is not None and not force:
        _check_existing(run, ident, key, tpm, current, nv_index, now=now)
    else:
        _enroll(run, config, ident, key, tpm, store, clients, nv_index, now=now)


def _read_ek(run: _Run, tpm: TpmConnection) -> str:
    # The EKs' certificates say what the device is; no EK needs to be created for it.
    eks = tpm.eks(from_certificates=True)
    primary = tpm.primary_ek()
    certs = tuple(
        EkCertificate(template=ek.template, alg=ek.alg, nv_index=f"{ek.cert_index:#010x}",
                      sha256=ek.cert_fingerprint)
        for ek in eks if ek.cert_index is not None and ek.cert_fingerprint is not None
    )
    run.fields.update(ek_fingerprint=primary.fingerprint, ek_certificates=certs)
    return (f"ok  {primary.alg} EK {_short(primary.fingerprint)}, "
            f"{len(certs)} EK certificate{'s' if len(certs) != 1 else ''}")


def _key_spki(run: _Run, tpm: TpmConnection, key: IdentityKey,
              known: bytes | None = None) -> bytes:
    """SPKI DER of the IDevID (``known`` when creating it already gave it), into the record."""
    spki = known if known is not None else key.public_key_der(tpm)
    run.fields["idevid_key_sha256"] = sha256_hex(spki)
    return spki


def _with_serial(ident: IdentityConfig, serial: str | None) -> tuple[IdentityConfig, str]:
    serial = serial or ident.subject.serial_number
    if not serial:
        raise ConfigError(
            f"no device serial for {ident.name}: pass --serial (or set "
            f"identities.{ident.name}.subject.serial_number)",
            hint="the serial goes into the certificate's serialNumber and the manifest",
        )
    _check_serial(serial)
    subject = replace(ident.subject, serial_number=serial,
                      cn=ident.subject.cn.replace("{serial}", serial))
    return replace(ident, subject=subject), serial


def _enroll(run: _Run, config: Config, ident: IdentityConfig, key: IdentityKey,
            tpm: TpmConnection, store: Store, clients: ProvisionClients, nv_index: int | None,
            *, now: Callable[[], datetime]) -> None:
    ident, serial = _with_serial(ident, run.fields["device_serial"])
    run.fields["device_serial"] = serial
    cfg = replace(config, identities={**config.identities, ident.name: ident})
    with run.step("IDevID key") as st:
        try:
            # Never force: a different key at the handle is reported, not replaced.
            ensured = key.ensure(tpm)
        except KeyMismatchError as e:
            e.hint = ("tpmid provision never replaces a key it did not create: if the TPM "
                      "vendor provisioned it, use --adopt with --cert-nv and the NV index of "
                      "its certificate; if it is really unwanted, delete it deliberately "
                      f"(tpmid key delete {ident.name})")
            raise
        run.fields["idevid_key_action"] = ensured.action
        spki = _key_spki(run, tpm, key, ensured.public_der)
        st.text = f"{ensured.status}, public key {_short(sha256_hex(spki))}"
        if key.has_iak:
            # TCG DevID §6: the IAK is created with the IDevID (docs/attestation.md).
            st.text += f"; {key.ensure_iak(tpm)}"
    committed = False
    try:
        assert ident.est is not None
        with run.step("enrolling over EST") as st:
            hw = tpm.hardware_module_name() if ident.san.hardware_module_name else None
            # The station owns the TPM for the whole run: lend it as it is.
            result = enroll_identity(cfg, ident.name, store=store,
                                     lease=TpmLease(already_open(tpm)), clients=clients,
                                     now=now, hw_module=hw)
            committed = True
            run.set_certificate(result.certificate)
            st.text = (f"ok  {ident.est.url}: serial {render_serial(result.certificate.serial_number)}, "
                       f"issuer {render_name(result.certificate.issuer)}")
        stored = store.current(ident.name)
        if stored is None:  # enroll_identity just committed it
            raise StoreError(f"{ident.name}: the certificate just stored cannot be read back")
        with run.step("proving the identity") as st:
            st.text, _ = _prove(tpm, ident, key, stored.cert, stored.chain, serial, now=now,
                                trust=run.trust)
        _nv_copy(run, tpm, stored.cert, spki, nv_index)
    except BaseException:
        if ensured.created and not committed:
            # This run made the key and no certificate names it: put the TPM back
            # as it was. The template re-derives the same key next time.
            try:
                key.remove(tpm)
                run.fields["idevid_key_action"] = "removed-after-failure"
            except TpmidError as e:
                log.warning("could not remove the IDevID this run created (%s): %s",
                            key.describe(), e)
                run.fields["idevid_key_action"] = "created-not-removed"
        raise
    run.fields["outcome"] = "provisioned"


def _check_existing(run: _Run, ident: IdentityConfig, key: IdentityKey, tpm: TpmConnection,
                    current: StoredIdentity, nv_index: int | None, *,
                    now: Callable[[], datetime]) -> None:
    run.fields["device_serial"] = run.fields["device_serial"] or _cert_serial(current.cert)
    with run.step("IDevID key") as st:
        if not key.present(tpm):
            run.set_certificate(current.cert)
            missing = (f"no key at {key.handle:#010x}" if key.handle is not None
                       else f"no {key.describe()} key")
            raise IdentityMismatchError(
                f"the store holds an IDevID certificate for {ident.name} (serial "
                f"{render_serial(current.cert.serial_number)}) but the TPM has {missing} "
                "(was the TPM cleared, or is this disk from another device?)",
                hint="nothing was changed; `tpmid provision --force` creates the key again "
                "and enrolls a new certificate",
            )
        run.fields["idevid_key_action"] = key.reuse_action
        spki = _key_spki(run, tpm, key)
        st.text = f"found {key.describe()}, public key {_short(sha256_hex(spki))}"
    with run.step("stored certificate") as st:
        run.set_certificate(current.cert)
        st.text = (f"found version {current.version} (serial {render_serial(current.cert.serial_number)}); "
                   "already provisioned, no EST request")
    with run.step("proving the identity") as st:
        st.text, _ = _prove(tpm, ident, key, current.cert, current.chain,
                            run.fields["device_serial"], now=now, trust=run.trust)
    _nv_copy(run, tpm, current.cert, spki, nv_index)
    run.fields["outcome"] = "already-provisioned"


def _adopt(run: _Run, ident: IdentityConfig, key: IdentityKey, tpm: TpmConnection,
           store: Store, clients: ProvisionClients, current: StoredIdentity | None,
           nv_index: int | None, *, force: bool, now: Callable[[], datetime]) -> None:
    assert nv_index is not None
    with run.step("IDevID key") as st:
        # The vendor's key must be the configured template, or every later use of
        # this identity would refuse it: opening it checks that.
        spki = key.public_key_der(tpm)
        run.fields.update(idevid_key_action="adopted", idevid_key_sha256=sha256_hex(spki))
        st.text = f"found {key.describe()}, public key {_short(sha256_hex(spki))}"
    with run.step("certificate from NV") as st:
        cert = tpm.read_certificate_nv(nv_index)
        run.set_certificate(cert)
        run.fields["device_serial"] = run.fields["device_serial"] or _cert_serial(cert)
        st.text = (f"ok  {nv_index:#010x}: serial {render_serial(cert.serial_number)}, subject "
                   f"{render_name(cert.subject)}")
    with run.step("proving the identity") as st:
        anchors = _adoption_anchors(ident, clients)
        st.text, chain = _prove(tpm, ident, key, cert, (), run.fields["device_serial"], now=now,
                                anchors=anchors, trust=run.trust)
    with run.step("storing the certificate") as st:
        if current is not None and current.cert == cert:
            run.fields["outcome"] = "already-provisioned"
            st.text = f"the store already holds it (version {current.version})"
            return
        if current is not None and not force:
            raise IdentityMismatchError(
                f"the store holds another IDevID certificate for {ident.name} (serial "
                f"{render_serial(current.cert.serial_number)}) than NV {nv_index:#010x} (serial "
                f"{render_serial(cert.serial_number)})",
                hint="nothing was changed; --force replaces the stored certificate with the "
                "one from NV",
            )
        with store.identity_lock(ident.name):
            stored = store.commit(ident.name, cert, chain, None)
        run.fields["outcome"] = "adopted"
        st.text = f"stored as version {stored.version}"


# --------------------------------------------------------------------------- proof


def _cert_serial(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return str(attrs[0].value) if attrs else None


def _manufacturer_anchors(ident: IdentityConfig, chain: tuple[x509.Certificate, ...]
                          ) -> tuple[list[x509.Certificate], str]:
    if ident.est is not None and ident.est.issuer_anchors:
        return (load_pem_certificates(ident.est.issuer_anchors, "issuer anchor file"),
                "est.issuer_anchors")
    roots = [c for c in chain if c.issuer == c.subject]
    if not roots:
        raise VerificationError(
            f"no manufacturer anchor to verify {ident.name}'s certificate against: "
            "est.issuer_anchors is not set and the stored chain has no root",
            hint=f"set identities.{ident.name}.est.issuer_anchors to the manufacturer CA",
        )
    return roots[-1:], "the root stored at enrollment"


def _adoption_anchors(ident: IdentityConfig, clients: ProvisionClients
                      ) -> tuple[list[x509.Certificate], str]:
    est = ident.est
    if est is not None and est.issuer_anchors:
        return (load_pem_certificates(est.issuer_anchors, "issuer anchor file"),
                "est.issuer_anchors")
    if est is None:
        raise ConfigError(
            f"identities.{ident.name}: adopting needs the manufacturer CA to "
            "check the vendor's certificate against",
            hint=f"set identities.{ident.name}.est.issuer_anchors (or est.url to fetch "
            "/cacerts)",
        )
    # RFC 7030 §4.1: the label's CA certificates, from an authenticated server.
    result = clients.fetch_cacerts(est)
    return list(result.certificates), f"/cacerts of {result.url}"


def _verify_tpm_signature(cert: x509.Certificate, signature: bytes, digest: bytes,
                          hash_name: str) -> None:
    algorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(),
                 "sha512": hashes.SHA512()}[hash_name]
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, digest, ec.ECDSA(Prehashed(algorithm)))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, digest, padding.PKCS1v15(), Prehashed(algorithm))
        else:
            raise VerificationError(f"unsupported certificate key type {type(public).__name__}")
    except InvalidSignature as e:
        raise IdentityMismatchError(
            "the TPM's signature does not verify with the certificate's public key",
            hint="the TPM key and the certificate do not belong together; nothing was changed",
        ) from e


def _prove(tpm: TpmConnection, ident: IdentityConfig, ikey: IdentityKey, cert: x509.Certificate,
           chain: tuple[x509.Certificate, ...], serial: str | None, *,
           now: Callable[[], datetime],
           anchors: tuple[list[x509.Certificate], str] | None = None,
           trust: TrustProfile = "rfc5280",
           ) -> tuple[str, tuple[x509.Certificate, ...]]:
    """Check that ``cert`` is this device's valid IDevID.

    Key first (the most dangerous mismatch), then a TPM signature, the chain to
    the manufacturer anchor, the serial. Returns the progress text and the
    validated chain above ``cert``.
    """
    with ikey.open(tpm) as key:
        spki = key.public_key_der()
        if spki != spki_of(cert):
            raise IdentityMismatchError(
                f"the IDevID certificate (serial {render_serial(cert.serial_number)}, public key "
                f"{_short(sha256_hex(spki_of(cert)))}) does not certify the TPM's {ikey.describe()} "
                f"(public key {_short(sha256_hex(spki))})",
                hint="nothing was changed; find out why (another device's disk? a replaced key?) "
                "before `tpmid provision --force` enrolls a new certificate for the TPM key",
            )
        # A fresh challenge signed inside the TPM: the key is usable, not just present.
        digest = hashlib.new(key.hash_name, b"tpmid provision proof\0" + os.urandom(32)).digest()
        signature = key.sign_digest(digest)
        hash_name = key.hash_name
    _verify_tpm_signature(cert, signature, digest, hash_name)
    issuers, where = anchors if anchors is not None else _manufacturer_anchors(ident, chain)
    # Validity at now(), signatures up to the anchor, device profile (clientAuth EKU).
    verified = verify_chain(cert, issuers=issuers, intermediates=chain, profile="device",
                            now=now(), trust=trust)
    if serial is not None:
        found = _cert_serial(cert)
        if found != serial:
            raise IdentityMismatchError(
                f"this device's IDevID certificate carries serial {found!r}, not {serial!r}",
                hint="check the label / scan; nothing was changed (--force enrolls a new "
                "certificate with the given serial)",
            )
    return (f"ok  key match, TPM signature, chain to {where}, valid until "
            f"{cert.not_valid_after_utc:%Y-%m-%d}"), verified


def _nv_copy(run: _Run, tpm: TpmConnection, cert: x509.Certificate, spki: bytes,
             nv_index: int | None) -> None:
    with run.step("TPM NV copy") as st:
        if nv_index is None:
            st.text = "skipped (no --write-nv)"
            return
        der = cert.public_bytes(serialization.Encoding.DER)
        changed = tpm.write_certificate_nv(nv_index, der, same_key_spki=spki)
        st.text = (f"wrote {len(der)} bytes to {nv_index:#010x}" if changed
                   else f"{nv_index:#010x} already holds this certificate")


__all__ = [
    "DEFAULT_IDENTITY",
    "ProvisionClients",
    "ProvisionRecord",
    "provision",
    "record_failure",
]
