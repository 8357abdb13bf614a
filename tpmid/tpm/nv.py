"""NV indices: reading them in chunks, and keeping a certificate in one.

EK certificates live in NV indices the TPM manufacturer defined (read by
:mod:`tpmid.tpm.ek`); tpmid can keep a copy of the IDevID certificate in an
index of its own (``tpmid provision --write-nv``), so that a re-imaged disk can
adopt it again. NV reads and writes go in chunks of TPM_PT_NV_BUFFER_MAX bytes.
"""

from __future__ import annotations

import logging

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

from tpmid.der import der_prefix
from tpmid.errors import ConfigError, TpmError, VerificationError
from tpmid.tpm.context import NV_INDEX_FIRST, PT_NV_BUFFER_MAX, TpmContext
from tpmid.tpm.rc import tpm_call
from tpmid.tpm.specs import check_nv_index

log = logging.getLogger(__name__)


def read_nv(tpm: TpmContext, index: int) -> bytes:
    """Read all of NV index ``index``, in chunks of TPM_PT_NV_BUFFER_MAX bytes.

    Authorizes with the index itself when it allows (TPMA_NV_AUTHREAD, empty
    password, as for EK certificates), else with the owner hierarchy.
    """
    with tpm.lock:
        esapi = tpm.esapi
        what = f"NV index {index:#010x}"
        tr = tpm.open_handle(index, what)
        try:
            nv_public = tpm.public_of(tr)  # read when the index was opened
            if nv_public is None:
                with tpm_call(f"reading the public area of {what}", tpm, handles=(what,)):
                    nv_public, _ = esapi.nv_read_public(tr)
            size = int(nv_public.nvPublic.dataSize)
            attrs = nv_public.nvPublic.attributes
            if attrs & TPMA_NV.AUTHREAD:
                auth, auth_name = tr, what
            elif attrs & TPMA_NV.OWNERREAD:
                auth, auth_name = ESYS_TR.OWNER, "the owner hierarchy"
            elif attrs & TPMA_NV.PPREAD:
                auth, auth_name = ESYS_TR.PLATFORM, "the platform hierarchy"
            else:
                raise TpmError(f"{what} cannot be read with a password (policy read only)")
            chunk = tpm.fixed_property(PT_NV_BUFFER_MAX) or 512
            data = bytearray()
            with tpm_call(f"reading {what}", tpm, handles=(auth_name, what)):
                while len(data) < size:
                    n = min(chunk, size - len(data))
                    data += bytes(esapi.nv_read(tr, n, len(data), auth_handle=auth))
            return bytes(data)
        finally:
            tpm.close_handle(index, tr)


# TPMA_NV choice (TPM 2.0 Part 2 §13.4): an ordinary index the owner writes
# (OWNERWRITE) and anyone reads with its empty authValue (AUTHREAD) or the owner
# (OWNERREAD); NO_DA because an empty authValue guards nothing worth locking the
# TPM out for. Not PLATFORMCREATE: TPM2_Clear removes it together with the
# persistent IDevID it certifies. No WRITEDEFINE/WRITELOCKED, so a re-enrollment
# (--force) can update it.
PT_NV_INDEX_MAX = 0x117  # TPM 2.0 Part 2 §6.13: largest NV index data size


def _certifies(data: bytes, spki: bytes) -> bool:
    try:
        cert = x509.load_der_x509_certificate(der_prefix(data))
    except ValueError:
        return False
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == spki


def write_certificate_nv(tpm: TpmContext, index: int, der: bytes, *,
                         same_key_spki: bytes) -> bool:
    """Keep ``der`` in NV ``index`` (owner authorization); return False if it already was.

    An index that holds another certificate for the same key (``same_key_spki``,
    an earlier enrollment) is replaced; an index holding anything else is
    refused with ConfigError, never overwritten. The data is read back and
    compared after writing; an index this call defined is removed again if
    writing fails.
    """
    check_nv_index(index)
    what = f"NV index {index:#010x}"
    with tpm.lock:
        esapi = tpm.esapi
        if index in tpm.handles(NV_INDEX_FIRST):
            old = read_nv(tpm, index)
            if der_prefix(old) == der:
                return False
            if not _certifies(old, same_key_spki):
                raise ConfigError(
                    f"{what} already holds {len(old)} bytes that are not a certificate for "
                    "this IDevID; tpmid does not overwrite it",
                    hint="choose another index with --write-nv, or remove it yourself "
                    "(tpm2_nvundefine) if it is really unused",
                )
            with tpm_call(f"opening {what}", tpm, handles=(what,)):
                tr = esapi.tr_from_tpmpublic(index)
            try:
                with tpm_call(f"removing the old certificate in {what}", tpm,
                              handles=("the owner hierarchy", what)):
                    esapi.nv_undefine_space(tr, auth_handle=ESYS_TR.OWNER)
            except BaseException:
                esapi.tr_close(tr)
                raise
        limit = tpm.properties(PT_NV_INDEX_MAX, 1).get(PT_NV_INDEX_MAX)
        if limit and len(der) > limit:
            raise TpmError(f"the certificate ({len(der)} bytes) is larger than this TPM's "
                           f"largest NV index ({limit} bytes)")
        attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
        public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attrs, authPolicy=b"",
            dataSize=len(der)))
        with tpm_call(f"defining {what}", tpm, handles=("the owner hierarchy",)):
            tr = esapi.nv_define_space(b"", public, auth_handle=ESYS_TR.OWNER)
        try:
            chunk = tpm.fixed_property(PT_NV_BUFFER_MAX) or 512
            with tpm_call(f"writing the certificate to {what}", tpm,
                          handles=("the owner hierarchy", what)):
                for offset in range(0, len(der), chunk):
                    esapi.nv_write(tr, der[offset:offset + chunk], offset,
                                   auth_handle=ESYS_TR.OWNER)
        except BaseException:
            # Leave no half-written index behind (this call defined it).
            try:
                esapi.nv_undefine_space(tr, auth_handle=ESYS_TR.OWNER)  # frees tr too
            except Exception as e:  # the original error matters more
                log.warning("could not remove the half-written %s: %s", what, e)
                esapi.tr_close(tr)
            raise
        # Close before reading back: read_nv opens (and closes) the same ESYS_TR.
        esapi.tr_close(tr)
        if read_nv(tpm, index) != der:
            raise TpmError(f"{what} does not read back what was written",
                           hint="the TPM may be failing; run `tpmid provision` again")
    log.info("wrote the IDevID certificate (%d bytes) to %s", len(der), what)
    return True


def read_certificate_nv(tpm: TpmContext, index: int) -> x509.Certificate:
    """The DER certificate kept in NV ``index`` (padding ignored).

    TpmError when the index does not exist, VerificationError when it holds
    something else.
    """
    if index not in tpm.nv_indices():
        raise TpmError(f"NV index {index:#010x} does not exist: there is no IDevID "
                       "certificate to adopt there",
                       hint="check --cert-nv against where it was written (or the TPM vendor's "
                       "documentation); `tpm2_getcap handles-nv-index` lists the indices")
    data = der_prefix(read_nv(tpm, index))
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise VerificationError(
            f"NV index {index:#010x} does not hold a DER X.509 certificate ({e})",
            hint="check --cert-nv; nothing was stored") from e
