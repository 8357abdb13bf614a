"""``tpmid check``: is this device able to keep its identities? (in the spirit of ``iotedge check``)

:func:`run_checks` returns one :class:`CheckResult` per check, in a fixed order:

1. **config file** — not writable by group or others (``check_private_path``), and
   every ``{file: ...}`` secret is a 0600 file;
2. **store permissions** — the store directory, its subdirectories, every key
   directory and key file are not writable by group or others;
3. **clock** — not before tpmid's release (:data:`~tpmid.policy.RELEASE_DATE`)
   and not more than :data:`~tpmid.policy.CLOCK_SKEW` before any stored
   certificate's notBefore (a device without RTC that has no NTP time yet);
4. **TPM** — reachable through the configured TCTI, and not in dictionary-attack
   lockout (IDevID keys are DA-protected: in lockout they cannot sign);
5. per identity:
   **key** — present with the expected attributes: a persistent IDevID at its
   handle made from the configured TCG template, an ek-derived one re-created,
   a key file that loads; never ``decrypt`` (TCG DevID §7.3.4.1: identity keys
   only sign);
   **certificate valid now** (RFC 5280 §4.1.2.5);
   **certificate chain** — validates against ``est.issuer_anchors`` or, without
   them, the chain stored with it (:func:`tpmid.est.verify.verify_chain`);
   **certificate matches key** — the TPM key's public key is the certificate's;
   **EST server** — ``GET /cacerts`` (RFC 7030 §4.1) succeeds with the configured
   trust (no client authentication), so the server is reachable and its TLS
   certificate trusted;
6. per ``{sealed: NAME}`` secret of the config: **sealed secret** — stored, and
   openable by this TPM now (same sealing key, PCRs unchanged), checked without
   unsealing it.

Checks that depend on a failed one (the key checks when the TPM is unreachable)
are reported as skipped, which counts as not passed. Every TPM object loaded is
flushed before the next one is loaded; nothing stays in the TPM.

The TPM opener, the clock and the ``/cacerts`` fetcher are injected (STYLE.md §3).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpmid.certfiles import load_pem_certificates, spki_der, spki_sha256
from tpmid.clock import as_utc
from tpmid.config import Config, IdentityConfig
from tpmid.errors import (
    ConfigError,
    EstTransportError,
    KeyUnavailableError,
    StoreError,
    TpmidError,
    VerificationError,
)
from tpmid.est.verify import check_validity as verify_validity
from tpmid.est.verify import verify_chain
from tpmid.policy import CLOCK_SKEW, RELEASE_DATE
from tpmid.render import iso
from tpmid.render import name as render_name
from tpmid.render import serial as render_serial
from tpmid.secrets import check_private_file
from tpmid.store import Store, StoredIdentity, check_private_path
from tpmid.store.sealed import SealedSecrets
from tpmid.tpm.identity import identity_key

if TYPE_CHECKING:
    from tpmid.tpm.connection import TpmConnection, TpmOpener

log = logging.getLogger(__name__)

# GET /cacerts with the given server trust (tpmid.wiring.est.fetch_cacerts).
CacertsFetcher = Callable[..., Any]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``detail`` says what was found, ``hint`` what to do."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "ok": self.ok, "skipped": self.skipped,
                "detail": self.detail, "hint": self.hint}


def _ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail)


def _fail(name: str, detail: str, hint: str | None = None) -> CheckResult:
    return CheckResult(name, False, detail, hint)


def _from_error(name: str, e: TpmidError, prefix: str = "") -> CheckResult:
    return CheckResult(name, False, prefix + e.message, e.hint)


def _skip(name: str, why: str) -> CheckResult:
    return CheckResult(name, False, f"not checked: {why}", skipped=True)


# --------------------------------------------------------------------------- files


def check_config_file(config: Config, config_path: Path | None) -> CheckResult:
    """The config file (and secret files) cannot be changed or read by other users."""
    name = "config file permissions"
    checked: list[str] = []
    try:
        if config_path is not None:
            check_private_path(config_path, "config file", error=ConfigError)
            checked.append(f"{config_path} is not writable by group or others")
        for where, ref in config.secret_refs():
            if ref.file is not None:
                check_private_file(ref.file, f"secret file ({where})")
                checked.append(f"secret file {ref.file} is private")
    except TpmidError as e:
        return _from_error(name, e)
    return _ok(name, "; ".join(checked) or "no config file given")


def _store_paths(root: Path) -> list[Path]:
    paths = [root] + [root / sub for sub in ("certs", "keys", "journal", "state", "locks")]
    keys = root / "keys"
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(keys), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            p = Path(entry.path)
            paths.append(p)
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    paths += sorted(Path(f.path) for f in os.scandir(p)
                                    if f.is_file(follow_symlinks=False))
    return [p for p in paths if os.path.lexists(p)]


def _provision_hint(ident: IdentityConfig) -> str:
    serial = "" if ident.subject.serial_number else " with the device's serial number (--serial)"
    return (f"provision the device: tpmid provision{serial} (at the factory, see "
            "docs/manufacturing.md)")


def _first_step(config: Config) -> str:
    """What a device with nothing in its store does first: provision, or enroll."""
    for ident in config.identities.values():
        if identity_key(ident).birth:
            return _provision_hint(ident)
    for ident in config.identities.values():
        if ident.est is not None:
            return f"enroll it: tpmid enroll {ident.name} (the daemon does it at start-up)"
    return "add an identity with an est section to the config (docs/config.md)"


def _enroll_hint(config: Config, ident: IdentityConfig,
                 stored: Mapping[str, StoredIdentity | None]) -> str:
    """How to get a certificate for ``ident``: provision its bootstrap identity first if needed."""
    boot = ident.est.auth.client if ident.est is not None else None
    if boot is not None and boot in config.identities and stored.get(boot) is None:
        first = config.identity(boot)
        if identity_key(first).birth:
            return f"{_provision_hint(first)}; then: tpmid enroll {ident.name}"
        return f"enroll {boot} first: tpmid enroll {boot}; then: tpmid enroll {ident.name}"
    if identity_key(ident).birth:
        return _provision_hint(ident)
    return f"enroll it: tpmid enroll {ident.name}"


def check_store_permissions(config: Config) -> CheckResult:
    """The store and every key directory / key file are safe from other users."""
    name = "store permissions"
    root = Path(config.store.dir)
    if not root.is_dir():
        return _fail(name, f"store directory {root} does not exist (nothing enrolled yet)",
                     _first_step(config))
    problems: list[StoreError] = []
    paths = _store_paths(root)
    for p in paths:
        try:
            check_private_path(p, "key file" if p.is_file() else "store directory")
        except StoreError as e:
            problems.append(e)
    if problems:
        hints = "; ".join(dict.fromkeys(e.hint for e in problems if e.hint))
        return _fail(name, "; ".join(e.message for e in problems), hints or None)
    return _ok(name, f"{root} and its {len(paths) - 1} directories and key files are not "
                     "writable by group or others")


# --------------------------------------------------------------------------- clock


def check_clock(now: datetime, certs: Sequence[StoredIdentity]) -> CheckResult:
    """The clock is plausible: after tpmid's release and not before any certificate's notBefore."""
    name = "clock plausible"
    now = as_utc(now)
    hint = ("set the time: enable NTP (timedatectl set-ntp true) or check the RTC; tpmid "
            "renews nothing while the clock is implausible")
    if now < RELEASE_DATE:
        return _fail(name, f"the clock says {iso(now)}, before tpmid's release "
                           f"({iso(RELEASE_DATE)})", hint)
    early = [c for c in certs if now < c.not_before - CLOCK_SKEW]
    if early:
        c = max(early, key=lambda c: c.not_before)
        return _fail(name, f"the clock says {iso(now)}, more than {CLOCK_SKEW.seconds // 60} min "
                           f"before the notBefore of {c.name}'s certificate ({iso(c.not_before)})",
                     hint)
    return _ok(name, f"{iso(now)}: after tpmid's release and not before any stored "
                     f"certificate's notBefore ({len(certs)} checked)")


# --------------------------------------------------------------------------- TPM


def check_tpm(tpm: TpmConnection) -> list[CheckResult]:
    """The TPM answers and is not in dictionary-attack lockout."""
    try:
        info = tpm.info()
    except TpmidError as e:
        return [_from_error("TPM reachable", e)]
    vendor = " ".join(f"{info['manufacturer']} {info['vendor_string']}".split())
    out = [_ok("TPM reachable",
               f"{info['tcti']}: {vendor}, firmware {info['firmware_version']}")]
    lock = info["lockout"]
    if lock["in_lockout"]:
        out.append(_fail(
            "TPM not in lockout",
            f"the TPM is in dictionary-attack lockout ({lock['counter']}/{lock['max_tries']} "
            "failed authorizations): the IDevID cannot sign",
            f"wait up to {lock['interval_s']} s for the TPM to forgive one failure, or clear it "
            "with the lockout password (tpm2_dictionarylockout --clear-lockout)"))
    else:
        out.append(_ok("TPM not in lockout",
                       f"{lock['counter']}/{lock['max_tries']} failed authorizations"))
    out.append(check_transients(tpm))
    return out


def check_transients(tpm: TpmConnection) -> CheckResult:
    """Objects killed tpmid processes left in the TPM's slots are flushed (only those)."""
    try:
        stale = tpm.flush_stale_transients(survey=True)
    except TpmidError as e:
        return _from_error("TPM object slots", e)
    return _ok("TPM object slots", stale.describe())


def _key_checks(tpm: TpmConnection, ident: IdentityConfig,
                stored: StoredIdentity | None) -> tuple[CheckResult, CheckResult]:
    """(key present, certificate matches key) for one identity; flushes what it loads."""
    n = ident.name
    key_name, match_name = f"{n}: key", f"{n}: certificate matches key"
    ikey = identity_key(ident)
    try:
        key, detail = ikey.inspect(tpm, stored.key_file if stored is not None else None)
    except KeyUnavailableError as e:
        if ikey.birth and stored is None:
            # No key and no certificate: never provisioned (not a cleared TPM).
            return (CheckResult(key_name, False, f"{ikey.describe()}: no key and no "
                                "certificate: the device has not been provisioned",
                                _provision_hint(ident)),
                    _skip(match_name, "the key is not usable"))
        hint: str | None
        if ikey.birth:
            hint = ("the daemon (at start-up) and `tpmid renew` of the identities it "
                    "authenticates persist it again from its template; by hand: tpmid key "
                    f"create {n}")
        else:
            hint = (f"the daemon renews it with a new key at once; by hand: tpmid renew {n}"
                    if ident.est is not None else e.hint)
        return (CheckResult(key_name, False, e.message, hint),
                _skip(match_name, "the key is not usable"))
    except TpmidError as e:
        return (CheckResult(key_name, False, e.message, e.hint),
                _skip(match_name, "the key is not usable"))
    try:
        if stored is None:
            return _ok(key_name, detail), _skip(match_name, "no certificate stored")
        cert_fp = spki_sha256(stored.cert.public_key())
        if key.public_key_der() == spki_der(stored.cert.public_key()):
            return _ok(key_name, detail), _ok(
                match_name, f"the TPM key is the certificate's (public key SHA-256 "
                            f"{cert_fp[:16]}…)")
        tpm_fp = hashlib.sha256(key.public_key_der()).hexdigest()[:16]
        return _ok(key_name, detail), _fail(
            match_name,
            f"the stored certificate (serial {render_serial(stored.cert.serial_number)}) certifies another "
            f"key: certificate public key SHA-256 {cert_fp[:16]}…, TPM key {tpm_fp}…",
            f"the certificate cannot be used with this key; re-enroll: tpmid reset {n} --yes "
            f"&& tpmid enroll {n}" if _reenrollable(ident) else
            "do not use this certificate; re-provision the device (tpmid provision --force) or "
            "restore the IDevID certificate that belongs to this TPM")
    except TpmidError as e:
        return _from_error(key_name, e), _skip(match_name, "the key is not usable")
    finally:
        key.close()


def _reenrollable(ident: IdentityConfig) -> bool:
    """tpmid can enroll this identity again by itself (an EST section and a renewable key)."""
    return ident.est is not None and identity_key(ident).renewable


# --------------------------------------------------------------------------- certificates


def check_validity(ident: IdentityConfig, stored: StoredIdentity, now: datetime) -> CheckResult:
    """The certificate is valid at ``now``."""
    name = f"{ident.name}: certificate valid now"
    try:
        verify_validity(stored.cert, as_utc(now))
    except VerificationError as e:
        hint = "check the clock (NTP)"
        if as_utc(now) > stored.not_after:
            hint = (f"the daemon renews it (systemctl status tpmid); by hand: tpmid enroll "
                    f"{ident.name}" if _reenrollable(ident) else
                    "this certificate is not renewed by tpmid; re-provision the device")
        message = e.message.replace("the issued certificate", "the certificate")
        return _fail(name, message, hint)
    left = stored.not_after - as_utc(now)
    return _ok(name, f"valid until {iso(stored.not_after)} ({left.days} d left)")


def check_chain(config: Config, ident: IdentityConfig, stored: StoredIdentity,
                now: datetime) -> CheckResult:
    """The certificate chains to ``est.issuer_anchors`` or, without them, to its stored chain."""
    name = f"{ident.name}: certificate chain"
    try:
        if ident.est is not None and ident.est.issuer_anchors:
            anchors = load_pem_certificates(ident.est.issuer_anchors, "issuer anchor file")
            what = "est.issuer_anchors"
        else:
            anchors = list(stored.chain)
            what = f"the stored chain ({stored.chain_path})"
        if not anchors:
            return _fail(name, f"no anchors: {stored.chain_path} is empty and the identity has "
                               "no est.issuer_anchors",
                         f"set identities.{ident.name}.est.issuer_anchors to the issuing CA")
        # Validity is its own check: judge the chain at a time the certificate is valid,
        # so an expired certificate is one failure, not two.
        at = min(max(as_utc(now), stored.not_before), stored.not_after)
        chain = verify_chain(stored.cert, issuers=anchors, intermediates=stored.chain,
                             profile="ca" if ident.profile == "ca" else "device", now=at)
    except TpmidError as e:
        return _from_error(name, e)
    top = render_name(chain[-1].subject) if chain else "?"
    return _ok(name, f"chains to '{top}' from {what}")


# --------------------------------------------------------------------------- EST


def check_est(config: Config, ident: IdentityConfig, fetch: CacertsFetcher,
              cache: dict[tuple[Any, ...], CheckResult]) -> CheckResult:
    """``GET /cacerts`` at the identity's label with the configured server trust."""
    est = ident.est
    assert est is not None
    name = f"{ident.name}: EST server"
    trusted = tuple(est.trust_anchors or config.trust.est_anchors)
    key = (est.url, trusted, est.pin, config.trust.use_system_store, est.allow_http)
    cached = cache.get(key)
    if cached is not None:
        return CheckResult(name, cached.ok, cached.detail, cached.hint, cached.skipped)
    try:
        result = fetch(est.url, trusted_certs=trusted, pin=est.pin,
                       use_system_store=config.trust.use_system_store,
                       allow_http=est.allow_http,
                       timeout=(est.connect_timeout, est.read_timeout))
    except TpmidError as e:
        hint = e.hint
        if "certificate verify failed" in e.message:
            hint = ("the server's TLS certificate does not chain to the configured trust "
                    "(est.trust_anchors / trust.est_anchors); install the CA that issued it")
        elif hint is None and isinstance(e, EstTransportError):
            hint = (f"check identities.{ident.name}.est.url and that the EST server is up and "
                    "reachable from this device (DNS, routing, firewall)")
        res = _from_error(name, e)
        res = CheckResult(name, False, res.detail, hint)
    else:
        res = _ok(name, f"{result.url}/cacerts: {len(result.certificates)} CA certificate(s), "
                        f"server authenticated by {result.server_auth}")
    cache[key] = res
    return res


# --------------------------------------------------------------------------- all checks


def _load(store: Store | None, name: str) -> tuple[StoredIdentity | None, TpmidError | None]:
    if store is None:
        return None, None
    try:
        return store.current(name), None
    except StoreError as e:
        return None, e


def run_checks(
    config: Config,
    *,
    open_store: Callable[[], Store | None],
    open_tpm: TpmOpener,
    now: datetime,
    config_path: Path | None = None,
    fetch_cacerts: CacertsFetcher | None = None,
) -> list[CheckResult]:
    """Run every check (see the module docstring); never raises for a failed check.

    ``open_store`` gives the store (None if it does not exist yet; StoreError if
    it is unsafe, which is reported); ``open_tpm`` opens the TPM once for all key
    checks; ``fetch_cacerts`` (:func:`tpmid.wiring.est.fetch_cacerts`) is used
    for the EST server checks, which are skipped without it (no network).
    """
    results: list[CheckResult] = [check_config_file(config, config_path),
                                  check_store_permissions(config)]
    stored = _Stored.load(config, open_store)
    results.append(check_clock(now, [c for c in stored.current.values() if c is not None]))
    key_results = _tpm_checks(config, open_tpm, stored, results)
    for ident in config.identities.values():
        results += _identity_checks(config, ident, stored, key_results.get(ident.name), now)
    if fetch_cacerts is not None:
        cache: dict[tuple[Any, ...], CheckResult] = {}
        for ident in config.identities.values():
            if ident.est is not None:
                results.append(check_est(config, ident, fetch_cacerts, cache))
    for r in results:
        log.debug("check %s: %s %s", r.name, "ok" if r.ok else "FAIL", r.detail)
    return results


@dataclass
class _Stored:
    """What the store holds for each identity, and why it could not be read."""

    current: dict[str, StoredIdentity | None]
    errors: dict[str, TpmidError]

    @classmethod
    def load(cls, config: Config, open_store: Callable[[], Store | None]) -> _Stored:
        store: Store | None = None
        store_error: TpmidError | None = None
        try:
            store = open_store()
        except TpmidError as e:
            store_error = e
        current: dict[str, StoredIdentity | None] = {}
        errors: dict[str, TpmidError] = {}
        for name in config.identities:
            cur, err = _load(store, name)
            current[name] = cur
            if err is not None or store_error is not None:
                errors[name] = err if err is not None else store_error  # type: ignore[assignment]
        return cls(current, errors)


def _tpm_checks(config: Config, open_tpm: TpmOpener, stored: _Stored,
                results: list[CheckResult]) -> dict[str, tuple[CheckResult, CheckResult]]:
    """The TPM checks (appended to ``results``) and each identity's two key checks.

    All TPM work happens in one connection, one object at a time.
    """
    key_results: dict[str, tuple[CheckResult, CheckResult]] = {}
    sealed_results: list[CheckResult] = []
    tpm_ok = False
    try:
        with open_tpm() as tpm:
            tpm_results = check_tpm(tpm)
            results += tpm_results
            tpm_ok = tpm_results[0].ok
            if tpm_ok:
                for ident in config.identities.values():
                    n = ident.name
                    unreadable = stored.errors.get(n)
                    if identity_key(ident).renewable and unreadable is not None:
                        # The key file is in the store; saying "not enrolled" would mislead.
                        why = f"the store is not usable ({unreadable.message})"
                        key_results[n] = (_skip(f"{n}: key", why),
                                          _skip(f"{n}: certificate matches key", why))
                    else:
                        key_results[n] = _key_checks(tpm, ident, stored.current[n])
                sealed_results = check_sealed_secrets(config, tpm)
    except TpmidError as e:
        if not tpm_ok:
            results.append(_from_error("TPM reachable", e))
        else:  # the TPM went away during the checks (or on close)
            results.append(_from_error("TPM still reachable", e))
    results += sealed_results
    return key_results


def check_sealed_secrets(config: Config, tpm: TpmConnection) -> list[CheckResult]:
    """One check per sealed secret the config uses: stored, and this TPM would open it now."""
    secrets = SealedSecrets(Path(config.store.dir))
    results = []
    for name in sorted({ref.sealed for _, ref in config.secret_refs() if ref.sealed}):
        check = f"sealed secret {name}"
        try:
            blob = secrets.load(name)
            tpm.check_sealed_secret(blob)
        except TpmidError as e:
            results.append(_from_error(check, e))
            continue
        results.append(_ok(check, f"stored and openable by this TPM (bound to {blob.bound()})"))
    return results


def _identity_checks(config: Config, ident: IdentityConfig, stored: _Stored,
                     key_results: tuple[CheckResult, CheckResult] | None,
                     now: datetime) -> list[CheckResult]:
    """Key, certificate validity, chain and key match of one identity."""
    n = ident.name
    if key_results is None:
        key_results = (_skip(f"{n}: key", "the TPM is not reachable"),
                       _skip(f"{n}: certificate matches key", "the TPM is not reachable"))
    key_res, match_res = key_results
    cur = stored.current[n]
    if cur is not None:
        return [key_res, check_validity(ident, cur, now), check_chain(config, ident, cur, now),
                match_res]
    err = stored.errors.get(n)
    if err is not None:
        return [key_res, _from_error(f"{n}: certificate", err)]
    if ident.est is not None:
        return [key_res, _fail(f"{n}: certificate",
                               f"no certificate in the store ({config.store.dir})",
                               _enroll_hint(config, ident, stored.current))]
    return [key_res, _fail(
        f"{n}: certificate", f"no certificate in the store ({config.store.dir}) and no est "
        "section to enroll it",
        "provision the device (tpmid provision) or remove the identity from the config")]


def all_passed(results: Sequence[CheckResult]) -> bool:
    """True when every check passed (a skipped check did not)."""
    return all(r.ok for r in results)
