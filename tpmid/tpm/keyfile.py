"""Key files: signing keys under the storage root key, kept as TSS2 PRIVATE KEY PEM.

The format of tpm2-tss-engine and tpm2-openssl (draft-bottomley-tpm2-keys), so
OpenSSL's tpm2 provider can use them too. The private part is encrypted by the
TPM: a key file is useless on any other TPM or after TPM2_Clear. The parent
field is TPM_RH_OWNER (0x40000001): whoever loads the file re-creates the ECC
P-256 storage primary (:func:`~tpmid.tpm.templates.storage_parent_template`)
or uses a persistent SRK made from that template.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from tpm2_pytss.constants import ESYS_TR, TPM2_RC, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE, TPM2B_TEMPLATE

from tpmid.errors import KeyMismatchError, KeyUnavailableError, StoreError, TpmError
from tpmid.tpm.context import TpmContext
from tpmid.tpm.idevid import read_persistent_public
from tpmid.tpm.loaded import LoadedKey, flush_transient
from tpmid.tpm.rc import is_code, tpm_call
from tpmid.tpm.specs import OWNER_PERSISTENT_FIRST, PARENT_OWNER, SRK_HANDLE
from tpmid.tpm.templates import describe_public, file_key_template, storage_parent_template, template_fields

log = logging.getLogger(__name__)


def _create_storage_parent(tpm: TpmContext) -> ESYS_TR:
    scope = tpm.parent_scope
    if scope is not None and scope.get("primary") is not None:
        return scope["primary"]
    template = storage_parent_template()
    with tpm.creating("the storage root key", template=template), \
            tpm_call("re-creating the storage root key (ECC P-256 primary in the owner hierarchy)",
                     tpm, handles=("the owner hierarchy",)):
        handle, _, _, _, _ = tpm.esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
    tpm.track(handle, "the storage root key")
    if scope is not None:
        scope["primary"] = handle
    return handle


def _release_storage_parent(tpm: TpmContext, handle: ESYS_TR) -> None:
    """Flush a re-created storage parent, unless a :func:`storage_parent_scope` keeps it."""
    scope = tpm.parent_scope
    if scope is not None and scope.get("primary") is handle:
        return
    flush_transient(tpm, handle, "the storage root key")


def _persistent_srk_usable(tpm: TpmContext) -> bool:
    """A persistent SRK at 0x81000001 made from the standard storage template exists."""
    scope = tpm.parent_scope
    if scope is not None and "srk" in scope:
        return bool(scope["srk"])
    srk = read_persistent_public(tpm, SRK_HANDLE)
    usable = srk is not None and template_fields(srk) == template_fields(storage_parent_template())
    if scope is not None:
        scope["srk"] = usable
    return usable


@contextlib.contextmanager
def storage_parent_scope(tpm: TpmContext) -> Iterator[None]:
    """Keep the re-created storage parent loaded for the key-file work inside the block.

    One enrollment creates a key file, loads it and (for re-enrollment) loads the
    current one: without a scope each re-creates the ECC storage primary. The
    scope holds one of the TPM's transient slots until it ends, when the parent
    is flushed; nested scopes share the outer one.
    """
    if tpm.parent_scope is not None:
        yield
        return
    tpm.parent_scope = {}
    try:
        yield
    finally:
        scope, tpm.parent_scope = tpm.parent_scope, None
        if scope.get("primary") is not None:
            flush_transient(tpm, scope["primary"], "the storage root key")


def create_key_file(tpm: TpmContext, alg: str) -> bytes:
    """Create a signing key under the storage root key; return it as TSS2 PRIVATE KEY PEM.

    The parent field is TPM_RH_OWNER (0x40000001): whoever loads it re-creates
    the ECC P-256 storage primary (:func:`storage_parent_template`), as
    tpm2-openssl does. The private part is encrypted by the TPM; the file is
    useless on any other TPM or after TPM2_Clear.
    """
    template = file_key_template(alg)
    with tpm.lock:
        parent = _create_storage_parent(tpm)
        try:
            with tpm_call(f"creating a {alg} key under the storage root key", tpm,
                          handles=("the storage root key",)):
                private, public, _, _, _ = tpm.esapi.create(
                    parent, TPM2B_SENSITIVE_CREATE(), template)
        finally:
            _release_storage_parent(tpm, parent)
    pem = TSSPrivKey(private, public, empty_auth=True, parent=PARENT_OWNER).to_pem()
    return bytes(pem)


def create_loaded_key_file(tpm: TpmContext, alg: str) -> tuple[bytes, LoadedKey]:
    """Like :func:`create_key_file`, but the new key also stays loaded for signing.

    One TPM2_CreateLoaded instead of TPM2_Create + TPM2_Load (TPM 2.0 Part 3
    §12.9); a TPM without that command (TPM_RC_COMMAND_CODE) gets the two. The
    caller closes the returned key.
    """
    template = file_key_template(alg)
    with tpm.lock:
        parent = _create_storage_parent(tpm)
        try:
            with tpm_call(f"creating a {alg} key under the storage root key", tpm,
                          handles=("the storage root key",)):
                try:
                    with tpm.creating("a new key-file key", template=template):
                        handle, private, public = tpm.esapi.create_loaded(
                            parent, TPM2B_SENSITIVE_CREATE(),
                            TPM2B_TEMPLATE(template.publicArea.marshal()))
                    tpm.track(handle, "a new key-file key")
                except Exception as e:
                    if not is_code(e, TPM2_RC.COMMAND_CODE):
                        raise
                    handle = None
        finally:
            _release_storage_parent(tpm, parent)
    if handle is None:
        pem = create_key_file(tpm, alg)
        return pem, load_key_file(tpm, pem)
    pem = TSSPrivKey(private, public, empty_auth=True, parent=PARENT_OWNER).to_pem()
    try:
        return bytes(pem), LoadedKey(tpm, handle, public, transient=True,
                                     description="key-file key")
    except BaseException:
        flush_transient(tpm, handle, "the key-file key")
        raise


def _parse_key_file(pem: bytes) -> Any:
    try:
        return TSSPrivKey.from_pem(pem)
    except Exception as e:  # asn1/base64/unmarshal errors of every kind
        raise StoreError(f"not a usable TSS2 PRIVATE KEY file: {e}",
                         hint="enroll the identity again: a new key comes with the new "
                         "certificate") from e


def load_key_file(tpm: TpmContext, pem: bytes) -> LoadedKey:
    """Load a TSS2 PRIVATE KEY PEM; the parent is flushed as soon as the key is loaded.

    For parent 0x40000001 a persistent SRK at 0x81000001 with the standard
    template is tried first (no key generation needed), then the storage primary
    is re-created. A key file from before TPM2_Clear can never load again: that
    is reported as such.
    """
    tss = _parse_key_file(pem)
    public = tss.public
    attrs = public.publicArea.objectAttributes
    if attrs & TPMA_OBJECT.DECRYPT or not attrs & TPMA_OBJECT.SIGN_ENCRYPT:
        raise KeyMismatchError(f"the key file holds {describe_public(public)}; tpmid only uses "
                               "signing keys without decrypt")
    if not tss.empty_auth:
        raise TpmError("the key file needs a key password, which tpmid does not support",
                       hint="create the key with `tpmid key create`")
    with tpm.lock:
        esapi = tpm.esapi
        parents: list[tuple[str, bool]] = []  # (how, transient)
        if tss.parent == PARENT_OWNER:
            scope = tpm.parent_scope
            if scope is not None and scope.get("primary") is not None:
                # The storage primary is loaded already (this enrollment made a key under
                # it): it is the key a standard persistent SRK would be. No lookup.
                parents.append(("primary", True))
            elif _persistent_srk_usable(tpm):
                parents += [("persistent", False), ("primary", True)]
            else:
                parents.append(("primary", True))
        elif OWNER_PERSISTENT_FIRST <= tss.parent <= 0x81FFFFFF:
            parents.append(("handle", False))
        else:
            raise TpmError(f"the key file names parent {tss.parent:#x}, which tpmid cannot load "
                           "under (expected 0x40000001 or a persistent handle)")
        last: TpmError | None = None
        for how, transient in parents:
            if how == "primary":
                parent_tr = _create_storage_parent(tpm)
            else:
                number = SRK_HANDLE if how == "persistent" else tss.parent
                parent_tr = tpm.open_handle(number, f"parent key {number:#010x}")
            try:
                with tpm.creating("a key-file key", public=public), \
                        tpm_call("loading the key file", tpm, handles=("the parent key",)):
                    handle = esapi.load(parent_tr, tss.private, public)
                tpm.track(handle, "a key-file key")
            except TpmError as e:
                if is_code(e, TPM2_RC.INTEGRITY):
                    last = e
                    continue
                raise
            finally:
                if transient:
                    _release_storage_parent(tpm, parent_tr)
                else:
                    tpm.close_handle(number, parent_tr)
            try:
                return LoadedKey(tpm, handle, public, transient=True, description="key-file key")
            except BaseException:
                flush_transient(tpm, handle, "the key-file key")
                raise
        assert last is not None
        raise KeyUnavailableError(
            "the key file does not belong to this TPM's current storage root key: it was made "
            "before a TPM clear (or on another TPM), and can never be loaded again",
            rc=last.rc,
            hint="the identity must be re-enrolled: a new key comes with the new certificate",
        ) from last
