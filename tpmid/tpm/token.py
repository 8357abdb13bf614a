"""The TPM side of a tpm2-pkcs11 token: its sealed wrapping key, and what a linked key looks like.

tpm2-pkcs11 (1.9, Debian 12) keeps each token's objects in an SQLite store; the
authorization of every key object is encrypted with a *wrapping key*, and the
wrapping key is sealed in the TPM twice (a user and a security-officer seal
object), each sealed object's authorization being derived from a PIN:
``sha256(pin || salt)`` as 32 hex digits (tpm2-pkcs11's ``hash_pass``).

A token tpmid uses is made with ``--transient-parent=tss2-engine-key``: its
primary object is re-created, whenever it is needed, from the same ECC P-256
storage template tpmid's key files are made under
(:func:`~tpmid.tpm.templates.storage_parent_template`), so a TSS2 key file of
tpmid loads under it unchanged: the key is *linked* into the token, never
re-created or exported.

Here, in tpmid's own process with its lock, ledger and flushes:

* :func:`seal_secret` / :func:`unseal_secret` — create and open the sealed
  wrapping-key objects (TPM2_Create of a keyedhash sealed-data object under the
  storage parent; TPM2_Load + TPM2_Unseal with the PIN-derived authorization).
  The PIN never leaves this process: not in argv, not in an environment;
* :func:`key_file_material` — the public and private blobs of a key file and
  its public area in the shape tpm2-pkcs11's object factory reads (what
  ``tpm2_readpublic`` prints), plus the hash its template fixes;
* :func:`pss_salt_is_digest_length` — whether this TPM's RSA-PSS signatures use
  a salt as long as the digest (the token's ``pss-sigs-good`` setting);
* :func:`storage_parent_public` — the token's transient parent as this TPM
  re-creates it (a test compares it with what tpm2-pkcs11's tooling makes).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tpm2_pytss.constants import TPM2_ALG, TPM2_CAP, TPM2_ECC, TPM2_RC, TPM2_RH, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_DIGEST,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMS_KEYEDHASH_PARMS,
    TPMS_SENSITIVE_CREATE,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_TK_HASHCHECK,
    TPMU_PUBLIC_PARMS,
)

from tpmid.errors import StoreError, TpmError
from tpmid.tpm.context import TpmContext
from tpmid.tpm.keyfile import _create_storage_parent, _release_storage_parent, create_loaded_key_file
from tpmid.tpm.loaded import flush_transient
from tpmid.tpm.rc import is_code, tpm_call
from tpmid.tpm.templates import key_spec_of, public_key_from_tpm

log = logging.getLogger(__name__)

# tpm2-tools' names of TPMA_OBJECT bits, as `tpm2_readpublic` prints them.
_ATTRIBUTE_NAMES = (
    (TPMA_OBJECT.FIXEDTPM, "fixedtpm"), (TPMA_OBJECT.STCLEAR, "stclear"),
    (TPMA_OBJECT.FIXEDPARENT, "fixedparent"),
    (TPMA_OBJECT.SENSITIVEDATAORIGIN, "sensitivedataorigin"),
    (TPMA_OBJECT.USERWITHAUTH, "userwithauth"), (TPMA_OBJECT.ADMINWITHPOLICY, "adminwithpolicy"),
    (TPMA_OBJECT.NODA, "noda"), (TPMA_OBJECT.ENCRYPTEDDUPLICATION, "encryptedduplication"),
    (TPMA_OBJECT.RESTRICTED, "restricted"), (TPMA_OBJECT.DECRYPT, "decrypt"),
    (TPMA_OBJECT.SIGN_ENCRYPT, "sign"),
)
_CURVE_NAMES = {TPM2_ECC.NIST_P256: "NIST p256", TPM2_ECC.NIST_P384: "NIST p384"}
_HASH_NAMES = {TPM2_ALG.SHA256: "sha256", TPM2_ALG.SHA384: "sha384"}


@dataclass(frozen=True)
class KeyMaterial:
    """A key file as tpm2-pkcs11 stores a linked key (nothing secret: the private blob is TPM-wrapped)."""

    public_blob: bytes  # marshalled TPM2B_PUBLIC (CKA_TPM2_PUB_BLOB)
    private_blob: bytes  # marshalled TPM2B_PRIVATE, encrypted by the parent (CKA_TPM2_PRIV_BLOB)
    public: dict[str, Any]  # the public area as `tpm2_readpublic` describes it
    fixed_hash: str | None  # the hash an ECDSA scheme in the template fixes, None for no scheme
    kind: str  # "ecc" or "rsa"
    spki_der: bytes  # SubjectPublicKeyInfo, to match certificates


def key_file_material(pem: bytes) -> KeyMaterial:
    """The blobs and public description of a TSS2 key file (parsed, no TPM needed)."""
    try:
        tss = TSSPrivKey.from_pem(pem)
    except Exception as e:  # asn1/base64/unmarshal errors of every kind
        raise StoreError(f"not a usable TSS2 PRIVATE KEY file: {e}") from e
    public = tss.public
    area = public.publicArea
    if key_spec_of(public) is None:
        raise TpmError("the key file does not hold an RSA-2048, ECC P-256 or P-384 key")
    attrs = int(area.objectAttributes)
    desc: dict[str, Any] = {
        "attributes": {"value": "|".join(n for bit, n in _ATTRIBUTE_NAMES if attrs & int(bit))},
    }
    fixed: str | None = None
    if area.type == TPM2_ALG.ECC:
        kind = "ecc"
        desc["type"] = {"value": "ecc"}
        desc["curve-id"] = {"value": _CURVE_NAMES[area.parameters.eccDetail.curveID]}
        desc["x"] = bytes(area.unique.ecc.x).hex()
        desc["y"] = bytes(area.unique.ecc.y).hex()
        scheme = area.parameters.eccDetail.scheme
        if scheme.scheme == TPM2_ALG.ECDSA:
            fixed = _HASH_NAMES.get(scheme.details.anySig.hashAlg)
        elif scheme.scheme != TPM2_ALG.NULL:
            raise TpmError("the key file's template fixes a signing scheme other than ECDSA")
    else:
        kind = "rsa"
        if area.parameters.rsaDetail.scheme.scheme != TPM2_ALG.NULL:
            raise TpmError("the key file's RSA template fixes a signing scheme; tpmid's have none")
        desc["type"] = {"value": "rsa"}
        desc["exponent"] = int(area.parameters.rsaDetail.exponent)
        desc["bits"] = int(area.parameters.rsaDetail.keyBits)
        desc["rsa"] = bytes(area.unique.rsa).hex()
    spki = public_key_from_tpm(public).public_bytes(Encoding.DER,
                                                    PublicFormat.SubjectPublicKeyInfo)
    return KeyMaterial(public_blob=bytes(public.marshal()), private_blob=bytes(tss.private.marshal()),
                       public=desc, fixed_hash=fixed, kind=kind, spki_der=spki)


def seal_auth(pin: str, salt: str) -> bytes:
    """The authorization of a token's sealed object: tpm2-pkcs11's ``hash_pass`` of the PIN."""
    return hashlib.sha256(pin.encode() + salt.encode()).hexdigest()[:32].encode()


def _sealed_template() -> TPM2B_PUBLIC:
    # What `tpm2_create -i -` makes (tpm2_ptool addtoken): a keyedhash sealed-data object,
    # authorized by its password, and counted by dictionary-attack protection (no noDA).
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256,
        objectAttributes=(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                          | TPMA_OBJECT.USERWITHAUTH),
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS(
            scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL))),
    ))


def seal_secret(tpm: TpmContext, data: bytes, auth: bytes) -> tuple[bytes, bytes]:
    """Seal ``data`` under the storage parent; (public, private) blobs as tpm2-pkcs11 stores them."""
    sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(
        userAuth=TPM2B_AUTH(auth), data=TPM2B_SENSITIVE_DATA(data)))
    with tpm.lock:
        parent = _create_storage_parent(tpm)
        try:
            with tpm_call("sealing a PKCS#11 token's wrapping key", tpm,
                          handles=("the storage root key",)):
                private, public, _, _, _ = tpm.esapi.create(parent, sensitive, _sealed_template())
        finally:
            _release_storage_parent(tpm, parent)
    return bytes(public.marshal()), bytes(private.marshal())


def unseal_secret(tpm: TpmContext, public_blob: bytes, private_blob: bytes, auth: bytes,
                  *, what: str) -> bytes:
    """Load a sealed object under the storage parent and unseal it with ``auth``.

    A wrong authorization (a wrong PIN) is a TpmError that says so; the TPM
    counts it towards its dictionary-attack lockout.
    """
    public, _ = TPM2B_PUBLIC.unmarshal(public_blob)
    private, _ = TPM2B_PRIVATE.unmarshal(private_blob)
    with tpm.lock:
        parent = _create_storage_parent(tpm)
        try:
            with tpm.creating(what, public=public), \
                    tpm_call(f"loading {what}", tpm, handles=("the storage root key",)):
                handle = tpm.esapi.load(parent, private, public)
            tpm.track(handle, what)
        except TpmError as e:
            if is_code(e, TPM2_RC.INTEGRITY):
                raise TpmError(f"{what} does not belong to this TPM's storage root key (made "
                               "on another TPM, or before a TPM clear)", rc=e.rc,
                               hint="tpmid pkcs11 sync makes a new token once the old one is "
                               "moved away") from e
            raise
        finally:
            _release_storage_parent(tpm, parent)
        try:
            tpm.esapi.tr_set_auth(handle, auth)
            try:
                with tpm_call(f"unsealing {what}", tpm, handles=(what,)):
                    data = tpm.esapi.unseal(handle)
            except TpmError as e:
                if is_code(e, TPM2_RC.AUTH_FAIL) or is_code(e, TPM2_RC.BAD_AUTH):
                    raise TpmError(
                        f"the PIN does not open {what}; the TPM counted the failure towards "
                        "its dictionary-attack lockout", rc=e.rc,
                        hint="check pkcs11.user_pin in the config (the PIN the token was made "
                        "with)") from e
                raise
        finally:
            flush_transient(tpm, handle, what)
    return bytes(data)


def pss_salt_is_digest_length(tpm: TpmContext) -> bool:
    """True if this TPM's RSA-PSS signatures have a salt as long as the digest (RFC 8017 §9.1).

    tpm2-pkcs11 records it per token (``pss-sigs-good``), from one trial
    signature with a throw-away RSA key, as here; TPMs following TPM 2.0 Part 1
    §B.7 before 1.38 use the longest possible salt instead.
    """
    _, key = create_loaded_key_file(tpm, "rsa-2048")
    with key:
        digest = hashlib.sha256(b"tpm2-pkcs11 pss probe").digest()
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.RSAPSS)
        scheme.details.any.hashAlg = TPM2_ALG.SHA256
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with tpm.lock, tpm_call("signing a trial RSA-PSS signature", tpm):
            sig = tpm.esapi.sign(key.handle, TPM2B_DIGEST(digest), scheme, ticket)
        public = key.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    value = bytes(sig.signature.rsapss.sig)
    for salt, good in ((32, True), (padding.PSS.MAX_LENGTH, False)):
        try:
            public.verify(value, digest, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                     salt_length=salt),
                          Prehashed(hashes.SHA256()))
            return good
        except InvalidSignature:
            continue
    raise TpmError("the TPM's RSA-PSS signature verifies with neither salt length")


def algorithm_names(tpm: TpmContext) -> list[str]:
    """The TPM's algorithms by tpm2-tools' lower-case names (``tpm2_getcap algorithms``)."""
    names: list[str] = []
    with tpm.lock, tpm_call("listing algorithms", tpm):
        start = 0
        while True:
            more, data = tpm.esapi.get_capability(TPM2_CAP.ALGS, start, 128)
            batch = list(data.data.algorithms)
            for a in batch:
                try:
                    names.append(str(TPM2_ALG(int(a.alg))).lower())
                except (ValueError, TypeError):
                    continue
            if not more or not batch:
                break
            start = int(batch[-1].alg) + 1
    return names


def storage_parent_public(tpm: TpmContext) -> bytes:
    """The public area (marshalled TPM2B_PUBLIC) of the storage parent as this TPM re-creates it."""
    with tpm.lock:
        parent = _create_storage_parent(tpm)
        try:
            with tpm_call("reading the storage root key", tpm):
                public, _, _ = tpm.esapi.read_public(parent)
        finally:
            _release_storage_parent(tpm, parent)
    return bytes(public.marshal())
