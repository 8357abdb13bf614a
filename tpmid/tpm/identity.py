"""One type per kind of identity key: :class:`IdentityKey`.

An identity's key is kept in one of three ways (``key.kind`` in the config):

* :class:`PersistentIdevid` — a TCG IDevID made persistent at ``key.handle``;
* :class:`EkDerivedIdevid` — the same template, re-created from the endorsement
  seed whenever it is needed (nothing is stored);
* :class:`KeyFile` — a signing key under the storage root key, kept as a TSS2
  key file in the store, one per certificate version (LDevID, Edge CA).

:func:`identity_key` builds the right class from an identity's config; it is
the only place in tpmid that looks at the kind. Everything else asks the key:
how to open it, whether to create it, how to remove it, how to describe it,
whether tpmid renews it. Adding a kind (a PKCS#11 object, an attestation key) is
one class here.

This module does not import the TPM stack: describing keys (``tpmid status``)
costs nothing. The TPM work happens through the :class:`TpmConnection` passed
to each method.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from cryptography.hazmat.primitives.serialization import Encoding

from tpmid.certfiles import spki_der
from tpmid.config import IdentityConfig, KeyConfig
from tpmid.errors import (
    ConfigError,
    KeyMismatchError,
    KeyUnavailableError,
    StoreError,
    TpmidError,
)
from tpmid.tpm.specs import IDEVID_TEMPLATE_ALGS, KEY_SPECS

if TYPE_CHECKING:
    from cryptography import x509

    from tpmid.tpm.attest import AttestationKey
    from tpmid.tpm.connection import TpmConnection
    from tpmid.tpm.loaded import LoadedKey


@dataclass(frozen=True)
class Ensured:
    """What :meth:`IdentityKey.ensure` found or did."""

    created: bool  # this call made the key (a rollback removes it again)
    action: str  # "created" | "kept" | "derived" (the manifest's idevid_key_action)
    status: str  # one line for the operator
    public_der: bytes | None = None  # SubjectPublicKeyInfo, when ensuring read it anyway


@dataclass(frozen=True)
class NewKey:
    """The key a new certificate will certify (:meth:`IdentityKey.for_new_certificate`)."""

    loaded: LoadedKey
    key_file: bytes | None  # a new TSS2 key file to stage in the store, None otherwise


def spki_of(cert: x509.Certificate) -> bytes:
    """The certificate's SubjectPublicKeyInfo, DER."""
    return spki_der(cert.public_key())


class IdentityKey(ABC):
    """How one identity's key lives in the TPM (see the module docstring)."""

    kind: ClassVar[str]
    #: An IDevID: in the endorsement hierarchy, certified at manufacturing (TCG DevID §7.3).
    birth: ClassVar[bool] = False
    #: tpmid renews the identity over EST, with a new key per version when ``rotate_key``.
    renewable: ClassVar[bool] = False
    #: ``tpmid provision --adopt`` can take over a vendor-made key of this kind.
    adoptable: ClassVar[bool] = False
    #: What the provisioning manifest records for a key that is already in place.
    reuse_action: ClassVar[str] = "kept"
    #: A new key may be of another algorithm than ``key.alg`` when the EST server's CSR
    #: attributes ask for one (RFC 7030 §4.5); an IDevID never changes algorithm.
    chooses_alg: ClassVar[bool] = False
    #: The key may come from the EST server (RFC 7030 §4.4) and be imported into the TPM.
    server_keygen: ClassVar[bool] = False
    #: The key can be linked into a tpm2-pkcs11 token (``pkcs11``): a key file under
    #: the storage parent the token's transient primary is re-created from.
    linkable: ClassVar[bool] = False

    def __init__(self, name: str, config: KeyConfig) -> None:
        self.name = name
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.describe()})"

    # ------------------------------------------------------------ description

    @property
    @abstractmethod
    def alg(self) -> str:
        """``ecc-p256``, ``ecc-p384`` or ``rsa-2048``."""

    @property
    def hash_name(self) -> str:
        """The one hash the key signs with."""
        return KEY_SPECS[self.alg].hash_name

    @property
    def handle(self) -> int | None:
        """The persistent handle, for keys that have one."""
        return None

    @property
    def template(self) -> str | None:
        """The TCG IDevID template (H-1/H-2/H-3), for IDevIDs."""
        return None

    @abstractmethod
    def describe(self) -> str:
        """Where the key lives, in a few words (``persistent H-2 at 0x81020000``)."""

    def facts(self) -> dict[str, Any]:
        """JSON-ready description (``tpmid status --json``, ``tpmid key show``)."""
        return {
            "kind": self.kind,
            "description": self.describe(),
            "handle": f"{self.handle:#010x}" if self.handle is not None else None,
            "template": self.template,
            "alg": self.alg,
        }

    def reset_note(self) -> str:
        """What ``tpmid reset --include-idevid`` does to this key, for its listing."""
        return ""

    # ------------------------------------------------------------ attestation key

    @property
    def has_iak(self) -> bool:
        """True when an IAK lives with this key (``key.iak``)."""
        return self.config.iak

    def open_iak(self, tpm: TpmConnection) -> AttestationKey:
        """The IAK that lives with this IDevID, ready to sign (the caller closes it)."""
        raise ConfigError(f"{self.name} has no IAK (key.iak is not set)")

    def ensure_iak(self, tpm: TpmConnection) -> str:
        """Create (or find) the IAK with this IDevID; one line for the operator."""
        raise ConfigError(f"{self.name} has no IAK (key.iak is not set)")
    def link_refusal(self) -> str:
        """Why this key cannot be a PKCS#11 token object ("" when it can)."""
        return ""

    # ------------------------------------------------------------ TPM

    @abstractmethod
    def open(self, tpm: TpmConnection, key_file: Path | None = None) -> LoadedKey:
        """The key, ready to sign; the caller closes it.

        ``key_file`` is the store's key file of the version in use (file keys
        only; the others ignore it).
        """

    def for_new_certificate(self, tpm: TpmConnection, *, rotate: bool,
                            current_file: Path | None = None, alg: str | None = None) -> NewKey:
        """The key a new certificate will certify: this same key, unless it rotates.

        ``alg`` is the algorithm a new key is made with (:attr:`chooses_alg` kinds
        only; default ``key.alg``).
        """
        return NewKey(self.open(tpm, current_file), None)

    def check_server_keygen(self) -> None:
        """ConfigError unless this kind of key can come from the EST server (RFC 7030 §4.4)."""
        if self.server_keygen:
            return
        raise ConfigError(
            f"{self.name} is {self.describe()}: its key is made in the TPM and never replaced, "
            "so it cannot take a server-generated key",
            hint="server-side key generation (--serverkeygen, est.serverkeygen) is for "
            "key-file identities (key.kind: file)")

    def import_server_key(self, tpm: TpmConnection, key: Any) -> NewKey:
        """Import a server-generated private key (RFC 7030 §4.4) as this identity's new key.

        Only a key-file identity can (:attr:`server_keygen`); the others raise ConfigError.
        """
        self.check_server_keygen()
        raise NotImplementedError  # pragma: no cover - kinds with server_keygen override it

    @abstractmethod
    def ensure(self, tpm: TpmConnection, *, force: bool = False,
               current_file: Path | None = None) -> Ensured:
        """Make sure the key exists (``tpmid key create``, provisioning); idempotent."""

    def removal(self) -> str | None:
        """What :meth:`remove` would delete from the TPM, None if nothing.

        ConfigError when the key cannot be removed on its own.
        """
        return None

    def remove(self, tpm: TpmConnection) -> str:
        """Delete the key from the TPM; return what was done."""
        return "nothing to delete: the key is not stored in the TPM"

    def present(self, tpm: TpmConnection) -> bool:
        """True when the key can be opened without being created first."""
        return True

    def inspect(self, tpm: TpmConnection, key_file: Path | None = None) -> tuple[LoadedKey, str]:
        """Open the key and check what ``tpmid check`` checks; return it and a description.

        KeyMismatchError when the key is not what the config says (wrong
        template, or the ``decrypt`` attribute an identity key must never have,
        TCG DevID §7.3.4.1 Table 3).
        """
        key = self._open_for_inspection(tpm, key_file)
        try:
            if key.can_decrypt:
                raise KeyMismatchError(
                    f"{key.description} is {key.describe()}: it has the decrypt attribute, "
                    "which an identity key must not have",
                    hint=self._recreate_hint())
            self._check_template(key)
            return key, self._inspected(key, key_file)
        except BaseException:
            key.close()
            raise

    def public_key_der(self, tpm: TpmConnection, key_file: Path | None = None) -> bytes:
        """The key's SubjectPublicKeyInfo (the key is opened and closed again)."""
        with self.open(tpm, key_file) as key:
            return key.public_key_der()

    def restore(self, tpm: TpmConnection, cert: x509.Certificate) -> list[str]:
        """Make the key of ``cert`` usable again after TPM2_Clear, if that is possible.

        Returns what was done (empty: nothing was missing, or nothing can be done:
        a key file made under the old storage seed is lost for good). An IDevID
        re-derives from its template; a persistent one is persisted again and the
        NV copy of its certificate (``key.cert_nv``) rewritten, both with owner
        authorization (``tpm.auth.owner``). Raises KeyMismatchError when the key
        that comes back is not the certificate's.
        """
        return []

    # ------------------------------------------------------------ for subclasses

    def _open_for_inspection(self, tpm: TpmConnection, key_file: Path | None) -> LoadedKey:
        return self.open(tpm, key_file)

    def _check_template(self, key: LoadedKey) -> None:
        return None

    def _inspected(self, key: LoadedKey, key_file: Path | None) -> str:
        return f"{self.describe()}: {key.describe()}, sign only"

    def _recreate_hint(self) -> str:
        return f"recreate the key: tpmid key create {self.name} --force, then enroll again"


class _Idevid(IdentityKey):
    """What the two IDevID placements share: a TCG template in the endorsement hierarchy."""

    def restore(self, tpm: TpmConnection, cert: x509.Certificate) -> list[str]:
        index = self.config.cert_nv
        if index is None or index in tpm.nv_indices():
            return []
        spki = spki_of(cert)
        tpm.write_certificate_nv(index, cert.public_bytes(Encoding.DER), same_key_spki=spki)
        return [f"wrote the IDevID certificate to NV index {index:#010x} again (it was gone: "
                "TPM2_Clear deletes the owner's NV indices)"]

    birth = True

    def link_refusal(self) -> str:
        return ("an IDevID lives in the endorsement hierarchy (a persistent or re-derived "
                "primary key), and tpm2-pkcs11 1.9 can link only key files made under a "
                "storage parent into a token")

    @property
    def alg(self) -> str:
        return IDEVID_TEMPLATE_ALGS[self.config.template]

    @property
    def template(self) -> str:
        return self.config.template

    def _check_template(self, key: LoadedKey) -> None:
        if key.template != self.template:
            raise KeyMismatchError(
                f"{key.description} is {key.describe()}, not an IDevID from template "
                f"{self.template}",
                hint="fix key.template in the config, or re-provision the device")


class PersistentIdevid(_Idevid):
    """An IDevID made persistent at ``key.handle`` with TPM2_EvictControl."""

    kind = "persistent"
    adoptable = True

    @property
    def handle(self) -> int:
        return self.config.handle

    def describe(self) -> str:
        return f"persistent {self.template} at {self.handle:#010x}"

    def reset_note(self) -> str:
        return (f"evicts the persistent IDevID key {self.handle:#010x} (if present); every "
                "certificate for it becomes useless")

    def open(self, tpm: TpmConnection, key_file: Path | None = None) -> LoadedKey:
        try:
            return tpm.open_persistent(self.handle, expect_template=self.template)
        except TpmidError as e:
            raise self._named(e) from None

    def _open_for_inspection(self, tpm: TpmConnection, key_file: Path | None) -> LoadedKey:
        # Without the expected template, so that the message can say what is there.
        try:
            return tpm.open_persistent(self.handle)
        except TpmidError as e:
            raise self._named(e) from None

    def ensure(self, tpm: TpmConnection, *, force: bool = False,
               current_file: Path | None = None) -> Ensured:
        res = tpm.persist_idevid(self.template, self.handle, force=force)
        what = "created" if res.created else "kept the existing"
        return Ensured(created=res.created, action="created" if res.created else "kept",
                       status=f"{what} {self.template} IDevID at {self.handle:#010x}",
                       public_der=res.public_der)

    def open_iak(self, tpm: TpmConnection) -> AttestationKey:
        if not self.has_iak:
            return super().open_iak(tpm)
        return tpm.open_persistent_iak(self.config.iak_handle)

    def ensure_iak(self, tpm: TpmConnection) -> str:
        if not self.has_iak:
            return super().ensure_iak(tpm)
        created = tpm.persist_iak(self.config.iak_handle)
        return (f"{'created' if created else 'kept the existing'} IAK at "
                f"{self.config.iak_handle:#010x}")

    def removal(self) -> str:
        return f"the persistent key {self.handle:#010x} of {self.name}"

    def remove(self, tpm: TpmConnection) -> str:
        if self.handle not in tpm.persistent_handles():
            return f"no key at {self.handle:#010x} to evict"
        tpm.evict(self.handle)
        return f"evicted the persistent key {self.handle:#010x}"

    def present(self, tpm: TpmConnection) -> bool:
        return self.handle in tpm.persistent_handles()

    def restore(self, tpm: TpmConnection, cert: x509.Certificate) -> list[str]:
        done = []
        if not self.present(tpm):
            try:
                tpm.persist_idevid(self.template, self.handle, expect_spki=spki_of(cert))
            except TpmidError as e:
                e.message = f"cannot restore {self.name}'s persistent IDevID: {e.message}"
                raise
            done.append(f"persisted the IDevID key at {self.handle:#010x} again: the TPM "
                        f"re-derived it from template {self.template} and it is the key of the "
                        "stored certificate (the TPM was cleared: TPM2_Clear evicts the "
                        "owner's persistent keys)")
        return done + super().restore(tpm, cert)

    def _named(self, e: TpmidError) -> TpmidError:
        """The same error with a hint that names this identity."""
        if isinstance(e, KeyMismatchError):
            e.hint = (f"fix key.template in the config, or recreate the key with "
                      f"`tpmid key create {self.name} --force`")
        elif isinstance(e, KeyUnavailableError):
            e.identity = self.name
            e.hint = (f"`tpmid renew` of an identity it authenticates (or the daemon) persists "
                      f"it again; by hand: `tpmid key create {self.name}` — its certificate "
                      "still verifies when the TPM re-derives the same key")
        return e


class EkDerivedIdevid(_Idevid):
    """An IDevID re-created from the endorsement seed whenever it is needed."""

    kind = "ek-derived"
    reuse_action = "derived"

    def describe(self) -> str:
        return f"ek-derived {self.template}"

    def reset_note(self) -> str:
        return ("the ek-derived key itself cannot be removed: the TPM re-creates it from the "
                "endorsement seed")

    def open(self, tpm: TpmConnection, key_file: Path | None = None) -> LoadedKey:
        return tpm.derive_idevid(self.template)

    def open_iak(self, tpm: TpmConnection) -> AttestationKey:
        if not self.has_iak:
            return super().open_iak(tpm)
        return tpm.derive_iak()

    def ensure_iak(self, tpm: TpmConnection) -> str:
        if not self.has_iak:
            return super().ensure_iak(tpm)
        return "ek-derived IAK: re-created from the endorsement hierarchy whenever it is needed"

    def ensure(self, tpm: TpmConnection, *, force: bool = False,
               current_file: Path | None = None) -> Ensured:
        return Ensured(created=False, action="derived",
                       status=f"ek-derived {self.template} IDevID: re-created from the "
                       "endorsement hierarchy whenever it is needed; nothing to store")


class KeyFile(IdentityKey):
    """A signing key under the storage root key, one TSS2 key file per certificate version."""

    kind = "file"
    renewable = True
    chooses_alg = True
    server_keygen = True
    linkable = True

    def __init__(self, name: str, config: KeyConfig) -> None:
        super().__init__(name, config)
        if config.cert_nv is not None:
            raise ConfigError(f"identities.{name}.key.cert_nv: only an IDevID (kind persistent "
                              "or ek-derived) keeps a copy of its certificate in NV")

    @property
    def alg(self) -> str:
        return self.config.alg

    def describe(self) -> str:
        return f"file {self.alg}"

    def open(self, tpm: TpmConnection, key_file: Path | None = None) -> LoadedKey:
        pem = self._read(key_file)
        try:
            loaded = tpm.load_key_file(pem)
        except KeyUnavailableError as e:
            e.identity = self.name
            e.hint = (f"`tpmid renew {self.name}` (or the daemon) enrolls it again with a new "
                      f"key through its bootstrap identity; by hand: tpmid reset {self.name} "
                      f"--yes && tpmid enroll {self.name}")
            raise
        except StoreError as e:
            e.hint = (f"enroll {self.name} again with a new key: tpmid reset {self.name} --yes "
                      f"&& tpmid enroll {self.name}")
            raise
        # key.alg is the algorithm of *new* keys: a version's key may be another one the
        # EST server asked for (CSR attributes, server-side key generation); what matters
        # is that it is the key of its certificate, which every user of it checks.
        return loaded

    def for_new_certificate(self, tpm: TpmConnection, *, rotate: bool,
                            current_file: Path | None = None, alg: str | None = None) -> NewKey:
        if not rotate and current_file is not None:
            return NewKey(self.open(tpm, current_file), None)
        pem, loaded = tpm.create_key_file(alg or self.alg)
        return NewKey(loaded, pem)

    def import_server_key(self, tpm: TpmConnection, key: Any) -> NewKey:
        pem, loaded = tpm.import_key_file(key)
        return NewKey(loaded, pem)

    def ensure(self, tpm: TpmConnection, *, force: bool = False,
               current_file: Path | None = None) -> Ensured:
        # A file key belongs to one certificate version; enrollment makes both.
        if current_file is None:
            raise StoreError(
                f"identity {self.name!r} is not enrolled, so it has no key file yet",
                hint=f"file keys are created together with their certificate: "
                f"`tpmid enroll {self.name}`")
        return Ensured(created=False, action="kept",
                       status=f"kept the key of the current certificate ({current_file})")

    def removal(self) -> str | None:
        raise ConfigError(
            f"{self.name} uses a key file that belongs to its certificate; deleting the key "
            "alone would leave a certificate without a key",
            hint=f"`tpmid reset {self.name}` removes the identity with its keys")

    def present(self, tpm: TpmConnection) -> bool:
        return False

    def _inspected(self, key: LoadedKey, key_file: Path | None) -> str:
        where = f" ({key_file})" if key_file is not None else ""
        return f"key file{where} loads: {key.describe()}, sign only"

    def _recreate_hint(self) -> str:
        return f"enroll again with a new key: tpmid reset {self.name} --yes && tpmid enroll {self.name}"

    def _read(self, key_file: Path | None) -> bytes:
        if key_file is None:
            raise StoreError(f"{self.name} has no key file in the store (not enrolled)",
                             hint=f"enroll it: tpmid enroll {self.name}")
        try:
            return key_file.read_bytes()
        except OSError as e:
            raise StoreError(f"cannot read the key file of {self.name} ({key_file}): "
                             f"{e.strerror}",
                             hint=f"enroll again: tpmid reset {self.name} --yes && "
                             f"tpmid enroll {self.name}") from e


_KINDS: dict[str, type[IdentityKey]] = {
    "persistent": PersistentIdevid,
    "ek-derived": EkDerivedIdevid,
    "file": KeyFile,
}


@functools.cache
def _build(name: str, config: KeyConfig) -> IdentityKey:
    key = _KINDS[config.kind](name, config)
    if config.iak and not key.birth:
        # TCG DevID §7.3: the IAK is an endorsement-hierarchy key made with the IDevID.
        raise ConfigError(f"identities.{name}.key.iak: an IAK lives with an IDevID (kind "
                          f"persistent or ek-derived), not with a {config.kind} key")
    return key


def identity_key(ident: IdentityConfig) -> IdentityKey:
    """The :class:`IdentityKey` of ``ident`` (built once per identity and key config)."""
    return _build(ident.name, ident.key)
