"""Secrets sealed to this TPM: :func:`seal_secret` and :func:`unseal_secret`.

A sealed secret must survive TPM2_Clear (an owner's reset of the TPM), so it
cannot depend on anything TPM2_Clear changes. TPM 2.0 Part 3 §24.6: TPM2_Clear
changes the storage primary seed and the *proof values of both the storage and
the endorsement hierarchies*, and flushes the persistent objects of both. So a
keyedhash object created under an endorsement-hierarchy storage primary does not
survive it (its private part no longer passes the parent's integrity check:
TPM_RC_INTEGRITY, seen on swtpm), nor does a persistent copy of it; owner NV
indices are deleted. What survives is the endorsement primary seed (EPS), and
every primary key derived from it and a template.

So a secret is sealed to a primary key, not stored in one:

* the sealing key is an ECC P-256 decryption primary in the endorsement
  hierarchy, derived from the EPS and :func:`sealing_key_template` (whose
  ``authPolicy`` is the PolicyPCR digest when the secret is bound to PCRs, and
  which then has no ``userWithAuth``: only that policy can use it);
* sealing is ECIES (SEC 1 §5.1) done in software against the key's public
  point: an ephemeral ECDH share, HKDF-SHA256, AES-256-GCM. The secret never
  goes to the TPM, and the blob (:class:`~tpmid.store.sealed.SealedBlob`)
  is useless without this TPM's private key;
* unsealing asks the TPM for the ECDH shared point (TPM2_ECDH_ZGen) through a
  session that is salted with the sealing key and has ``encrypt`` set, so the
  shared secret crosses the bus encrypted (TPM 2.0 Part 1 §21, parameter
  encryption); for a PCR-bound secret the session is the policy session that
  satisfies TPM2_PolicyPCR, which the TPM refuses once a PCR changed.

The same primary comes back after TPM2_Clear (same EPS, same template); a
change of the EPS (TPM2_ChangeEPS, a new TPM) loses every sealed secret, which
is reported as such. See docs/sealed-secrets.md.

Each function loads one transient object (the sealing key), recorded in the
ledger and flushed in ``finally``, and one session, flushed in ``finally``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_ECC, TPM2_RC, TPM2_SE, TPMA_OBJECT, TPMA_SESSION
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_ECC_POINT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
)

from tpmid.errors import SealedSecretError, TpmError
from tpmid.store.sealed import SealedBlob
from tpmid.tpm.context import TpmContext
from tpmid.tpm.loaded import flush_transient
from tpmid.tpm.rc import is_code, tpm_call

log = logging.getLogger(__name__)

# The template's unique field: keeps the sealing key apart from any other
# endorsement primary made from the same attributes (TPM 2.0 Part 1 §27.7.2).
SEALING_UNIQUE = b"tpmid sealed secrets"
HKDF_INFO = b"tpmid sealed secret v1"
MAX_SECRET_BYTES = 4096
_BANKS = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}
_KEY = "the sealing key (endorsement hierarchy)"


def sealing_key_template(policy: bytes = b"") -> TPM2B_PUBLIC:
    """The ECC P-256 decryption primary secrets are sealed to (a fresh TPM2B_PUBLIC).

    fixedTPM, fixedParent, sensitiveDataOrigin, decrypt, noDA; ``userWithAuth``
    only without ``policy`` (a PCR-bound key is usable through its policy alone).
    Unrestricted, scheme NULL: TPM2_ECDH_ZGen is all it is used for.
    """
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.NODA)
    if not policy:
        attrs |= TPMA_OBJECT.USERWITHAUTH
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=attrs,
        authPolicy=policy,
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        )),
        unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=SEALING_UNIQUE)),
    ))


def _selection(bank: str, pcrs: tuple[int, ...]) -> TPML_PCR_SELECTION:
    if bank not in _BANKS:
        raise TpmError(f"PCR bank {bank!r} is not one of {', '.join(_BANKS)}")
    return TPML_PCR_SELECTION.parse(f"{bank}:{','.join(str(i) for i in pcrs)}")


def _aes_cfb() -> TPMT_SYM_DEF:
    sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES)
    sym.keyBits.aes = 128
    sym.mode.aes = TPM2_ALG.CFB
    return sym


def pcr_policy(tpm: TpmContext, bank: str, pcrs: tuple[int, ...]) -> bytes:
    """The PolicyPCR digest of the PCRs' current values (a trial session, TPM 2.0 Part 3 §23.7)."""
    selection = _selection(bank, pcrs)
    with tpm.lock, tpm_call(f"computing the policy of PCRs {bank}:{pcrs}", tpm):
        esapi = tpm.esapi
        trial = esapi.start_auth_session(
            tpm_key=ESYS_TR.NONE, bind=ESYS_TR.NONE, session_type=TPM2_SE.TRIAL,
            symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), auth_hash=TPM2_ALG.SHA256)
        try:
            esapi.policy_pcr(trial, TPM2B_DIGEST(), selection)
            return bytes(esapi.policy_get_digest(trial))
        finally:
            esapi.flush_context(trial)


def _create_sealing_key(tpm: TpmContext, policy: bytes) -> tuple[Any, TPM2B_PUBLIC]:
    """Re-create the sealing primary for ``policy``; the caller flushes the handle."""
    template = sealing_key_template(policy)
    with tpm.creating(_KEY, template=template), \
            tpm_call("re-creating the sealing key (ECC P-256 primary in the endorsement "
                     "hierarchy)", tpm, handles=("the endorsement hierarchy",)):
        handle, public, _, _, _ = tpm.esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
    tpm.track(handle, _KEY)
    return handle, public


def _public_key(public: TPM2B_PUBLIC) -> ec.EllipticCurvePublicKey:
    point = public.publicArea.unique.ecc
    return ec.EllipticCurvePublicNumbers(int.from_bytes(bytes(point.x), "big"),
                                         int.from_bytes(bytes(point.y), "big"),
                                         ec.SECP256R1()).public_key()


def _aes_key(z: bytes | bytearray, blob: SealedBlob) -> bytearray:
    key = bytearray(32)
    HKDF(hashes.SHA256(), 32, salt=None, info=HKDF_INFO + blob.ephemeral).derive_into(z, key)
    return key


def _wipe(*buffers: bytearray) -> None:
    for b in buffers:
        b[:] = bytes(len(b))


def seal_secret(tpm: TpmContext, name: str, value: bytes | bytearray, *, pcr_bank: str = "sha256",
                pcrs: tuple[int, ...] = (), sealed_at: str) -> SealedBlob:
    """Seal ``value`` to this TPM (see the module docstring); the secret never enters the TPM.

    With ``pcrs`` the secret opens only while those PCRs of ``pcr_bank`` hold
    the values they hold now.
    """
    if not value:
        raise TpmError("an empty secret cannot be sealed")
    if len(value) > MAX_SECRET_BYTES:
        raise TpmError(f"a sealed secret holds at most {MAX_SECRET_BYTES} bytes, "
                       f"got {len(value)}")
    with tpm.lock:
        policy = pcr_policy(tpm, pcr_bank, pcrs) if pcrs else b""
        handle, public = _create_sealing_key(tpm, policy)
        try:
            key_name = bytes(tpm.esapi.tr_get_name(handle))
        finally:
            flush_transient(tpm, handle, _KEY)
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    share = ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    z = bytearray(ephemeral.exchange(ec.ECDH(), _public_key(public)))
    blob = SealedBlob(name=name, sealed_at=sealed_at, pcr_bank=pcr_bank, pcrs=pcrs,
                      policy=policy, key_name=key_name, ephemeral=share,
                      nonce=os.urandom(12), ciphertext=b"")
    key = _aes_key(z, blob)
    try:
        encryptor = Cipher(algorithms.AES(bytes(key)), modes.GCM(blob.nonce)).encryptor()
        encryptor.authenticate_additional_data(blob.associated_data())
        ciphertext = encryptor.update(value) + encryptor.finalize() + encryptor.tag
    finally:
        _wipe(z, key)
    return SealedBlob(**{**blob.__dict__, "ciphertext": ciphertext})


def _zgen(tpm: TpmContext, handle: Any, blob: SealedBlob) -> bytearray:
    """TPM2_ECDH_ZGen of the blob's ephemeral share, through an encrypting session."""
    esapi = tpm.esapi
    point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), blob.ephemeral)
    numbers = point.public_numbers()
    in_point = TPM2B_ECC_POINT(TPMS_ECC_POINT(x=numbers.x.to_bytes(32, "big"),
                                              y=numbers.y.to_bytes(32, "big")))
    # Salted with the sealing key itself: the session key (and so the encryption of
    # the answer) is known only to this process and the TPM, never seen on the bus.
    kind = TPM2_SE.POLICY if blob.pcrs else TPM2_SE.HMAC
    with tpm_call(f"opening an encrypted session for sealed secret {blob.name}", tpm):
        session = esapi.start_auth_session(tpm_key=handle, bind=ESYS_TR.NONE,
                                           session_type=kind, symmetric=_aes_cfb(),
                                           auth_hash=TPM2_ALG.SHA256)
    try:
        with tpm_call(f"opening sealed secret {blob.name}", tpm, handles=(_KEY,)):
            if blob.pcrs:
                esapi.policy_pcr(session, TPM2B_DIGEST(), _selection(blob.pcr_bank, blob.pcrs))
            esapi.trsess_set_attributes(session,
                                        TPMA_SESSION.ENCRYPT | TPMA_SESSION.CONTINUESESSION)
            try:
                out = esapi.ecdh_zgen(handle, in_point, session1=session)
            except TSS2_Exception as e:
                if is_code(e, TPM2_RC.POLICY_FAIL):
                    raise SealedSecretError(
                        f"sealed secret {blob.name} is bound to PCRs {blob.bound()}, which "
                        "changed since it was sealed: the TPM refuses to open it",
                        rc=int(e.rc),
                        hint="if the new PCR values are expected (a firmware or boot change), "
                        f"seal it again: `tpmid secret seal {blob.name} --force`") from e
                raise
        z = bytearray(bytes(out.point.x))
        del out
        return z
    finally:
        with tpm_call("closing the session of a sealed secret", tpm):
            esapi.flush_context(session)


def _wrong_key(blob: SealedBlob) -> SealedSecretError:
    return SealedSecretError(
        f"sealed secret {blob.name} was sealed to another key than this TPM's "
        "(another TPM, or its endorsement seed changed since)",
        hint=f"seal it again on this device: `tpmid secret seal {blob.name} --force`")


def check_sealed_secret(tpm: TpmContext, blob: SealedBlob) -> None:
    """Raise SealedSecretError if :func:`unseal_secret` would fail, without unsealing.

    The sealing key must come back with the blob's Name, and the PCRs must still
    give the blob's policy digest (a trial session: nothing secret is computed).
    """
    with tpm.lock:
        handle, _ = _create_sealing_key(tpm, blob.policy)
        try:
            same = bytes(tpm.esapi.tr_get_name(handle)) == blob.key_name
        finally:
            flush_transient(tpm, handle, _KEY)
        if not same:
            raise _wrong_key(blob)
        if blob.pcrs and pcr_policy(tpm, blob.pcr_bank, blob.pcrs) != blob.policy:
            raise SealedSecretError(
                f"sealed secret {blob.name} is bound to PCRs {blob.bound()}, which changed "
                "since it was sealed: the TPM would refuse to open it",
                hint="if the new PCR values are expected (a firmware or boot change), "
                f"seal it again: `tpmid secret seal {blob.name} --force`")


def unseal_secret(tpm: TpmContext, blob: SealedBlob) -> bytearray:
    """The secret ``blob`` holds, in a bytearray the caller wipes when done with it.

    Raises :class:`~tpmid.errors.SealedSecretError` when this TPM cannot open it
    (PCRs changed; another TPM or a changed endorsement seed; an altered file).
    """
    with tpm.lock:
        handle, public = _create_sealing_key(tpm, blob.policy)
        try:
            if bytes(tpm.esapi.tr_get_name(handle)) != blob.key_name:
                raise _wrong_key(blob)
            z = _zgen(tpm, handle, blob)
        finally:
            flush_transient(tpm, handle, _KEY)
    key = _aes_key(z, blob)
    _wipe(z)
    ciphertext, tag = blob.ciphertext[:-16], blob.ciphertext[-16:]
    out = bytearray(len(ciphertext) + 15)
    try:
        decryptor = Cipher(algorithms.AES(bytes(key)), modes.GCM(blob.nonce, tag)).decryptor()
        decryptor.authenticate_additional_data(blob.associated_data())
        n = decryptor.update_into(ciphertext, out)
        decryptor.finalize()
    except (InvalidTag, ValueError) as e:
        _wipe(out)
        raise SealedSecretError(
            f"sealed secret {blob.name} does not decrypt with this TPM's key: its file was "
            "altered or damaged", hint=f"seal it again: `tpmid secret seal {blob.name} --force`"
        ) from e
    finally:
        _wipe(key)
    secret = out[:n]
    _wipe(out)
    return secret
