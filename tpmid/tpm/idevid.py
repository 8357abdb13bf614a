"""IDevID keys: created from a TCG template in the endorsement hierarchy.

Two placements (``key.kind`` in the config):

* persistent — made persistent with TPM2_EvictControl (default 0x81020000);
* ek-derived — re-created with TPM2_CreatePrimary every time it is needed. A
  primary key is a deterministic function of the hierarchy seed and the
  template (TPM 2.0 Part 1, primary keys), so it survives power cycles and
  TPM2_Clear (which does not touch the endorsement seed) and changes only with
  TPM2_ChangeEPS. A persistent IDevID re-derives the same way, which is how it
  is restored after a clear.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tpm2_pytss.constants import ESYS_TR, TPM2_RC
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

from tpmid.errors import KeyMismatchError, KeyUnavailableError, TpmError
from tpmid.tpm.context import TpmContext
from tpmid.tpm.loaded import LoadedKey, flush_transient
from tpmid.tpm.rc import is_code, tpm_call
from tpmid.tpm.specs import DEFAULT_IDEVID_HANDLE, OWNER_PERSISTENT_FIRST, OWNER_PERSISTENT_LAST
from tpmid.tpm.templates import (
    describe_public,
    idevid_template,
    public_key_from_tpm,
    template_fields,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PersistentResult:
    """Outcome of :func:`create_persistent_idevid`."""

    handle: int
    created: bool  # False when an identical key was already there
    public: TPM2B_PUBLIC

    @property
    def public_der(self) -> bytes:
        """The key's SubjectPublicKeyInfo, DER."""
        return public_key_from_tpm(self.public).public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _check_owner_handle(handle: int) -> None:
    if not OWNER_PERSISTENT_FIRST <= handle <= OWNER_PERSISTENT_LAST:
        raise TpmError(
            f"{handle:#010x} is not a persistent handle the owner may use "
            f"({OWNER_PERSISTENT_FIRST:#010x}-{OWNER_PERSISTENT_LAST:#010x})",
            hint="pick a handle such as 0x81020000 (key.handle in the config)",
        )


def _open_if_present(tpm: TpmContext, handle: int) -> Any | None:
    """``tpm.open_handle(handle)``, or None when no object is there (TPM_RC_HANDLE).

    One TPM2_ReadPublic instead of listing every persistent handle first.
    """
    try:
        return tpm.open_handle(handle, f"key {handle:#010x}")
    except TpmError as e:
        if is_code(e, TPM2_RC.HANDLE):
            return None
        raise


def read_persistent_public(tpm: TpmContext, handle: int) -> TPM2B_PUBLIC | None:
    """The public area of the object at ``handle``, None if the handle is empty."""
    tr = _open_if_present(tpm, handle)
    if tr is None:
        return None
    try:
        public = tpm.public_of(tr)
        if public is None:
            with tpm_call(f"reading the key at {handle:#010x}", tpm):
                public, _, _ = tpm.esapi.read_public(tr)
    finally:
        tpm.close_handle(handle, tr)
    return public


def derive_idevid(tpm: TpmContext, template: str) -> LoadedKey:
    """Create the IDevID primary from ``template`` in the endorsement hierarchy (transient).

    The same TPM and template always give the same key (until TPM2_ChangeEPS).
    The caller closes the returned key, which flushes it.
    """
    public = idevid_template(template)
    with tpm.lock:
        with tpm.creating(f"the {template} IDevID", template=public), \
                tpm_call(f"creating the {template} IDevID in the endorsement hierarchy", tpm,
                         handles=("the endorsement hierarchy",)):
            handle, out_public, _, _, _ = tpm.esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), public, ESYS_TR.ENDORSEMENT)
            tpm.track(handle, f"the {template} IDevID")
        try:
            return LoadedKey(tpm, handle, out_public, transient=True,
                             description=f"ek-derived {template} IDevID")
        except BaseException:
            flush_transient(tpm, handle, f"the {template} IDevID")
            raise


def create_persistent_idevid(tpm: TpmContext, template: str,
                             handle: int = DEFAULT_IDEVID_HANDLE, *,
                             force: bool = False,
                             expect_spki: bytes | None = None) -> PersistentResult:
    """Make the ``template`` IDevID persistent at ``handle``; idempotent.

    An existing key at ``handle`` that equals the template's re-derivation is
    reused (``created=False``). Anything else there raises KeyMismatchError,
    unless ``force`` — then it is evicted and replaced (its certificates become
    useless). With ``expect_spki`` (restoring the key of an existing certificate)
    a re-derived key with another public key is not persisted: KeyMismatchError.
    """
    _check_owner_handle(handle)
    with tpm.lock:
        existing = read_persistent_public(tpm, handle)
        if existing is not None and not force:
            if template_fields(existing) != template_fields(idevid_template(template)):
                raise KeyMismatchError(
                    f"{handle:#010x} already holds {describe_public(existing)}, not an "
                    f"IDevID from template {template}",
                    hint="use another handle, or --force to destroy that key and replace it",
                )
        key = derive_idevid(tpm, template)
        try:
            if expect_spki is not None and key.public_key_der() != expect_spki:
                raise KeyMismatchError(
                    f"the {template} IDevID this TPM derives is not the key of the stored "
                    "IDevID certificate (the endorsement seed changed, or this is another "
                    "TPM)", hint="the device must be provisioned again (tpmid provision)")
            if existing is not None:
                if bytes(existing.marshal()) == bytes(key.public.marshal()):
                    log.info("IDevID %s already persistent at %#010x", template, handle)
                    return PersistentResult(handle=handle, created=False, public=existing)
                if not force:
                    raise KeyMismatchError(
                        f"{handle:#010x} holds an IDevID from template {template}, but not the "
                        "one this TPM derives now (the endorsement seed changed, or another "
                        "tool made it with a different unique value)",
                        hint="--force replaces it; certificates for the old key become useless",
                    )
                evict_persistent(tpm, handle)
            with tpm_call(f"persisting the {template} IDevID at {handle:#010x}", tpm,
                          handles=("the owner hierarchy", "the new IDevID")):
                new = tpm.esapi.evict_control(ESYS_TR.OWNER, key.handle, handle)
            tpm.remember_handle(handle, new)  # the next open of it costs no ReadPublic
            log.info("IDevID %s persisted at %#010x", template, handle)
            return PersistentResult(handle=handle, created=True, public=key.public)
        finally:
            key.close()


def open_persistent(tpm: TpmContext, handle: int,
                    expect_template: str | None = None) -> LoadedKey:
    """The persistent key at ``handle`` as a :class:`LoadedKey` (nothing is loaded).

    Raises TpmError when the handle is empty (e.g. after TPM2_Clear) and
    KeyMismatchError when ``expect_template`` is given and the key was not made
    from it.
    """
    with tpm.lock:
        tr = _open_if_present(tpm, handle)
        if tr is None:
            raise KeyUnavailableError(
                f"no key at {handle:#010x} — the persistent IDevID is missing (TPM2_Clear "
                "removes every key persisted by the owner)",
                hint="create it again from its template (`tpmid key create` with the identity's "
                "name); the same key comes back, so its certificate verifies again",
            )
        try:
            public = tpm.public_of(tr)
            if public is None:
                with tpm_call(f"reading the key at {handle:#010x}", tpm):
                    public, _, _ = tpm.esapi.read_public(tr)
            if expect_template is not None:
                if template_fields(public) != template_fields(idevid_template(expect_template)):
                    raise KeyMismatchError(
                        f"{handle:#010x} holds {describe_public(public)}, not an IDevID from "
                        f"template {expect_template}",
                        hint="fix key.template in the config, or recreate the key from the "
                        "template (`tpmid key create --force` with the identity's name)",
                    )
            return LoadedKey(tpm, tr, public, transient=False,
                             description=f"persistent key {handle:#010x}", tpm_handle=handle)
        except BaseException:
            tpm.close_handle(handle, tr)
            raise


def evict_persistent(tpm: TpmContext, handle: int) -> None:
    """Remove the persistent object at ``handle`` (TPM2_EvictControl with owner auth)."""
    _check_owner_handle(handle)
    with tpm.lock:
        if handle not in tpm.persistent_handles():
            raise TpmError(f"no key at {handle:#010x} to delete")
        tr = tpm.open_handle(handle, f"key {handle:#010x}")
        try:
            with tpm_call(f"deleting the key at {handle:#010x}", tpm,
                          handles=("the owner hierarchy", f"key {handle:#010x}")):
                tpm.esapi.evict_control(ESYS_TR.OWNER, tr, handle)
        finally:
            # ESAPI keeps its record of the evicted object; a stale record would make
            # the next TR_FromTPMPublic of this handle fail (name mismatch).
            tpm.close_handle(handle, tr, forget=True)
    log.info("evicted persistent key %#010x", handle)
