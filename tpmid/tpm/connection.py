"""The TPM as the rest of tpmid uses it: :class:`TpmConnection`.

A :class:`TpmConnection` is a :class:`~tpmid.tpm.context.TpmContext` (one
ESAPI context, its lock, the hierarchy passwords) plus the operations the
layers above ``tpmid/tpm/`` need: identity keys, endorsement keys, NV
certificates and facts. Everything outside this package goes through these
methods; nothing outside it calls ESAPI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from cryptography import x509
from tpm2_pytss.types import TPM2B_PUBLIC

from tpmid.csr import hardware_module_name
from tpmid.store.ledger import TransientLedger
from tpmid.store.sealed import SealedBlob
from tpmid.tpm import attest, ek, idevid, info, keyfile, nv, sealed, token
from tpmid.tpm.attest import AttestationKey
from tpmid.tpm.context import (
    DEFAULT_COMMAND_TIMEOUT_S,
    DEFAULT_TCTI,
    NO_PASSWORDS,
    PT_MANUFACTURER,
    HierarchyPasswords,
    TpmContext,
)
from tpmid.tpm.ek import EkInfo
from tpmid.tpm.idevid import PersistentResult
from tpmid.tpm.loaded import LoadedKey
from tpmid.tpm.specs import DEFAULT_IDEVID_HANDLE
from tpmid.tpm.token import KeyMaterial

__all__ = ["DEFAULT_TCTI", "HierarchyPasswords", "TpmConnection", "TpmOpener"]


class TpmConnection(TpmContext):
    """One connection to the TPM with tpmid's operations on it.

    Use as a context manager or call :meth:`close`. Every method takes the
    connection's lock and flushes what it loaded, except the
    :class:`~tpmid.tpm.loaded.LoadedKey` objects it returns, which the caller
    closes.
    """

    def __init__(self, tcti: str = DEFAULT_TCTI,
                 passwords: HierarchyPasswords = NO_PASSWORDS, *,
                 timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
                 ledger: TransientLedger | None = None) -> None:
        self._eks: list[EkInfo] | None = None
        super().__init__(tcti, passwords, timeout=timeout, ledger=ledger)

    def __enter__(self) -> TpmConnection:
        return self

    # ------------------------------------------------------------ IDevIDs

    def derive_idevid(self, template: str) -> LoadedKey:
        """Re-create the ``template`` IDevID primary in the endorsement hierarchy (transient)."""
        return idevid.derive_idevid(self, template)

    def open_persistent(self, handle: int, expect_template: str | None = None) -> LoadedKey:
        """The persistent key at ``handle`` (KeyMismatchError if not from ``expect_template``)."""
        return idevid.open_persistent(self, handle, expect_template)

    def persist_idevid(self, template: str, handle: int = DEFAULT_IDEVID_HANDLE, *,
                       force: bool = False, expect_spki: bytes | None = None
                       ) -> PersistentResult:
        """Make the ``template`` IDevID persistent at ``handle``; idempotent."""
        return idevid.create_persistent_idevid(self, template, handle, force=force,
                                               expect_spki=expect_spki)

    def read_persistent_public(self, handle: int) -> TPM2B_PUBLIC | None:
        """The public area at ``handle``, None if the handle is empty."""
        return idevid.read_persistent_public(self, handle)

    def evict(self, handle: int) -> None:
        """Remove the persistent object at ``handle`` (owner authorization)."""
        idevid.evict_persistent(self, handle)

    # ------------------------------------------------------------ attestation key

    def derive_iak(self) -> AttestationKey:
        """Re-create the IAK primary in the endorsement hierarchy (transient)."""
        return attest.derive_iak(self)

    def persist_iak(self, handle: int) -> bool:
        """Make the IAK persistent at ``handle``; False when it already is there."""
        return attest.persist_iak(self, handle)

    def open_persistent_iak(self, handle: int) -> AttestationKey:
        """The persistent IAK at ``handle``."""
        return attest.open_persistent_iak(self, handle)

    def certify(self, key: LoadedKey, iak: AttestationKey,
                qualifying_data: bytes) -> tuple[bytes, bytes, bytes]:
        """TPM2_Certify of ``key`` by ``iak``: (TPMS_ATTEST, TPMT_SIGNATURE, TPMT_PUBLIC)."""
        return attest.certify(self, key, iak, qualifying_data)

    # ------------------------------------------------------------ key files

    def create_key_file(self, alg: str) -> tuple[bytes, LoadedKey]:
        """A new signing key under the storage root key: its TSS2 PEM, and the key loaded."""
        return keyfile.create_loaded_key_file(self, alg)

    def import_key_file(self, key: keyfile.ImportableKey) -> tuple[bytes, LoadedKey]:
        """Import a server-generated private key (RFC 7030 §4.4): its TSS2 PEM, and the key loaded."""
        return keyfile.import_key_file(self, key)

    def load_key_file(self, pem: bytes) -> LoadedKey:
        """Load a TSS2 PRIVATE KEY PEM made by :meth:`create_key_file` (or tpm2-openssl)."""
        return keyfile.load_key_file(self, pem)

    @contextlib.contextmanager
    def storage_parent_scope(self) -> Iterator[None]:
        """Keep the storage parent loaded for the key-file work inside the block."""
        with keyfile.storage_parent_scope(self):
            yield

    # ------------------------------------------------------------ PKCS#11 tokens (tpm2-pkcs11)

    def seal_token_secret(self, data: bytes, auth: bytes) -> tuple[bytes, bytes]:
        """Seal ``data`` under the storage parent (a token's wrapping key); (public, private)."""
        return token.seal_secret(self, data, auth)

    def unseal_token_secret(self, public: bytes, private: bytes, auth: bytes, *,
                            what: str) -> bytes:
        """Unseal a token's sealed object with its PIN-derived ``auth``."""
        return token.unseal_secret(self, public, private, auth, what=what)

    def key_file_material(self, pem: bytes, *, check_loads: bool = True) -> KeyMaterial:
        """A key file as a tpm2-pkcs11 token links it; with ``check_loads``, proven to load here."""
        material = token.key_file_material(pem)
        if check_loads:
            keyfile.load_key_file(self, pem).close()
        return material

    def pss_salt_is_digest_length(self) -> bool:
        """Whether this TPM's RSA-PSS salt is as long as the digest (a token's pss-sigs-good)."""
        return token.pss_salt_is_digest_length(self)

    def algorithm_names(self) -> list[str]:
        """The TPM's algorithms, by tpm2-tools' names."""
        return token.algorithm_names(self)

    def storage_parent_public(self) -> bytes:
        """The re-created storage parent's public area (marshalled TPM2B_PUBLIC)."""
        return token.storage_parent_public(self)

    # ------------------------------------------------------------ sealed secrets

    def seal_secret(self, name: str, value: bytes | bytearray, *, pcr_bank: str = "sha256",
                    pcrs: tuple[int, ...] = (), sealed_at: str) -> SealedBlob:
        """Seal ``value`` to this TPM, optionally to PCRs (:func:`tpmid.tpm.sealed.seal_secret`)."""
        return sealed.seal_secret(self, name, value, pcr_bank=pcr_bank, pcrs=pcrs,
                                  sealed_at=sealed_at)

    def check_sealed_secret(self, blob: SealedBlob) -> None:
        """SealedSecretError if ``blob`` would not open now (PCRs, another TPM); unseals nothing."""
        sealed.check_sealed_secret(self, blob)

    def unseal_secret(self, blob: SealedBlob) -> bytearray:
        """The value of a sealed secret; the caller wipes the bytearray after use."""
        return sealed.unseal_secret(self, blob)

    # ------------------------------------------------------------ EKs, NV, facts

    def eks(self, *, from_certificates: bool = False) -> list[EkInfo]:
        """Every endorsement key tpmid can find, with its certificate if the TPM has one.

        Read once per connection (EKs do not change while one is open), the first
        time in the way asked: ``from_certificates`` reads only the EKs that have a
        certificate, without creating or reading an EK (:func:`tpmid.tpm.ek.read_eks`).
        """
        if self._eks is None:
            self._eks = ek.read_eks(self, from_certificates=from_certificates)
        return self._eks

    def primary_ek(self) -> EkInfo:
        """The EK that identifies the device (:func:`tpmid.tpm.ek.primary_ek`)."""
        return ek.primary_ek(self.eks())

    def hardware_module_name(self) -> tuple[str, bytes]:
        """This TPM's RFC 4108 hardwareModuleName (type OID, serial), from its primary EK."""
        primary = self.primary_ek()
        return hardware_module_name(primary.cert_der, primary.public_key_der,
                                    tpm_manufacturer=self.manufacturer())

    def manufacturer(self) -> int | None:
        """TPM_PT_MANUFACTURER (the vendor's four-letter code as a number)."""
        return self.fixed_property(PT_MANUFACTURER)

    def read_certificate_nv(self, index: int) -> x509.Certificate:
        """The DER certificate kept in NV ``index``."""
        return nv.read_certificate_nv(self, index)

    def write_certificate_nv(self, index: int, der: bytes, *, same_key_spki: bytes) -> bool:
        """Keep ``der`` in NV ``index``; False if it already was there."""
        return nv.write_certificate_nv(self, index, der, same_key_spki=same_key_spki)

    def info(self) -> dict[str, Any]:
        """Facts for ``tpmid tpm info`` (vendor, versions, algorithms, lockout)."""
        return info.tpm_info(self)


TpmOpener = Callable[[], AbstractContextManager[TpmConnection]]
"""Opens the TPM for one piece of work (a command, a renewal): ``with open_tpm() as tpm:``."""


def already_open(tpm: TpmConnection) -> TpmOpener:
    """An opener that lends ``tpm`` itself: its owner keeps it open (and holds any lock).

    For a manufacturing station that owns the TPM for the whole run, and for tests.
    """
    return lambda: contextlib.nullcontext(tpm)
