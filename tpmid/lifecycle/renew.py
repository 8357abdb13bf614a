"""The renewal engine: when each identity renews, and one renewal attempt.

:class:`RenewalEngine` is the :class:`~tpmid.lifecycle.daemon.Planner` of the
daemon and what ``tpmid renew`` calls. It combines the pure policy
(:func:`~tpmid.policy.decide`), the store (certificate, attempt state,
journal) and :func:`~tpmid.lifecycle.enroll.enroll_identity`, which does the
work: new TPM key (``rotate_key``), CSR, EST, verification, commit.

How an identity renews (same meaning as Azure IoT Edge's ``auto_renew``):

* valid device certificate, ``method: simplereenroll`` (default): RFC 7030
  §4.2.2 re-enrollment, authenticated with the identity's own current key and
  certificate;
* valid device certificate, ``method: simpleenroll`` (services such as IoT
  Edge's EST setup only use that): simpleenroll, still authenticated with the
  identity's own current certificate;
* a certificate that cannot be a TLS client certificate (``profile: ca``, the
  Edge CA) renews with its first-enrollment authentication via simpleenroll;
* an expired or missing certificate falls back to the first-enrollment
  authentication (``est.auth``, e.g. the IDevID: the bootstrap identity); so does a
  certificate the server no longer accepts (a TLS alert such as "unknown CA" after a
  CA rollover's overlap ended, or a revocation), with a warning that says why.

After a commit the previous key file is deleted (at once, or after
``renew.grace``), the attempt state is reset and ``hooks.after_renew`` runs.
Only ``kind: file`` identities with an ``est`` section are renewed
automatically; IDevIDs (persistent / ek-derived keys) are birth certificates.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from tpmid.cancel import Cancelled
from tpmid.clock import as_utc, utcnow
from tpmid.config import Config, IdentityConfig
from tpmid.errors import (
    EstAuthError,
    EstRetryLater,
    EstTransportError,
    KeyUnavailableError,
    StoreError,
    TpmidError,
)
from tpmid.lifecycle.enroll import EnrollResult, EstClientFactory, KeyMirror, enroll_identity
from tpmid.lifecycle.plan import managed_identities, plan_renewal
from tpmid.policy import (
    AttemptState,
    Decision,
)
from tpmid.store import Store, StoredIdentity, recover
from tpmid.tpm.identity import identity_key, spki_of
from tpmid.tpm.lease import TpmLease

if TYPE_CHECKING:
    from tpmid.tpm.connection import TpmOpener

log = logging.getLogger(__name__)

HOOK_TIMEOUT_S = 120.0

HookRunner = Callable[[Sequence[str], Mapping[str, str]], int]
HookEnvironment = Callable[[IdentityConfig, Mapping[str, str]], dict[str, str]]


def refused_certificate(e: TpmidError) -> str | None:
    """Why the server refused the identity's own certificate, if that is what ``e`` says.

    A TLS alert about the client certificate (unknown CA, revoked, expired...), or a
    403 whose reason is the client certificate (the reference server's "not issued by
    the ... CA accepted at this label").
    """
    if isinstance(e, EstTransportError) and e.refused_client_certificate:
        return f"TLS alert: {e.refused_client_certificate}"
    if isinstance(e, EstAuthError) and e.status == 403 and "client certificate" in e.body.lower():
        return f"403: {e.body[:120]}"
    return None


def run_hook(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run a post-renew hook with exactly ``env``; return its exit status (never raises for it)."""
    try:
        proc = subprocess.run(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=HOOK_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("hook %s failed to run: %s", argv[0], e)
        return -1
    if proc.returncode != 0:
        log.error("hook %s exited with %d: %s", argv[0], proc.returncode,
                  (proc.stderr or proc.stdout).strip()[-500:])
    return proc.returncode


@dataclass
class RenewalEngine:
    """Plans and performs renewals for the identities of one config and store."""

    config: Config
    store: Store
    open_tpm: TpmOpener
    # Builds the EST client factory at the first renewal: an idle daemon never loads
    # the HTTP stack (tpmid.wiring.est).
    make_clients: Callable[[], EstClientFactory]
    now: Callable[[], datetime] = utcnow
    hook_runner: HookRunner = run_hook
    # The environment a hook of an identity runs with, given the TPMID_* variables
    # (the composition root decides what else goes in: never tpmid's secrets).
    hook_environment: HookEnvironment = lambda ident, extra: dict(extra)
    # The daemon sets this: after a renewal, identities with renew.chain that
    # authenticate with it are renewed too (their failures are recorded, not raised).
    follow_chains: bool = False
    # Keeps the PKCS#11 token in step with each renewal (tpmid.lifecycle.pkcs11).
    mirror: KeyMirror | None = None

    _clients: EstClientFactory | None = field(default=None, init=False, repr=False)
    _unsaved: dict[str, AttemptState] = field(default_factory=dict, init=False, repr=False)

    def clients(self) -> EstClientFactory:
        """The EST client factory, built on first use."""
        if self._clients is None:
            self._clients = self.make_clients()
        return self._clients

    # ------------------------------------------------------------------ planning

    def identities(self) -> list[str]:
        return managed_identities(self.config)

    def plan(self, name: str, now: datetime) -> Decision:
        """The next event for ``name`` (see :func:`plan_renewal`), after repairing damage."""
        self.repair(name)
        return plan_renewal(self.config, self.store, name, now, attempt=self.load_state(name))

    def load_state(self, name: str) -> AttemptState:
        """The attempt state: the store's, or a newer one kept in memory (see :meth:`save_state`)."""
        stored = self.store.load_state(name)
        kept = self._unsaved.get(name)
        if kept is None or (stored.last_attempt is not None and kept.last_attempt is not None
                            and stored.last_attempt > kept.last_attempt):
            return stored
        return kept

    def save_state(self, name: str, state: AttemptState) -> None:
        """Record the attempt state; kept in memory when the store cannot take it.

        A full or read-only disk must not turn the retry schedule into a loop:
        the daemon then plans from what it remembers.
        """
        try:
            self.store.save_state(name, state)
        except StoreError as e:
            if name not in self._unsaved:
                log.error("%s: cannot record the renewal attempt in the store (%s); keeping "
                          "it in memory", name, e)
            self._unsaved[name] = state
        else:
            self._unsaved.pop(name, None)

    def repair(self, name: str) -> None:
        """Run recovery for ``name`` if its current version is damaged or its link lost.

        Recovery falls back to the newest intact version (or removes the link so
        the renewal enrolls again); see :func:`tpmid.store.recover`. Cheap when
        nothing is wrong: one read of the current version.
        """
        try:
            damaged = self.store.current(name) is None and bool(self.store.versions(name))
        except StoreError:
            damaged = True
        if damaged:
            for action in recover(self.store, names=[name]):
                log.warning("%s", action)

    # ------------------------------------------------------------------ renewing

    def renew(self, name: str, now: datetime) -> EnrollResult:
        """One renewal attempt for ``name``; records the outcome in the store.

        Raises the attempt's error after recording it (the daemon logs and
        carries on; ``tpmid renew`` reports it). A key that can no longer be used
        (TPM2_Clear) is healed where it can be: IDevIDs are restored from their
        templates, and an identity whose own key is lost enrolls again at once
        through its bootstrap identity with a new key (one more attempt).
        """
        ident = self.config.identity(name)
        self.repair(name)
        attempt = self.load_state(name)
        try:
            try:
                result = self._enroll(name, ident, now, attempt)
            except KeyUnavailableError as e:
                if not self._heal(name, e):
                    raise
                attempt = self.load_state(name)
                result = self._enroll(name, ident, self.now(), attempt)
        except EstRetryLater as e:
            self.save_state(name, attempt.pending(now, e.retry_after))
            raise
        except Cancelled:
            raise  # stopping: not a failed attempt (a request sent stays in the journal)
        except TpmidError as e:
            self.save_state(name, self.load_state(name).failed(
                now, e.message, getattr(e, "retry_after", None)))
            raise
        self.save_state(name, AttemptState.succeeded(self.now()))
        self._retire_old_keys(name, ident, result.version)
        self._run_hooks(ident, result)
        for other in self.dependents(name):
            # Identities that lost their key and authenticate with this one: now they can.
            chained = self.follow_chains and self.config.identities[other].renew.chain
            if not (chained or self.load_state(other).key_lost):
                continue
            log.info("%s: renewing now, after %s (%s)", other, name,
                     "renew.chain" if chained else "its key was lost")
            try:
                self.renew(other, self.now())
            except TpmidError as e:
                log.warning("%s: renewal after %s failed: %s", other, name, e)
        return result

    def _enroll(self, name: str, ident: IdentityConfig, now: datetime,
                attempt: AttemptState) -> EnrollResult:
        current = self.store.current(name)
        reenroll, self_auth, why = self._method(ident, current, now, attempt)
        resumed = self._resumable_method(name, current, now, attempt)
        if resumed is not None:
            reenroll, self_auth, why = resumed
        log.info("%s: renewing via %s (%s)", name,
                 "serverkeygen" if ident.est is not None and ident.est.serverkeygen
                 else "simplereenroll" if reenroll else "simpleenroll", why)
        self._drop_unresumable_journal(name, reenroll)
        if attempt.retrying and attempt.retry_after is None and ident.est is not None:
            # The last attempt failed: before a new TPM key is made (seconds for RSA on a
            # real TPM), check that the server answers at all.
            log.info("%s: checking that %s answers before retrying", name, ident.est.url)
            self.clients().fetch_cacerts(ident.est)
        try:
            return self._enroll_once(name, reenroll=reenroll, auth_with_current=self_auth)
        except (EstTransportError, EstAuthError) as e:
            refused = refused_certificate(e) if self_auth else None
            if refused is None:
                raise
        # The server no longer accepts the identity's own certificate (a CA rollover whose
        # overlap ended, a revocation): as with an expired one, the bootstrap identity.
        est = ident.est
        via = est.auth.client if est is not None and est.auth.client else "est.auth"
        log.warning("%s: the EST server no longer accepts %s's certificate (%s); renewing "
                    "through the bootstrap identity (%s) instead, as for an expired "
                    "certificate", name, name, refused, via)
        self._drop_unresumable_journal(name, False)
        return self._enroll_once(name, reenroll=False, auth_with_current=False)

    def _enroll_once(self, name: str, *, reenroll: bool, auth_with_current: bool
                     ) -> EnrollResult:
        """One enrollment of ``name`` with this engine's TPM, clients, clock and token."""
        with TpmLease(self.open_tpm) as lease:
            return enroll_identity(
                self.config, name, store=self.store, lease=lease, clients=self.clients(),
                now=self.now, reenroll=reenroll, auth_with_current=auth_with_current,
                mirror=self.mirror,
            )

    def _heal(self, name: str, e: KeyUnavailableError) -> bool:
        """After a key turned out unusable: restore what can be; True if worth one more try."""
        lost = e.identity if e.identity in self.config.identities else name
        assert lost is not None
        log.warning("%s: the key of %s can no longer be used (%s); the TPM was probably "
                    "cleared (TPM2_Clear) or replaced", name, lost, e.message)
        restored = self.restore_birth_keys()
        if identity_key(self.config.identity(lost)).birth:
            return bool(restored)  # an IDevID: usable again if it was restored
        self._mark_key_lost(lost)
        # This identity's own key: enroll again now, through the bootstrap identity.
        return lost == name

    def _mark_key_lost(self, name: str) -> None:
        state = self.load_state(name)
        if not state.key_lost:
            self.save_state(name, state.lost_key())
            est = self.config.identity(name).est
            via = est.auth.client if est is not None and est.auth.client else "est.auth"
            log.warning("%s: renewing now with a new key, authenticated through %s", name, via)

    def restore_birth_keys(self) -> list[str]:
        """Restore the IDevIDs after TPM2_Clear (re-persist, rewrite the NV copy); what was done."""
        done: list[str] = []
        births = [(n, identity_key(i)) for n, i in self.config.identities.items()
                  if identity_key(i).birth]
        if not births:
            return done
        with TpmLease(self.open_tpm) as lease:
            for name, key in births:
                try:
                    current = self.store.current(name)
                except StoreError:
                    continue
                if current is None:
                    continue
                for note in key.restore(lease.tpm(), current.cert):
                    log.warning("%s: %s", name, note)
                    done.append(f"{name}: {note}")
        return done

    def check_keys(self) -> None:
        """Start-up: restore IDevIDs, and mark identities whose key no longer loads.

        A marked identity renews at once (``AttemptState.key_lost``), through its
        bootstrap identity, with a new key: after TPM2_Clear a device heals itself
        without operator action. Costs a few TPM commands, once per start.
        """
        self.restore_birth_keys()
        with TpmLease(self.open_tpm) as lease:
            for name in self.identities():
                try:
                    current = self.store.current(name)
                except StoreError:
                    continue
                if current is None or self.load_state(name).key_lost:
                    continue
                key = identity_key(self.config.identity(name))
                try:
                    with key.open(lease.tpm(), current.key_file) as loaded:
                        usable = loaded.public_key_der() == spki_of(current.cert)
                except KeyUnavailableError as e:
                    log.warning("%s: its key can no longer be used (%s); the TPM was probably "
                                "cleared (TPM2_Clear) or replaced", name, e.message)
                    usable = False
                if not usable:
                    self._mark_key_lost(name)

    def dependents(self, name: str, *, chained_only: bool = False) -> list[str]:
        """Managed identities that authenticate with ``name`` (``renew.chain`` ones only)."""
        out = []
        for other in self.identities():
            ident = self.config.identities[other]
            if ident.est is not None and ident.est.auth.client == name and (
                    ident.renew.chain or not chained_only):
                out.append(other)
        return out

    def renew_chain(self, name: str, now: datetime, *, chained_only: bool = False
                    ) -> list[EnrollResult]:
        """Renew ``name``, then the identities that authenticate with it (e.g. the Edge CA).

        ``chained_only`` limits the second part to identities with ``renew.chain``
        (what the daemon does); ``tpmid renew --chain`` renews them all.
        """
        results = [self.renew(name, now)]
        for other in self.dependents(name, chained_only=chained_only):
            results.append(self.renew(other, self.now()))
        return results

    @staticmethod
    def _method(ident: IdentityConfig, current: StoredIdentity | None,
                now: datetime, attempt: AttemptState) -> tuple[bool, bool, str]:
        """(use simplereenroll, authenticate with own certificate, reason)."""
        if current is None:
            return False, False, "not enrolled: first-enrollment authentication"
        if attempt.key_lost:
            return False, False, ("its key can no longer be used: a new key, with "
                                  "first-enrollment authentication")
        if now >= as_utc(current.not_after):
            return False, False, "certificate expired: falling back to first-enrollment authentication"
        if ident.profile == "ca":
            via = ident.est.auth.client if ident.est is not None and ident.est.auth.client \
                else "est.auth"
            return False, False, f"a CA certificate renews with simpleenroll, authenticated by {via}"
        if ident.renew.method == "simpleenroll":
            return False, True, "method simpleenroll, authenticated with the current certificate"
        return True, True, "authenticated with the current certificate"

    def _resumable_method(self, name: str, current: StoredIdentity | None, now: datetime,
                          attempt: AttemptState) -> tuple[bool, bool, str] | None:
        """The method of a request in flight that can be resent as it is (RFC 7030 §4.2.3).

        A ``tpmid enroll`` answered with 202 is resent by ``tpmid renew`` or the
        daemon with the same CSR and the same authentication; a simplereenroll
        only while the certificate that authenticates it is still valid.
        """
        try:
            entry = self.store.journal_get(name)
        except StoreError:
            return None
        if entry is None or not entry.csr_pem or attempt.key_lost \
                or entry.phase not in ("submitted", "pending", "issued"):
            return None
        if entry.method == "simpleenroll":
            return False, False, "resending the simpleenroll in flight"
        if current is not None and now < as_utc(current.not_after):
            return True, True, "resending the simplereenroll in flight"
        return None

    def _drop_unresumable_journal(self, name: str, reenroll: bool) -> None:
        """A pending request for the other method (e.g. the cert expired meanwhile) is abandoned."""
        entry = self.store.journal_get(name)
        est = self.config.identity(name).est
        wanted = ("serverkeygen" if est is not None and est.serverkeygen
                  else "simplereenroll" if reenroll else "simpleenroll")
        if entry is None or entry.method == wanted:
            return
        log.warning("%s: abandoning the %s in flight (phase %s); starting a %s", name,
                    entry.method, entry.phase, wanted)
        self.store.journal_clear(name)
        if entry.version is not None:
            with contextlib.suppress(StoreError):
                self.store.discard_key(name, entry.version)

    def _retire_old_keys(self, name: str, ident: IdentityConfig, current: str) -> None:
        """Delete key files of versions older than ``current`` once their grace has passed."""
        if not ident.renew.rotate_key:
            return
        cutoff = self.now() - timedelta(seconds=ident.renew.grace)
        for version in self.store.versions(name):
            if int(version) >= int(current):
                continue
            path = self.store.key_path(name, version)
            if not path.exists():
                continue
            # The successor's commit time is when this key stopped being current.
            successor = self.store.current_dir(name).parent / current
            with contextlib.suppress(OSError):
                retired_at = datetime.fromtimestamp(successor.stat().st_mtime, UTC)
                if retired_at > cutoff:
                    continue
            with contextlib.suppress(StoreError):
                self.store.discard_key(name, version)
                log.info("%s: deleted the key of version %s (rotated)", name, version)

    def retire_due_keys(self) -> None:
        """Delete rotated keys whose grace period has passed (the daemon calls this)."""
        for name in self.identities():
            current = self.store.current(name)
            if current is not None:
                self._retire_old_keys(name, self.config.identity(name), current.version)

    def _run_hooks(self, ident: IdentityConfig, result: EnrollResult) -> None:
        argv = ident.hooks.after_renew
        if not argv:
            return
        env = {
            "TPMID_IDENTITY": ident.name,
            "TPMID_CERT": str(result.cert_path),
            "TPMID_CHAIN": str(result.chain_path),
            "TPMID_FULLCHAIN": str(result.fullchain_path or ""),
            "TPMID_KEY": str(result.key_path or ""),
            "TPMID_VERSION": result.version,
        }
        rc = self.hook_runner(argv, self.hook_environment(ident, env))
        if rc == 0:
            log.info("%s: hook %s ran", ident.name, argv[0])
        else:
            log.error("%s: hook %s failed (exit %d); the renewal stands", ident.name, argv[0], rc)
