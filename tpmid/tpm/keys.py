"""Identity keys inside the TPM: IDevID templates, persistent and ek-derived keys, key files.

Three kinds of key (``KeyConfig.kind``):

* ``persistent`` — an IDevID created from a TCG template in the endorsement
  hierarchy and made persistent with TPM2_EvictControl (default 0x81020000).
* ``ek-derived`` — the same template, re-created with TPM2_CreatePrimary every
  time it is needed. A primary key is a deterministic function of the hierarchy
  seed and the template (TPM 2.0 Part 1, primary keys), so it survives power cycles and
  TPM2_Clear (which does not touch the endorsement seed) and changes only with
  TPM2_ChangeEPS.
* ``file`` — an ordinary signing key under the storage root key, saved as a
  ``TSS2 PRIVATE KEY`` PEM (the format of tpm2-tss-engine and tpm2-openssl, see
  draft-bottomley-tpm2-keys) so that OpenSSL's tpm2 provider can use it too.

No identity key ever has the ``decrypt`` attribute: identity keys sign.

IDevID templates follow TCG "TPM 2.0 Keys for Device Identity and Attestation"
v1.00 r12 (2021): attributes §7.3.4.1 Table 3, algorithms §7.3.4.2 Table 4
(H-1 RSA-2048/SHA-256, H-2 ECC P-256/SHA-256, H-3 ECC P-384/SHA-384), the
``unique`` value "IDEVID" §7.3.1 and the authPolicy digests §7.3.6.6 Table 19.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpmid.errors import KeyMismatchError, StoreError, TpmError
from tpmid.tpm.connection import (
    RC_COMMAND_CODE,
    RC_HANDLE,
    RC_INTEGRITY,
    TpmConnection,
    decode_rc,
    tpm_call,
)

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC

    from tpmid.config import KeyConfig

log = logging.getLogger(__name__)


def flush_transient(tpm: TpmConnection, handle: ESYS_TR, what: str) -> None:
    """TPM2_FlushContext ``handle``; on an error path, log a failure instead of masking the error.

    Called from ``finally`` blocks: if an exception is already propagating, a
    second one from the flush (typically: the TPM went away) must not hide it.
    """
    failing = sys.exc_info()[1] is not None
    try:
        with tpm_call(f"flushing {what}", tpm):
            tpm.esapi.flush_context(handle)
    except TpmError as e:
        if not failing:
            raise
        log.warning("could not flush %s after an error: %s", what, e)


DEFAULT_IDEVID_HANDLE = 0x81020000
# TCG Registry of Reserved TPM 2.0 Handles: TPM2_EvictControl with owner
# authorization may place objects (including endorsement-hierarchy ones, as is
# done for the EK) at 0x81000000-0x817FFFFF; 0x81800000-0x81FFFFFF needs platform auth.
OWNER_PERSISTENT_FIRST = 0x81000000
OWNER_PERSISTENT_LAST = 0x817FFFFF
# Key-file parent convention (tpm2-tss-engine, tpm2-openssl): TPM_RH_OWNER means
# "the primary re-created from the ECC P-256 storage template with empty unique".
PARENT_OWNER = 0x40000001
SRK_HANDLE = 0x81000001  # TCG Provisioning Guidance: the persistent SRK, if any

# TCG DevID v1.00 r12 §7.3.6.6 Table 19: authPolicy of IDevID keys per nameAlg.
IDEVID_POLICY = {
    "sha256": bytes.fromhex("ad6b3a2284fd698a0710bf5cc1b9bdf15e2532e3f601fa4b93a6a8fa8de579ea"),
    "sha384": bytes.fromhex(
        "4db1aa836d0b5615df6ee53a40ef70c61c217f4303d44695"
        "925972bc927006cfa5cbdf6dc18c4dbe329b2f1542c3dd33"
    ),
}
# TCG DevID v1.00 r12 §7.3.1: the unique field of IDevID templates is "IDEVID".
IDEVID_UNIQUE = b"IDEVID"


@dataclass(frozen=True)
class KeySpec:
    """What tpmid knows about a key algorithm: its name, curve/size and its one hash."""

    alg: str  # "ecc-p256" | "ecc-p384" | "rsa-2048"
    hash_name: str  # "sha256" | "sha384"
    label: str  # "ECC NIST P-256"


KEY_SPECS = {
    "ecc-p256": KeySpec("ecc-p256", "sha256", "ECC NIST P-256"),
    "ecc-p384": KeySpec("ecc-p384", "sha384", "ECC NIST P-384"),
    "rsa-2048": KeySpec("rsa-2048", "sha256", "RSA 2048"),
}
IDEVID_TEMPLATE_ALGS = {"H-1": "rsa-2048", "H-2": "ecc-p256", "H-3": "ecc-p384"}
FILE_ALGS = ("ecc-p256", "ecc-p384", "rsa-2048")


# --------------------------------------------------------------------------- templates


def _tpm_hash(name: str) -> Any:
    from tpm2_pytss.constants import TPM2_ALG

    return {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}[name]


def _build_public(alg: str, *, attrs: int, name_hash: str, sign_hash: str | None,
                  policy: bytes, unique: bytes) -> TPM2B_PUBLIC:
    """A fresh TPM2B_PUBLIC for a non-restricted signing key (never shared, never mutated)."""
    from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC
    from tpm2_pytss.types import (
        TPM2B_PUBLIC,
        TPM2B_PUBLIC_KEY_RSA,
        TPMS_ECC_PARMS,
        TPMS_ECC_POINT,
        TPMS_RSA_PARMS,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_RSA_SCHEME,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_ID,
        TPMU_PUBLIC_PARMS,
    )

    null_sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
    if alg.startswith("ecc-"):
        curve = TPM2_ECC.NIST_P256 if alg == "ecc-p256" else TPM2_ECC.NIST_P384
        scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA if sign_hash else TPM2_ALG.NULL)
        if sign_hash:
            scheme.details.anySig.hashAlg = _tpm_hash(sign_hash)
        area = TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=_tpm_hash(name_hash),
            objectAttributes=attrs,
            authPolicy=policy,
            parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
                symmetric=null_sym, scheme=scheme, curveID=curve,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            )),
            unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=unique, y=unique)),
        )
    elif alg == "rsa-2048":
        # Scheme NULL: the TPM lets the caller pick RSASSA or RSA-PSS per signature,
        # which TLS 1.3 (RFC 8446 §4.2.3: RSA-PSS only) needs; tpmid's own signer
        # uses PKCS#1 v1.5 with SHA-256.
        area = TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=_tpm_hash(name_hash),
            objectAttributes=attrs,
            authPolicy=policy,
            parameters=TPMU_PUBLIC_PARMS(rsaDetail=TPMS_RSA_PARMS(
                symmetric=null_sym, scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                keyBits=2048, exponent=0,
            )),
            unique=TPMU_PUBLIC_ID(rsa=TPM2B_PUBLIC_KEY_RSA(unique)),
        )
    else:
        raise TpmError(f"unsupported key algorithm {alg!r} (use one of {', '.join(FILE_ALGS)})")
    return TPM2B_PUBLIC(publicArea=area)


def idevid_template(name: str) -> TPM2B_PUBLIC:
    """The TCG IDevID template ``name`` ("H-1", "H-2" or "H-3") as a fresh TPM2B_PUBLIC.

    TCG DevID v1.00 r12 §7.3.4.1 Table 3: fixedTPM, fixedParent,
    sensitiveDataOrigin, userWithAuth, adminWithPolicy, sign — never decrypt or
    restricted. ECC templates fix ECDSA with the template's hash.
    """
    from tpm2_pytss.constants import TPMA_OBJECT

    if name not in IDEVID_TEMPLATE_ALGS:
        raise TpmError(f"unknown IDevID template {name!r} (use H-1, H-2 or H-3)")
    alg = IDEVID_TEMPLATE_ALGS[name]
    h = KEY_SPECS[alg].hash_name
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.ADMINWITHPOLICY | TPMA_OBJECT.SIGN_ENCRYPT)
    return _build_public(alg, attrs=attrs, name_hash=h,
                         sign_hash=h if alg.startswith("ecc-") else None,
                         policy=IDEVID_POLICY[h], unique=IDEVID_UNIQUE)


def file_key_template(alg: str) -> TPM2B_PUBLIC:
    """Template of a key-file signing key (``ecc-p256``, ``ecc-p384``, ``rsa-2048``).

    Like the IDevID templates but noDA (empty authorization, so no reason to let
    it count towards dictionary-attack lockout) and no policy.
    """
    from tpm2_pytss.constants import TPMA_OBJECT

    if alg not in KEY_SPECS:
        raise TpmError(f"unsupported key algorithm {alg!r} (use one of {', '.join(FILE_ALGS)})")
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA | TPMA_OBJECT.SIGN_ENCRYPT)
    h = KEY_SPECS[alg].hash_name
    return _build_public(alg, attrs=attrs, name_hash="sha256",
                         sign_hash=h if alg.startswith("ecc-") else None, policy=b"", unique=b"")


def storage_parent_template() -> TPM2B_PUBLIC:
    """The ECC P-256 storage primary template with empty unique (key-file parent 0x40000001).

    TCG Provisioning Guidance SRK attributes: fixedTPM, fixedParent,
    sensitiveDataOrigin, userWithAuth, noDA, restricted, decrypt; AES-128-CFB.
    """
    from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_PUBLIC,
        TPMS_ECC_PARMS,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_PARMS,
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
    )

    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                          | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
                          | TPMA_OBJECT.NODA | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT),
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES,
                                          keyBits=TPMU_SYM_KEY_BITS(aes=128),
                                          mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        )),
    ))


def template_fields(public: TPM2B_PUBLIC | TPMT_PUBLIC) -> bytes:
    """The marshalled public area without its ``unique`` field.

    Two objects made from the same template agree on these bytes whatever their
    key; it is how tpmid recognises which template a key was made from.
    """
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_PUBLIC_KEY_RSA, TPMS_ECC_POINT

    area = public.publicArea if isinstance(public, TPM2B_PUBLIC) else public
    copy, _ = TPM2B_PUBLIC.unmarshal(TPM2B_PUBLIC(publicArea=area).marshal())
    if copy.publicArea.type == TPM2_ALG.ECC:
        copy.publicArea.unique.ecc = TPMS_ECC_POINT()
    elif copy.publicArea.type == TPM2_ALG.RSA:
        copy.publicArea.unique.rsa = TPM2B_PUBLIC_KEY_RSA()
    return bytes(copy.marshal())


def identify_template(public: TPM2B_PUBLIC) -> str | None:
    """The IDevID template (H-1/H-2/H-3) whose fields ``public`` has, or None."""
    fields = template_fields(public)
    for name in IDEVID_TEMPLATE_ALGS:
        if template_fields(idevid_template(name)) == fields:
            return name
    return None


def key_spec_of(public: TPM2B_PUBLIC | TPMT_PUBLIC) -> KeySpec | None:
    """The :class:`KeySpec` of an RSA-2048 / ECC P-256 / P-384 key, None for anything else."""
    from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC
    from tpm2_pytss.types import TPM2B_PUBLIC

    area = public.publicArea if isinstance(public, TPM2B_PUBLIC) else public
    if area.type == TPM2_ALG.ECC:
        curve = area.parameters.eccDetail.curveID
        alg = {TPM2_ECC.NIST_P256: "ecc-p256", TPM2_ECC.NIST_P384: "ecc-p384"}.get(curve)
        return KEY_SPECS[alg] if alg else None
    if area.type == TPM2_ALG.RSA and area.parameters.rsaDetail.keyBits == 2048:
        return KEY_SPECS["rsa-2048"]
    return None


def describe_public(public: TPM2B_PUBLIC) -> str:
    """A short human description of a key's public area, for messages."""
    from tpm2_pytss.constants import TPMA_OBJECT

    area = public.publicArea
    spec = key_spec_of(public)
    kind = spec.label if spec else f"algorithm {int(area.type):#x}"
    template = identify_template(public)
    attrs = area.objectAttributes
    role = "signing" if attrs & TPMA_OBJECT.SIGN_ENCRYPT else "non-signing"
    if attrs & TPMA_OBJECT.DECRYPT:
        role += "/decryption"
    if attrs & TPMA_OBJECT.RESTRICTED:
        role = "restricted " + role
    text = f"{kind} {role} key" + (f" (IDevID template {template})" if template else "")
    return ("an " if text[0] in "AEIOUaeiou" else "a ") + text


# --------------------------------------------------------------------------- loaded keys


class LoadedKey:
    """A key the TPM can sign with right now: transient (flushed on close) or persistent.

    A context manager. ``alg`` is "ecc-p256", "ecc-p384" or "rsa-2048";
    ``hash_name`` is the one hash the key signs with.
    """

    def __init__(self, tpm: TpmConnection, handle: ESYS_TR, public: TPM2B_PUBLIC, *,
                 transient: bool, description: str, tpm_handle: int | None = None) -> None:
        from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT

        self.tpm = tpm
        self.handle = handle
        self.public = public
        self.transient = transient
        self.description = description
        # For persistent keys: the TPM handle (0x81...) whose ESYS_TR the connection
        # reference-counts (TpmConnection.open_handle).
        self.tpm_handle = tpm_handle
        self._closed = False
        spec = key_spec_of(public)
        attrs = public.publicArea.objectAttributes
        if spec is None:
            raise KeyMismatchError(
                f"{description} is {describe_public(public)}; tpmid uses RSA-2048, ECC P-256 "
                "or ECC P-384 keys"
            )
        if not attrs & TPMA_OBJECT.SIGN_ENCRYPT or attrs & TPMA_OBJECT.RESTRICTED:
            raise KeyMismatchError(
                f"{description} is {describe_public(public)}, not an unrestricted signing key"
            )
        self.alg = spec.alg
        self.hash_name = spec.hash_name
        area = public.publicArea
        if area.type == TPM2_ALG.ECC and area.parameters.eccDetail.scheme.scheme == TPM2_ALG.ECDSA:
            # The template fixes the scheme; the TPM refuses any other hash.
            fixed = area.parameters.eccDetail.scheme.details.anySig.hashAlg
            self.hash_name = {TPM2_ALG.SHA256: "sha256", TPM2_ALG.SHA384: "sha384",
                              TPM2_ALG.SHA512: "sha512"}.get(fixed, self.hash_name)

    def __repr__(self) -> str:
        return f"LoadedKey({self.description}, {self.alg})"

    def __enter__(self) -> LoadedKey:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except TpmError as e:  # do not hide the error that ended the block
            log.warning("could not close %s after an error: %s", self.description, e)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def close(self) -> None:
        """Flush a transient key from the TPM; forget a persistent one (it stays in the TPM)."""
        if self._closed:
            return
        self._closed = True
        with self.tpm.lock:
            if self.tpm._esapi is None:  # connection already gone, and the objects with it
                return
            if self.transient:
                flush_transient(self.tpm, self.handle, self.description)
            elif self.tpm_handle is not None:
                self.tpm.close_handle(self.tpm_handle, self.handle)
            else:
                self.tpm.esapi.tr_close(self.handle)

    def public_key(self) -> PublicKeyTypes:
        """The public key as a ``cryptography`` object."""
        return public_key_from_tpm(self.public)

    def public_key_der(self) -> bytes:
        """The public key as SubjectPublicKeyInfo DER."""
        from cryptography.hazmat.primitives import serialization

        return self.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign ``digest`` (of :attr:`hash_name`) with exactly one TPM2_Sign.

        ECDSA signatures come back DER-encoded (r, s) as X.509 and TLS expect;
        RSA signatures are PKCS#1 v1.5 (RSASSA) signature bytes.
        """
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
        from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPM2_ST
        from tpm2_pytss.types import TPM2B_DIGEST, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK

        if self._closed:
            raise TpmError(f"{self.description} was already closed")
        size = {"sha256": 32, "sha384": 48, "sha512": 64}[self.hash_name]
        if len(digest) != size:
            raise TpmError(f"{self.description} signs {self.hash_name.upper()} digests "
                           f"({size} bytes), got {len(digest)} bytes")
        ecc = self.alg.startswith("ecc-")
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA if ecc else TPM2_ALG.RSASSA)
        scheme.details.any.hashAlg = _tpm_hash(self.hash_name)
        # A NULL ticket is allowed because the key is not restricted (TPM 2.0 Part 3 §20.3, TPM2_Sign).
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self.tpm.lock, tpm_call(f"signing with {self.description}", self.tpm,
                                     handles=(self.description,)):
            sig = self.tpm.esapi.sign(self.handle, TPM2B_DIGEST(digest), scheme, ticket)
        if ecc:
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            return bytes(encode_dss_signature(r, s))
        return bytes(sig.signature.rsassa.sig)

    def private_key(self) -> Any:
        """A ``cryptography`` private-key object whose ``sign()`` is :meth:`sign_digest`.

        Use it with ``x509.CertificateSigningRequestBuilder().sign(key, hash)``
        and the like; it refuses hashes and paddings this key cannot produce.
        """
        from tpmid.tpm.signer import tpm_private_key

        return tpm_private_key(self)


def public_key_from_tpm(public: TPM2B_PUBLIC) -> PublicKeyTypes:
    """Convert a TPM RSA/ECC public area to a ``cryptography`` public key."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC

    area = public.publicArea
    if area.type == TPM2_ALG.ECC:
        curves: dict[int, ec.EllipticCurve] = {
            TPM2_ECC.NIST_P256: ec.SECP256R1(), TPM2_ECC.NIST_P384: ec.SECP384R1(),
            TPM2_ECC.NIST_P521: ec.SECP521R1(),
        }
        curve = curves.get(area.parameters.eccDetail.curveID)
        if curve is None:
            raise TpmError(f"unsupported ECC curve {int(area.parameters.eccDetail.curveID):#x}")
        x = int.from_bytes(bytes(area.unique.ecc.x), "big")
        y = int.from_bytes(bytes(area.unique.ecc.y), "big")
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    if area.type == TPM2_ALG.RSA:
        # TPM 2.0 Part 2 TPMS_RSA_PARMS: exponent 0 means the default 2^16+1.
        e = int(area.parameters.rsaDetail.exponent) or 65537
        n = int.from_bytes(bytes(area.unique.rsa), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    raise TpmError(f"unsupported key type {int(area.type):#x}")


def key_matches_certificate(key: LoadedKey, cert: x509.Certificate) -> bool:
    """True when ``cert`` certifies exactly this key (SubjectPublicKeyInfo equal)."""
    from cryptography.hazmat.primitives import serialization

    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return spki == key.public_key_der()


# --------------------------------------------------------------------------- IDevIDs


@dataclass(frozen=True)
class PersistentResult:
    """Outcome of :func:`create_persistent_idevid`."""

    handle: int
    created: bool  # False when an identical key was already there
    public: TPM2B_PUBLIC


def _check_owner_handle(handle: int) -> None:
    if not OWNER_PERSISTENT_FIRST <= handle <= OWNER_PERSISTENT_LAST:
        raise TpmError(
            f"{handle:#010x} is not a persistent handle the owner may use "
            f"({OWNER_PERSISTENT_FIRST:#010x}-{OWNER_PERSISTENT_LAST:#010x})",
            hint="pick a handle such as 0x81020000 (key.handle in the config)",
        )


def _open_if_present(tpm: TpmConnection, handle: int) -> Any | None:
    """``tpm.open_handle(handle)``, or None when no object is there (TPM_RC_HANDLE).

    One TPM2_ReadPublic instead of listing every persistent handle first.
    """
    try:
        return tpm.open_handle(handle, f"key {handle:#010x}")
    except TpmError as e:
        if e.rc is not None and decode_rc(e.rc).code == RC_HANDLE:
            return None
        raise


def read_persistent_public(tpm: TpmConnection, handle: int) -> TPM2B_PUBLIC | None:
    """The public area of the object at ``handle``, None if the handle is empty."""
    tr = _open_if_present(tpm, handle)
    if tr is None:
        return None
    try:
        with tpm_call(f"reading the key at {handle:#010x}", tpm):
            public, _, _ = tpm.esapi.read_public(tr)
    finally:
        tpm.close_handle(handle, tr)
    return public


def derive_idevid(tpm: TpmConnection, template: str) -> LoadedKey:
    """Create the IDevID primary from ``template`` in the endorsement hierarchy (transient).

    The same TPM and template always give the same key (until TPM2_ChangeEPS).
    The caller closes the returned key, which flushes it.
    """
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    public = idevid_template(template)
    with tpm.lock:
        with tpm_call(f"creating the {template} IDevID in the endorsement hierarchy", tpm,
                      handles=("the endorsement hierarchy",)):
            handle, out_public, _, _, _ = tpm.esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), public, ESYS_TR.ENDORSEMENT)
        try:
            return LoadedKey(tpm, handle, out_public, transient=True,
                             description=f"ek-derived {template} IDevID")
        except BaseException:
            flush_transient(tpm, handle, f"the {template} IDevID")
            raise


def create_persistent_idevid(tpm: TpmConnection, template: str,
                             handle: int = DEFAULT_IDEVID_HANDLE, *,
                             force: bool = False) -> PersistentResult:
    """Make the ``template`` IDevID persistent at ``handle``; idempotent.

    An existing key at ``handle`` that equals the template's re-derivation is
    reused (``created=False``). Anything else there raises KeyMismatchError,
    unless ``force`` — then it is evicted and replaced (its certificates become
    useless).
    """
    from tpm2_pytss.constants import ESYS_TR

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
                tpm.esapi.tr_close(new)
            log.info("IDevID %s persisted at %#010x", template, handle)
            return PersistentResult(handle=handle, created=True, public=key.public)
        finally:
            key.close()


def open_persistent(tpm: TpmConnection, handle: int,
                    expect_template: str | None = None) -> LoadedKey:
    """The persistent key at ``handle`` as a :class:`LoadedKey` (nothing is loaded).

    Raises TpmError when the handle is empty (e.g. after TPM2_Clear) and
    KeyMismatchError when ``expect_template`` is given and the key was not made
    from it.
    """
    with tpm.lock:
        tr = _open_if_present(tpm, handle)
        if tr is None:
            raise TpmError(
                f"no key at {handle:#010x} — the persistent IDevID is missing (TPM2_Clear "
                "removes every key persisted by the owner)",
                hint="create it again with `tpmid key create <identity>` and enroll it again",
            )
        try:
            with tpm_call(f"reading the key at {handle:#010x}", tpm):
                public, _, _ = tpm.esapi.read_public(tr)
            if expect_template is not None:
                if template_fields(public) != template_fields(idevid_template(expect_template)):
                    raise KeyMismatchError(
                        f"{handle:#010x} holds {describe_public(public)}, not an IDevID from "
                        f"template {expect_template}",
                        hint="fix key.template in the config, or recreate the key with "
                        "`tpmid key create <identity> --force`",
                    )
            return LoadedKey(tpm, tr, public, transient=False,
                             description=f"persistent key {handle:#010x}", tpm_handle=handle)
        except BaseException:
            tpm.close_handle(handle, tr)
            raise


def evict_persistent(tpm: TpmConnection, handle: int) -> None:
    """Remove the persistent object at ``handle`` (TPM2_EvictControl with owner auth)."""
    from tpm2_pytss.constants import ESYS_TR

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


# --------------------------------------------------------------------------- key files


def _create_storage_parent(tpm: TpmConnection) -> ESYS_TR:
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    scope = tpm.parent_scope
    if scope is not None and scope.get("primary") is not None:
        return scope["primary"]
    with tpm_call("re-creating the storage root key (ECC P-256 primary in the owner hierarchy)",
                  tpm, handles=("the owner hierarchy",)):
        handle, _, _, _, _ = tpm.esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), storage_parent_template(), ESYS_TR.OWNER)
    if scope is not None:
        scope["primary"] = handle
    return handle


def _release_storage_parent(tpm: TpmConnection, handle: ESYS_TR) -> None:
    """Flush a re-created storage parent, unless a :func:`storage_parent_scope` keeps it."""
    scope = tpm.parent_scope
    if scope is not None and scope.get("primary") is handle:
        return
    flush_transient(tpm, handle, "the storage root key")


def _persistent_srk_usable(tpm: TpmConnection) -> bool:
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
def storage_parent_scope(tpm: TpmConnection) -> Iterator[None]:
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


def create_key_file(tpm: TpmConnection, alg: str) -> bytes:
    """Create a signing key under the storage root key; return it as TSS2 PRIVATE KEY PEM.

    The parent field is TPM_RH_OWNER (0x40000001): whoever loads it re-creates
    the ECC P-256 storage primary (:func:`storage_parent_template`), as
    tpm2-openssl does. The private part is encrypted by the TPM; the file is
    useless on any other TPM or after TPM2_Clear.
    """
    from tpm2_pytss.tsskey import TSSPrivKey
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

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


def create_loaded_key_file(tpm: TpmConnection, alg: str) -> tuple[bytes, LoadedKey]:
    """Like :func:`create_key_file`, but the new key also stays loaded for signing.

    One TPM2_CreateLoaded instead of TPM2_Create + TPM2_Load (TPM 2.0 Part 3
    §12.9); a TPM without that command (TPM_RC_COMMAND_CODE) gets the two. The
    caller closes the returned key.
    """
    from tpm2_pytss.tsskey import TSSPrivKey
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE, TPM2B_TEMPLATE

    template = file_key_template(alg)
    with tpm.lock:
        parent = _create_storage_parent(tpm)
        try:
            with tpm_call(f"creating a {alg} key under the storage root key", tpm,
                          handles=("the storage root key",)):
                try:
                    handle, private, public = tpm.esapi.create_loaded(
                        parent, TPM2B_SENSITIVE_CREATE(),
                        TPM2B_TEMPLATE(template.publicArea.marshal()))
                except Exception as e:
                    if decode_rc(int(getattr(e, "rc", 0))).code != RC_COMMAND_CODE:
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
    from tpm2_pytss.tsskey import TSSPrivKey

    try:
        return TSSPrivKey.from_pem(pem)
    except Exception as e:  # asn1/base64/unmarshal errors of every kind
        raise StoreError(f"not a usable TSS2 PRIVATE KEY file: {e}",
                         hint="re-enroll the identity (a new key comes with the new "
                         "certificate): `tpmid enroll <identity>`") from e


def load_key_file(tpm: TpmConnection, pem: bytes) -> LoadedKey:
    """Load a TSS2 PRIVATE KEY PEM; the parent is flushed as soon as the key is loaded.

    For parent 0x40000001 a persistent SRK at 0x81000001 with the standard
    template is tried first (no key generation needed), then the storage primary
    is re-created. A key file from before TPM2_Clear can never load again: that
    is reported as such.
    """
    from tpm2_pytss.constants import TPMA_OBJECT

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
            if _persistent_srk_usable(tpm):
                parents.append(("persistent", False))
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
                with tpm_call("loading the key file", tpm, handles=("the parent key",)):
                    handle = esapi.load(parent_tr, tss.private, public)
            except TpmError as e:
                if e.rc is not None and decode_rc(e.rc).code == RC_INTEGRITY:
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
        raise TpmError(
            "the key file does not belong to this TPM's current storage root key: it was made "
            "before a TPM clear (or on another TPM), and can never be loaded again",
            rc=last.rc,
            hint="the identity must be re-enrolled (a new key comes with the new certificate): "
            "`tpmid enroll <identity>`",
        ) from last


def load_identity_key(tpm: TpmConnection, key: KeyConfig,
                      key_file: bytes | None = None) -> LoadedKey:
    """Open the identity key ``key`` describes; the caller closes it.

    ``key_file`` is the TSS2 PEM for ``kind: file`` keys (read by the caller from
    the store).
    """
    if key.kind == "persistent":
        return open_persistent(tpm, key.handle, expect_template=key.template)
    if key.kind == "ek-derived":
        return derive_idevid(tpm, key.template)
    if key.kind == "file":
        if key_file is None:
            raise StoreError("this identity's key file does not exist yet",
                             hint="file keys are created with their certificate: "
                             "`tpmid enroll <identity>`")
        loaded = load_key_file(tpm, key_file)
        if loaded.alg != key.alg:
            loaded.close()
            raise KeyMismatchError(f"the key file holds an {loaded.alg} key but the config "
                                   f"says {key.alg}",
                                   hint="fix key.alg or recreate the key with --force")
        return loaded
    raise TpmError(f"unknown key kind {key.kind!r}")
