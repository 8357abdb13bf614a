"""The attestation key (IAK) and TPM2_Certify: evidence that a key lives in this TPM.

The IAK follows TCG "TPM 2.0 Keys for Device Identity and Attestation" v1.00
r12: a restricted ECC P-256 signing key in the endorsement hierarchy made from
the spec's template (:func:`tpmid.tpm.templates.iak_template`). Like the
IDevID it is either re-derived with TPM2_CreatePrimary whenever it is needed
(the same key every time, until TPM2_ChangeEPS) or made persistent.

:func:`certify` runs TPM2_Certify (TPM 2.0 Part 3 §18.2): the IAK signs a
TPMS_ATTEST naming the certified key and carrying the caller's qualifying
data. The certified key is authorised in the ADMIN role with its (empty)
password — the key-file identity keys have no adminWithPolicy — and the IAK in
the USER role (userWithAuth, empty password).
"""

from __future__ import annotations

import logging
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_DATA, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_SIG_SCHEME

from tpmid.errors import KeyMismatchError, TpmError
from tpmid.tpm.context import TpmContext
from tpmid.tpm.idevid import read_persistent_public
from tpmid.tpm.loaded import LoadedKey, flush_transient
from tpmid.tpm.rc import is_code, tpm_call
from tpmid.tpm.specs import OWNER_PERSISTENT_FIRST, OWNER_PERSISTENT_LAST
from tpmid.tpm.templates import iak_template, public_key_from_tpm, template_fields

log = logging.getLogger(__name__)


class AttestationKey:
    """The IAK, ready to sign attestations: transient (flushed on close) or persistent."""

    def __init__(self, tpm: TpmContext, handle: Any, public: TPM2B_PUBLIC, *,
                 transient: bool, tpm_handle: int | None = None) -> None:
        self.tpm = tpm
        self.handle = handle
        self.public = public
        self.transient = transient
        self.tpm_handle = tpm_handle
        self.description = ("the IAK" if transient else f"the IAK at {tpm_handle:#010x}")
        self._closed = False
        if template_fields(public) != template_fields(iak_template()):
            raise KeyMismatchError(f"{self.description} was not made from the TCG IAK template")

    def __enter__(self) -> AttestationKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush a transient IAK; forget a persistent one (it stays in the TPM)."""
        if self._closed:
            return
        self._closed = True
        with self.tpm.lock:
            if self.tpm._esapi is None:
                return
            if self.transient:
                flush_transient(self.tpm, self.handle, self.description)
            elif self.tpm_handle is not None:
                self.tpm.close_handle(self.tpm_handle, self.handle)

    def public_area(self) -> bytes:
        """The IAK's TPMT_PUBLIC, marshalled."""
        return bytes(self.public.publicArea.marshal())

    def public_key_der(self) -> bytes:
        """The IAK's SubjectPublicKeyInfo, DER."""
        return public_key_from_tpm(self.public).public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def derive_iak(tpm: TpmContext) -> AttestationKey:
    """Create the IAK primary from its template in the endorsement hierarchy (transient)."""
    template = iak_template()
    with tpm.lock:
        with tpm.creating("the IAK", template=template), \
                tpm_call("creating the IAK in the endorsement hierarchy", tpm,
                         handles=("the endorsement hierarchy",)):
            handle, public, _, _, _ = tpm.esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
            tpm.track(handle, "the IAK")
        try:
            return AttestationKey(tpm, handle, public, transient=True)
        except BaseException:
            flush_transient(tpm, handle, "the IAK")
            raise


def _check_handle(handle: int) -> None:
    if not OWNER_PERSISTENT_FIRST <= handle <= OWNER_PERSISTENT_LAST:
        raise TpmError(f"{handle:#010x} is not a persistent handle the owner may use",
                       hint="pick a handle such as 0x81020001 (key.iak_handle in the config)")


def persist_iak(tpm: TpmContext, handle: int) -> bool:
    """Make the IAK persistent at ``handle``; False when the same key already is there."""
    _check_handle(handle)
    with tpm.lock:
        existing = read_persistent_public(tpm, handle)
        key = derive_iak(tpm)
        try:
            if existing is not None:
                if bytes(existing.marshal()) == bytes(key.public.marshal()):
                    return False
                raise KeyMismatchError(
                    f"{handle:#010x} already holds another key, not this TPM's IAK",
                    hint="choose another key.iak_handle, or delete that key first")
            with tpm_call(f"persisting the IAK at {handle:#010x}", tpm,
                          handles=("the owner hierarchy", "the IAK")):
                new = tpm.esapi.evict_control(ESYS_TR.OWNER, key.handle, handle)
            tpm.remember_handle(handle, new)
            log.info("IAK persisted at %#010x", handle)
            return True
        finally:
            key.close()


def open_persistent_iak(tpm: TpmContext, handle: int) -> AttestationKey:
    """The persistent IAK at ``handle`` (nothing is loaded)."""
    _check_handle(handle)
    with tpm.lock:
        try:
            tr = tpm.open_handle(handle, f"IAK {handle:#010x}")
        except TpmError as e:
            if is_code(e, TPM2_RC.HANDLE):
                raise KeyMismatchError(
                    f"no IAK at {handle:#010x} (TPM2_Clear removes persistent keys)",
                    hint="provision the device again (tpmid provision) to re-create it") from e
            raise
        try:
            public = tpm.public_of(tr)
            if public is None:
                with tpm_call(f"reading the IAK at {handle:#010x}", tpm):
                    public, _, _ = tpm.esapi.read_public(tr)
            return AttestationKey(tpm, tr, public, transient=False, tpm_handle=handle)
        except BaseException:
            tpm.close_handle(handle, tr)
            raise


def evict_iak(tpm: TpmContext, handle: int) -> None:
    """Remove the persistent IAK at ``handle`` (owner authorization)."""
    _check_handle(handle)
    with tpm.lock:
        tr = tpm.open_handle(handle, f"IAK {handle:#010x}")
        try:
            with tpm_call(f"deleting the IAK at {handle:#010x}", tpm):
                tpm.esapi.evict_control(ESYS_TR.OWNER, tr, handle)
        finally:
            tpm.close_handle(handle, tr, forget=True)


def certify(tpm: TpmContext, key: LoadedKey, iak: AttestationKey,
            qualifying_data: bytes) -> tuple[bytes, bytes, bytes]:
    """TPM2_Certify of ``key`` by ``iak``: (TPMS_ATTEST, TPMT_SIGNATURE, key's TPMT_PUBLIC).

    ``qualifying_data`` goes into TPMS_ATTEST.extraData unchanged (at most 64
    bytes). Keys whose ADMIN role needs a policy (adminWithPolicy) are refused
    here rather than failing inside the TPM.
    """
    if len(qualifying_data) > 64:
        raise TpmError("TPM2_Certify qualifying data is limited to 64 bytes")
    if key.public.publicArea.objectAttributes & TPMA_OBJECT.ADMINWITHPOLICY:
        raise KeyMismatchError(
            f"{key.description} needs a policy session for TPM2_Certify (adminWithPolicy); "
            "tpmid certifies key-file identities (LDevID, Edge CA) only")
    # NULL scheme: the IAK's template fixes ECDSA with SHA-256 (Part 3 §18.2: inScheme
    # must be TPM_ALG_NULL or the key's own scheme).
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
    with tpm.lock, tpm_call(f"certifying {key.description} with the IAK", tpm,
                            handles=(key.description, iak.description)):
        attest, signature = tpm.esapi.certify(key.handle, iak.handle,
                                              TPM2B_DATA(qualifying_data), scheme,
                                              session1=ESYS_TR.PASSWORD,
                                              session2=ESYS_TR.PASSWORD)
    return (bytes(attest), bytes(signature.marshal()),
            bytes(key.public.publicArea.marshal()))
