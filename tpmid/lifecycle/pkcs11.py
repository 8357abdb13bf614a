"""Keeping the PKCS#11 token in step with the store: :class:`TokenMirror`.

With a top-level ``pkcs11`` section, every identity whose key is a key file
(LDevID, Edge CA) appears in the tpm2-pkcs11 token ``pkcs11.token`` as three
objects sharing its label (``identities.NAME.pkcs11.label``, default NAME): the
TPM key itself *linked* (a private and a public key object holding the key
file's TPM blobs; nothing is re-created or exported) and the current
certificate. Consumers name it with one URI that never changes:
``pkcs11:token=tpmid;object=ldevid;type=private`` (the object label,
``CKA_LABEL``; :mod:`tpmid.pkcs11.uri`).

A renewal keeps that URI right at every moment, crash or not:

1. when the new key is staged (store + journal), it is linked under
   ``<label>.next`` and the journal entry notes it (``extra.pkcs11_staged``);
2. when the certificate is committed, one SQLite transaction removes the old
   key and certificate objects, relabels the ``.next`` pair and adds the new
   certificate. A reader sees the old pair or the new one, never two keys under
   the label and never none;
3. a rolled-back renewal removes its ``.next`` objects.

Every one of these is the same computation, :meth:`TokenMirror.sync`: make the
token what the store says — the current version's key and certificate under the
label, the key of the renewal in flight (journal) under ``.next``, nothing else.
So whatever a SIGKILL interrupted, the next command that runs recovery (``tpmid
renew``, ``tpmid daemon``, ``tpmid pkcs11 sync``) puts the token back in step;
``tpmid check`` and ``tpmid pkcs11 list`` report a token that is not.

Linking needs the token's wrapping key, unsealed in the TPM with the user PIN
(``pkcs11.user_pin``); relabelling and removing objects need neither PIN nor
TPM, so the commit step itself cannot fail for want of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.serialization import Encoding

from tpmid.config import PKCS11_STAGING_SUFFIX, Config, IdentityConfig, Pkcs11Config, SecretRef
from tpmid.errors import ConfigError, StoreError, TokenError
from tpmid.lifecycle.check import CheckResult
from tpmid.pkcs11.token import (
    PRIMARY_CONFIG,
    TRANSIENT_PARENT,
    StoreView,
    TokenObject,
    TokenStore,
    ckaid_for,
    mechanisms_for,
    new_salt,
    new_wrapping_key,
    wrap_auth,
)
from tpmid.pkcs11.uri import pkcs11_uri
from tpmid.render import key_fingerprint
from tpmid.store import Store
from tpmid.tpm.identity import identity_key
from tpmid.tpm.token import KeyMaterial, key_file_material, seal_auth

if TYPE_CHECKING:
    from tpmid.tpm.connection import TpmConnection

log = logging.getLogger(__name__)

TpmProvider = Callable[[], "TpmConnection"]
SecretResolver = Callable[[SecretRef], str]


@dataclass(frozen=True)
class _Wanted:
    """The key (and certificate) that should be under one label."""

    material: KeyMaterial
    ckaid: str
    version: str
    path: Path  # the key file (linking loads it to prove it belongs to this TPM)
    cert_der: bytes | None = None
    cert_pem: str | None = None


@dataclass
class _Plan:
    """Steps that bring one identity's objects in step, and what they fix."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    links: list[tuple[str, _Wanted]] = field(default_factory=list)  # (label, key) to link
    certs: list[tuple[str, _Wanted]] = field(default_factory=list)  # after the links
    problems: list[str] = field(default_factory=list)  # what is out of step (for check)
    notes: list[str] = field(default_factory=list)  # what the steps do (for the log)

    @property
    def empty(self) -> bool:
        return not (self.steps or self.links or self.certs)


@dataclass(frozen=True)
class TokenState:
    """One identity in the token: its URI and whether the token matches the store."""

    identity: str
    label: str
    uri: str
    in_step: bool
    problems: tuple[str, ...]
    version: str | None = None
    pkcs11_id: str | None = None  # CKA_ID of the current key object, hex
    public_key: str | None = None  # labelled fingerprint of the current key

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (``tpmid pkcs11 list --json``)."""
        return {"identity": self.identity, "label": self.label, "uri": self.uri,
                "in_step": self.in_step, "problems": list(self.problems),
                "version": self.version, "id": self.pkcs11_id, "public_key": self.public_key}


def linked_identities(config: Config) -> list[IdentityConfig]:
    """Identities whose key is in the token: ``pkcs11`` on (default) and a linkable key.

    ConfigError for an identity that asks for it but whose key cannot be linked
    (an IDevID: tpm2-pkcs11 1.9 cannot use primary or persistent keys).
    """
    if config.pkcs11 is None:
        return []
    out = []
    for ident in config.identities.values():
        key = identity_key(ident)
        if not ident.pkcs11.enabled:
            continue
        if not key.linkable:
            if ident.pkcs11.explicit:
                raise ConfigError(
                    f"{config.source}: identities.{ident.name}.pkcs11: {ident.name}'s key "
                    f"cannot be a PKCS#11 token object: {key.link_refusal()}",
                    hint=f"remove identities.{ident.name}.pkcs11 (IoT Edge can keep using "
                    "the IDevID's certificate; see docs/iot-edge.md)")
            continue
        out.append(ident)
    return out


class TokenMirror:
    """The token of ``config.pkcs11`` kept in step with ``store`` (see the module docstring)."""

    def __init__(self, config: Config, tokens: TokenStore, secret: SecretResolver) -> None:
        if config.pkcs11 is None:
            raise ConfigError(f"{config.source}: there is no pkcs11 section",
                              hint="see docs/config.md for the pkcs11 section")
        self.config = config
        self.settings: Pkcs11Config = config.pkcs11
        self.tokens = tokens
        self.secret = secret
        self._linked = {i.name: i for i in linked_identities(config)}

    # ------------------------------------------------------------ naming

    def names(self) -> list[str]:
        """The identities whose key is in the token, in config order."""
        return list(self._linked)

    def enabled(self, name: str) -> bool:
        """True when ``name``'s key belongs in the token."""
        return name in self._linked

    def label(self, name: str) -> str:
        """CKA_LABEL of ``name``'s key pair and certificate."""
        return self.config.identity(name).pkcs11_label

    def staging_label(self, name: str) -> str:
        """The label a new key of ``name`` waits under until its certificate is committed."""
        return self.label(name) + PKCS11_STAGING_SUFFIX

    def uri(self, name: str, *, pin: str | None = None) -> str:
        """The PKCS#11 URI of ``name``'s private key (with ``pin``: a secret, 0600 files only)."""
        return pkcs11_uri(self.settings.token, self.label(name), pin=pin)

    # ------------------------------------------------------------ what should be there

    def _wanted_current(self, store: Store, name: str) -> _Wanted | None:
        """The committed key and certificate (StoreError when the version is damaged)."""
        current = store.current(name)
        if current is None or current.key_file is None:
            return None
        material = _material(current.key_file)
        return _Wanted(material=material, ckaid=ckaid_for(material.spki_der),
                       version=current.version, path=current.key_file,
                       cert_der=current.cert.public_bytes(Encoding.DER),
                       cert_pem=current.cert.public_bytes(Encoding.PEM).decode())

    def _wanted_staged(self, store: Store, name: str, current: _Wanted | None) -> _Wanted | None:
        """The key of the renewal in flight, if its key file is staged and not yet current."""
        try:
            entry = store.journal_get(name)
        except StoreError:
            return None
        if entry is None or entry.version is None or \
                (current is not None and entry.version == current.version):
            return None
        path = store.key_path(name, entry.version)
        if not path.is_file():
            return None
        material = _material(path)
        return _Wanted(material=material, ckaid=ckaid_for(material.spki_der),
                       version=entry.version, path=path)

    # ------------------------------------------------------------ planning

    def _plan(self, view: StoreView, name: str, current: _Wanted | None,
              staged: _Wanted | None, *, link_staged: bool = True) -> _Plan:
        """Steps that make ``name``'s labels hold exactly ``current`` and ``staged``."""
        plan = _Plan()
        label, staging = self.label(name), self.staging_label(name)
        here = view.labelled(label)
        waiting = view.labelled(staging)

        def pair(objs: list[TokenObject], want: _Wanted) -> list[TokenObject]:
            keys = [o for o in objs if o.kind in ("private", "public")
                    and o.tpm_public == want.material.public_blob]
            kinds = sorted(o.kind for o in keys)
            return keys if kinds == ["private", "public"] else []

        keep: set[int] = set()
        promoted: list[TokenObject] = []
        if current is not None:
            ok = pair(here, current)
            keep.update(o.id for o in ok)
            if not ok:
                promoted = pair(waiting, current)
                if promoted:
                    plan.problems.append(f"the key of version {current.version} still waits "
                                         f"under {staging!r} (its commit was interrupted)")
                    plan.notes.append(f"relabelled the key of version {current.version} from "
                                      f"{staging!r} to {label!r}")
                    plan.steps += [self.tokens.relabel_step(o, label) for o in promoted]
                else:
                    plan.problems.append(f"no key object under {label!r} is the key of "
                                         f"version {current.version}")
                    plan.notes.append(f"linked the key of version {current.version} under "
                                      f"{label!r}")
                    plan.links.append((label, current))
            certs = [o for o in here if o.kind == "certificate" and o.cert_der == current.cert_der
                     and o.ckaid == current.ckaid]
            if certs:
                keep.add(certs[0].id)
            else:
                plan.problems.append(f"no certificate object under {label!r} is the certificate "
                                     f"of version {current.version}")
                plan.notes.append(f"added the certificate of version {current.version}")
                plan.certs.append((label, current))
        stale = [o for o in here if o.id not in keep]
        if stale:
            what = ", ".join(sorted({o.kind for o in stale}))
            plan.problems.append(f"{len(stale)} object(s) under {label!r} ({what}) are not the "
                                 "current version's" if current is not None else
                                 f"{len(stale)} object(s) under {label!r} but {name} has no "
                                 "current version")
            plan.notes.append(f"removed {len(stale)} old object(s) under {label!r}")
            plan.steps += [self.tokens.delete_step(o) for o in stale]

        wait_keep = {o.id for o in promoted}
        if staged is not None:
            ok = pair(waiting, staged)
            wait_keep.update(o.id for o in ok)
            if not ok and link_staged:
                plan.notes.append(f"linked the key of the renewal in flight (version "
                                  f"{staged.version}) under {staging!r}")
                plan.links.append((staging, staged))
        leftovers = [o for o in waiting if o.id not in wait_keep]
        if leftovers:
            plan.problems.append(f"{len(leftovers)} object(s) under {staging!r} that no renewal "
                                 "in flight uses")
            plan.notes.append(f"removed {len(leftovers)} object(s) under {staging!r}")
            plan.steps += [self.tokens.delete_step(o) for o in leftovers]
        return plan

    # ------------------------------------------------------------ applying

    def _token_view(self, tpm: TpmProvider | None) -> StoreView:
        """The store's view; the token is created first when it does not exist and ``tpm`` is given."""
        view = self.tokens.view()
        if view.token is None:
            if tpm is None:
                return view
            self._create_token(tpm(), view)
            view = self.tokens.view()
            assert view.token is not None
        if view.token.primary_config != PRIMARY_CONFIG:
            raise TokenError(
                f"token {self.settings.token!r} in {self.settings.store} does not re-create its "
                f"primary object from {TRANSIENT_PARENT!r}, the storage key tpmid's key files "
                f"are made under ({view.token.primary_config}): tpmid's keys cannot be linked "
                "into it",
                hint="give pkcs11.token another label (tpmid makes that token itself), or "
                "pkcs11.store another directory")
        return view

    def _create_token(self, tpm: TpmConnection, view: StoreView) -> None:
        """Make the token: wrapping key sealed for the user and the SO PIN, transient parent."""
        if self.settings.so_pin is None:
            raise TokenError(
                f"token {self.settings.token!r} does not exist in {self.settings.store} and "
                "tpmid cannot make it without pkcs11.so_pin",
                hint="add pkcs11.so_pin to the config (a 0600 file or an environment "
                "variable), then run `tpmid pkcs11 sync`")
        user_pin = self.secret(self.settings.user_pin)
        so_pin = self.secret(self.settings.so_pin)
        self.tokens.ensure_directory()
        wrapping = new_wrapping_key()
        user_salt, so_salt = new_salt(), new_salt()
        user = (*tpm.seal_token_secret(wrapping, seal_auth(user_pin, user_salt)), user_salt)
        so = (*tpm.seal_token_secret(wrapping, seal_auth(so_pin, so_salt)), so_salt)
        del wrapping, user_pin, so_pin
        steps = self.tokens.create_steps(user=user, so=so,
                                         pss_good=tpm.pss_salt_is_digest_length())
        shared = [pid for pid, config in view.primaries if config == PRIMARY_CONFIG]
        if shared:
            # A primary object made from the same template exists (another token): share it.
            steps = steps[1:]
            steps[0]["pid"] = shared[0]
        self.tokens.apply(steps)
        log.info("created PKCS#11 token %r in %s (transient parent %s)", self.settings.token,
                 self.settings.store, TRANSIENT_PARENT)

    def _execute(self, tpm: TpmProvider | None, view: StoreView, plan: _Plan) -> None:
        """Apply ``plan`` in one transaction, linking keys first if it needs any."""
        steps = list(plan.steps)
        if plan.links:
            if tpm is None:
                raise TokenError("linking a key needs the TPM")
            conn = tpm()
            assert view.token is not None
            if view.token.user_public is None or view.token.user_private is None \
                    or view.token.user_salt is None:
                raise TokenError(f"token {self.settings.token!r} has no user PIN seal object")
            pin = self.secret(self.settings.user_pin)
            wrapping = conn.unseal_token_secret(
                view.token.user_public, view.token.user_private,
                seal_auth(pin, view.token.user_salt),
                what=f"PKCS#11 token {self.settings.token!r}'s user PIN object")
            del pin
            encauth = wrap_auth(wrapping)  # tpmid's keys have an empty authorization
            del wrapping
            algorithms = conn.algorithm_names()
            for label, want in plan.links:
                # The key must load under this TPM's storage parent, or the object is useless.
                conn.key_file_material(_key_pem(want), check_loads=True)
                m = want.material
                steps.append(self.tokens.link_step(
                    label, want.ckaid, public_blob=m.public_blob, private_blob=m.private_blob,
                    public=m.public, encauth=encauth, algorithms=algorithms,
                    mechanisms=mechanisms_for(m.kind, m.fixed_hash)))
        for label, want in plan.certs:
            assert want.cert_pem is not None
            steps.append(self.tokens.cert_step(label, want.ckaid, want.cert_pem))
        self.tokens.apply(steps)

    # ------------------------------------------------------------ the renewal's steps

    def staged(self, tpm: TpmProvider, name: str, key_file: Path) -> str:
        """Link a freshly staged key under ``<label>.next``; return that label.

        Replaces whatever waited there before, in the same transaction.
        """
        view = self._token_view(tpm)
        material = _material(key_file)
        want = _Wanted(material=material, ckaid=ckaid_for(material.spki_der),
                       version=key_file.name.split(".")[0], path=key_file)
        staging = self.staging_label(name)
        plan = _Plan(steps=[self.tokens.delete_step(o) for o in view.labelled(staging)],
                     links=[(staging, want)])
        self._execute(tpm, view, plan)
        log.info("%s: linked the new key (version %s) into PKCS#11 token %r as %r", name,
                 want.version, self.settings.token, staging)
        return staging

    def committed(self, tpm: TpmProvider | None, name: str, store: Store) -> list[str]:
        """After the store's commit: the new key and certificate under the label (one transaction)."""
        return self._sync_one(tpm, store, name, view=self._token_view(tpm))

    def abandoned(self, name: str) -> None:
        """A renewal was rolled back: remove what waits under ``<label>.next``."""
        view = self.tokens.view()
        waiting = view.labelled(self.staging_label(name))
        if waiting:
            self.tokens.apply([self.tokens.delete_step(o) for o in waiting])
            log.info("%s: removed the rolled-back key from PKCS#11 token %r", name,
                     self.settings.token)

    # ------------------------------------------------------------ check, list, sync

    def states(self, store: Store | None) -> list[TokenState]:
        """Each linked identity: its URI and whether the token matches the store (no TPM, no PIN)."""
        view = self.tokens.view() if self.tokens.exists() else StoreView(False, None, ())
        out = []
        for name in self.names():
            label = self.label(name)
            uri = self.uri(name)
            problems: list[str] = []
            current: _Wanted | None = None
            if view.token is None:
                problems.append(f"token {self.settings.token!r} does not exist in "
                                f"{self.settings.store}")
            elif view.token.primary_config != PRIMARY_CONFIG:
                problems.append(f"token {self.settings.token!r} is not one tpmid can link "
                                f"into (primary object {view.token.primary_config})")
            if store is not None:
                try:
                    current = self._wanted_current(store, name)
                    staged = self._wanted_staged(store, name, current)
                except (StoreError, TokenError) as e:
                    problems.append(f"the store's current version cannot be read: {e.message}")
                    current, staged = None, None
                if view.token is not None and not problems:
                    problems += self._plan(view, name, current, staged,
                                           link_staged=False).problems
            keys = [o for o in view.labelled(label, "private")
                    if current is not None and o.tpm_public == current.material.public_blob]
            out.append(TokenState(
                identity=name, label=label, uri=uri, in_step=not problems,
                problems=tuple(problems), version=current.version if current else None,
                pkcs11_id=keys[0].pkcs11_id if keys else None,
                public_key=key_fingerprint(current.material.spki_der) if current else None))
        return out

    def sync(self, tpm: TpmProvider, store: Store, names: Sequence[str] | None = None,
             *, lock_timeout: float = 0) -> list[str]:
        """Make the token what the store says for each linked identity; what was done.

        Creates the token when it does not exist (``pkcs11.so_pin``). An identity
        another process is renewing is skipped (its own commit brings it in step).
        """
        view = self._token_view(tpm)
        done: list[str] = []
        for name in (self.names() if names is None else list(names)):
            try:
                with store.identity_lock(name, wait=lock_timeout > 0,
                                         timeout=lock_timeout or None):
                    done += self._sync_one(tpm, store, name, view=view)
                    view = self.tokens.view()
            except StoreError as e:
                if isinstance(e, TokenError):
                    raise
                done.append(f"{name}: not synchronised: {e.message}")
        return done

    def _sync_one(self, tpm: TpmProvider | None, store: Store, name: str, *,
                  view: StoreView) -> list[str]:
        current = self._wanted_current(store, name)
        staged = self._wanted_staged(store, name, current)
        plan = self._plan(view, name, current, staged)
        if plan.empty:
            return []
        self._execute(tpm, view, plan)
        lines = [f"{name}: {n}" for n in plan.notes]
        for line in lines:
            log.info("PKCS#11 token %r: %s", self.settings.token, line)
        return lines


def _key_pem(want: _Wanted) -> bytes:
    try:
        return want.path.read_bytes()
    except OSError as e:
        raise StoreError(f"cannot read key file {want.path}: {e.strerror}") from e


def _material(path: Path) -> KeyMaterial:
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise StoreError(f"cannot read key file {path}: {e.strerror}") from e
    return key_file_material(pem)


def token_checks(mirror: TokenMirror, store: Store | None) -> list[CheckResult]:
    """``tpmid check``: one result per linked identity, "is its URI right?" (no TPM, no PIN)."""
    try:
        states = mirror.states(store)
    except TokenError as e:
        return [CheckResult("PKCS#11 token", False, e.message, e.hint)]
    out = []
    for st in states:
        name = f"{st.identity}: PKCS#11 token"
        if st.in_step:
            out.append(CheckResult(name, True, f"{st.uri} names the key of version {st.version} "
                                               "and the token holds its certificate"))
        else:
            out.append(CheckResult(name, False, "out of step with the store: "
                                   + "; ".join(st.problems),
                                   "run `tpmid pkcs11 sync` (it makes the token what the "
                                   "store says)"))
    return out
