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
   certificate trusted.

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
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpmid.config import Config, IdentityConfig, SecretRef
from tpmid.errors import (
    ConfigError,
    EstTransportError,
    StoreError,
    TpmidError,
    VerificationError,
)
from tpmid.lifecycle.status import iso, open_store, spki_sha256
from tpmid.policy import CLOCK_SKEW, RELEASE_DATE

if TYPE_CHECKING:
    from tpmid.lifecycle.enroll import FetchResult
    from tpmid.store import Store, StoredIdentity
    from tpmid.tpm.connection import TpmConnection
    from tpmid.tpm.keys import LoadedKey

log = logging.getLogger(__name__)

TpmOpener = Callable[[], AbstractContextManager["TpmConnection"]]
CacertsFetcher = Callable[..., "FetchResult"]


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


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


# --------------------------------------------------------------------------- files


def _secret_refs(config: Config) -> list[tuple[str, SecretRef]]:
    refs: list[tuple[str, SecretRef | None]] = [
        (f"tpm.auth.{h}", getattr(config.tpm.auth, h)) for h in ("owner", "endorsement", "lockout")
    ]
    for ident in config.identities.values():
        if ident.est is None:
            continue
        where = f"identities.{ident.name}.est.auth"
        if ident.est.auth.basic is not None:
            refs.append((f"{where}.basic.password", ident.est.auth.basic.password))
        refs += [(f"{where}.headers.{h}", ref) for h, ref in ident.est.auth.headers]
    return [(w, r) for w, r in refs if r is not None]


def check_config_file(config: Config, config_path: Path | None) -> CheckResult:
    """The config file (and secret files) cannot be changed or read by other users."""
    from tpmid.secrets import check_private_file
    from tpmid.store import check_private_path

    name = "config file permissions"
    checked: list[str] = []
    try:
        if config_path is not None:
            check_private_path(config_path, "config file", error=ConfigError)
            checked.append(f"{config_path} is not writable by group or others")
        for where, ref in _secret_refs(config):
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


def check_store_permissions(config: Config) -> CheckResult:
    """The store and every key directory / key file are safe from other users."""
    from tpmid.store import check_private_path

    name = "store permissions"
    root = Path(config.store.dir)
    if not root.is_dir():
        return _fail(name, f"store directory {root} does not exist (nothing enrolled yet)",
                     "enroll the device: tpmid enroll NAME (the daemon does it at start-up)")
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
    now = _utc(now)
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
    from tpmid.tpm.info import tpm_info

    try:
        info = tpm_info(tpm)
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
    return out


def _open_key(tpm: TpmConnection, ident: IdentityConfig,
              stored: StoredIdentity | None) -> tuple[LoadedKey, str]:
    """Open ``ident``'s key and describe it; KeyMismatchError/TpmError/StoreError if unusable."""
    from tpm2_pytss.constants import TPMA_OBJECT

    from tpmid.errors import KeyMismatchError
    from tpmid.tpm.keys import (
        derive_idevid,
        describe_public,
        identify_template,
        load_identity_key,
        open_persistent,
    )

    kind = ident.key.kind
    if kind == "persistent":
        # Opened without expect_template so that the message can say what is there.
        key = open_persistent(tpm, ident.key.handle)
    elif kind == "ek-derived":
        key = derive_idevid(tpm, ident.key.template)
    else:
        if stored is None or stored.key_file is None:
            raise StoreError(f"{ident.name} has no key file in the store (not enrolled)",
                             hint=f"enroll it: tpmid enroll {ident.name}")
        try:
            pem = stored.key_file.read_bytes()
        except OSError as e:
            raise StoreError(f"cannot read the key file {stored.key_file}: {e.strerror}") from e
        key = load_identity_key(tpm, ident.key, pem)
    try:
        attrs = key.public.publicArea.objectAttributes
        # TCG DevID v1.00 §7.3.4.1 Table 3: identity keys sign and never decrypt.
        if attrs & TPMA_OBJECT.DECRYPT:
            raise KeyMismatchError(f"{key.description} is {describe_public(key.public)}: it has "
                                   "the decrypt attribute, which an identity key must not have",
                                   hint=f"recreate the key: tpmid key create {ident.name} --force "
                                   "and enroll again")
        if kind in ("persistent", "ek-derived"):
            found = identify_template(key.public)
            if found != ident.key.template:
                raise KeyMismatchError(
                    f"{key.description} is {describe_public(key.public)}, not an IDevID from "
                    f"template {ident.key.template}",
                    hint="fix key.template in the config, or re-provision the device")
            return key, f"{ident.key.describe()}: {describe_public(key.public)}, sign only"
        where = f" ({stored.key_file})" if stored is not None and stored.key_file else ""
        return key, f"key file{where} loads: {describe_public(key.public)}, sign only"
    except BaseException:
        key.close()
        raise


def _key_checks(tpm: TpmConnection, ident: IdentityConfig,
                stored: StoredIdentity | None) -> tuple[CheckResult, CheckResult]:
    """(key present, certificate matches key) for one identity; flushes what it loads."""
    from tpmid.tpm.keys import key_matches_certificate

    n = ident.name
    key_name, match_name = f"{n}: key", f"{n}: certificate matches key"
    try:
        key, detail = _open_key(tpm, ident, stored)
    except TpmidError as e:
        hint = e.hint.replace("<identity>", n) if e.hint else None
        return (CheckResult(key_name, False, e.message, hint),
                _skip(match_name, "the key is not usable"))
    try:
        if stored is None:
            return _ok(key_name, detail), _skip(match_name, "no certificate stored")
        if key_matches_certificate(key, stored.cert):
            return _ok(key_name, detail), _ok(
                match_name, f"the TPM key is the certificate's (public key SHA-256 "
                            f"{spki_sha256(stored.cert)[:16]}…)")
        tpm_fp = hashlib.sha256(key.public_key_der()).hexdigest()[:16]
        return _ok(key_name, detail), _fail(
            match_name,
            f"the stored certificate (serial {stored.cert.serial_number:x}) certifies another "
            f"key: certificate public key SHA-256 {spki_sha256(stored.cert)[:16]}…, "
            f"TPM key {tpm_fp}…",
            f"the certificate cannot be used with this key; re-enroll: tpmid reset {n} --yes "
            f"&& tpmid enroll {n}" if ident.est is not None and ident.key.kind == "file" else
            "do not use this certificate; re-provision the device (tpmid provision --force) or "
            "restore the IDevID certificate that belongs to this TPM")
    except TpmidError as e:
        return _from_error(key_name, e), _skip(match_name, "the key is not usable")
    finally:
        key.close()


# --------------------------------------------------------------------------- certificates


def check_validity(ident: IdentityConfig, stored: StoredIdentity, now: datetime) -> CheckResult:
    """The certificate is valid at ``now``."""
    from tpmid.est.verify import check_validity as _check

    name = f"{ident.name}: certificate valid now"
    try:
        _check(stored.cert, _utc(now))
    except VerificationError as e:
        hint = "check the clock (NTP)"
        if _utc(now) > stored.not_after:
            hint = (f"the daemon renews it (systemctl status tpmid); by hand: tpmid enroll "
                    f"{ident.name}" if ident.est is not None and ident.key.kind == "file" else
                    "this certificate is not renewed by tpmid; re-provision the device")
        message = e.message.replace("the issued certificate", "the certificate")
        return _fail(name, message, hint)
    left = stored.not_after - _utc(now)
    return _ok(name, f"valid until {iso(stored.not_after)} ({left.days} d left)")


def check_chain(config: Config, ident: IdentityConfig, stored: StoredIdentity,
                now: datetime) -> CheckResult:
    """The certificate chains to ``est.issuer_anchors`` or, without them, to its stored chain."""
    from tpmid.est.verify import verify_chain
    from tpmid.lifecycle.enroll import load_pem_certificates

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
        at = min(max(_utc(now), stored.not_before), stored.not_after)
        chain = verify_chain(stored.cert, issuers=anchors, intermediates=stored.chain,
                             profile="ca" if ident.profile == "ca" else "device", now=at)
    except TpmidError as e:
        return _from_error(name, e)
    top = chain[-1].subject.rfc4514_string() if chain else "?"
    return _ok(name, f"chains to {top!r} from {what}")


# --------------------------------------------------------------------------- EST


def _default_fetch(*args: Any, **kwargs: Any) -> FetchResult:
    from tpmid.lifecycle.enroll import fetch_cacerts

    return fetch_cacerts(*args, **kwargs)


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
    open_tpm: TpmOpener,
    now: datetime,
    config_path: Path | None = None,
    fetch_cacerts: CacertsFetcher | None = None,
    est: bool = True,
) -> list[CheckResult]:
    """Run every check (see the module docstring); never raises for a failed check.

    ``open_tpm`` opens the TPM once for all key checks (the CLI passes its
    ``open_tpm``, which honours ``tpm.lock_file``); ``fetch_cacerts`` defaults to
    :func:`tpmid.lifecycle.enroll.fetch_cacerts`; ``est=False`` skips the network.
    """
    fetch = fetch_cacerts or _default_fetch
    results: list[CheckResult] = [check_config_file(config, config_path),
                                  check_store_permissions(config)]

    store: Store | None = None
    store_error: TpmidError | None = None
    try:
        store = open_store(config)
    except TpmidError as e:
        store_error = e
    stored: dict[str, StoredIdentity | None] = {}
    load_errors: dict[str, TpmidError] = {}
    for name in config.identities:
        cur, err = _load(store, name)
        stored[name] = cur
        if err is not None:
            load_errors[name] = err
    results.append(check_clock(now, [c for c in stored.values() if c is not None]))

    # All TPM work happens in one connection, one object at a time.
    key_results: dict[str, tuple[CheckResult, CheckResult]] = {}
    tpm_ok = False
    try:
        with open_tpm() as tpm:
            tpm_results = check_tpm(tpm)
            results += tpm_results
            tpm_ok = tpm_results[0].ok
            if tpm_ok:
                for ident in config.identities.values():
                    n = ident.name
                    unreadable = load_errors.get(n) or store_error
                    if ident.key.kind == "file" and unreadable is not None:
                        # The key file is in the store; saying "not enrolled" would mislead.
                        why = f"the store is not usable ({unreadable.message})"
                        key_results[n] = (_skip(f"{n}: key", why),
                                          _skip(f"{n}: certificate matches key", why))
                    else:
                        key_results[n] = _key_checks(tpm, ident, stored[n])
    except TpmidError as e:
        if not tpm_ok:
            results.append(_from_error("TPM reachable", e))
        else:  # the TPM went away during the checks (or on close)
            results.append(_from_error("TPM still reachable", e))

    for ident in config.identities.values():
        n = ident.name
        cur = stored[n]
        if n in key_results:
            key_res, match_res = key_results[n]
        else:
            key_res = _skip(f"{n}: key", "the TPM is not reachable")
            match_res = _skip(f"{n}: certificate matches key", "the TPM is not reachable")
        results.append(key_res)
        if cur is None:
            err = load_errors.get(n) or store_error
            if err is not None:
                results.append(_from_error(f"{n}: certificate", err))
            elif ident.est is not None:
                results.append(_fail(f"{n}: certificate",
                                     f"no certificate in the store ({config.store.dir})",
                                     f"enroll it: tpmid enroll {n}"))
            else:
                results.append(_fail(
                    f"{n}: certificate", f"no certificate in the store ({config.store.dir}) "
                    "and no est section to enroll it",
                    "provision the device (tpmid provision) or remove the identity from the "
                    "config"))
        else:
            results.append(check_validity(ident, cur, now))
            results.append(check_chain(config, ident, cur, now))
            results.append(match_res)
    if est:
        cache: dict[tuple[Any, ...], CheckResult] = {}
        for ident in config.identities.values():
            if ident.est is not None:
                results.append(check_est(config, ident, fetch, cache))
    for r in results:
        log.debug("check %s: %s %s", r.name, "ok" if r.ok else "FAIL", r.detail)
    return results


def all_passed(results: Sequence[CheckResult]) -> bool:
    """True when every check passed (a skipped check did not)."""
    return all(r.ok for r in results)
