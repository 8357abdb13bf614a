"""TPM public-area templates of identity keys, and reading public areas back.

IDevID templates follow TCG "TPM 2.0 Keys for Device Identity and Attestation"
v1.00 r12 (see :mod:`tpmid.tpm.specs`). Every builder returns a fresh
``TPM2B_PUBLIC``: templates are never shared, so nobody can mutate one for
everybody else (STYLE.md §9). No identity key ever has ``decrypt``.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
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
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from tpmid.errors import TpmError
from tpmid.tpm.specs import (
    FILE_ALGS,
    IDEVID_POLICY,
    IDEVID_TEMPLATE_ALGS,
    IDEVID_UNIQUE,
    KEY_SPECS,
    KeySpec,
)


def tpm_hash(name: str) -> Any:
    return {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}[name]


def _build_public(alg: str, *, attrs: int, name_hash: str, sign_hash: str | None,
                  policy: bytes, unique: bytes) -> TPM2B_PUBLIC:
    """A fresh TPM2B_PUBLIC for a non-restricted signing key (never shared, never mutated)."""
    null_sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)
    if alg.startswith("ecc-"):
        curve = TPM2_ECC.NIST_P256 if alg == "ecc-p256" else TPM2_ECC.NIST_P384
        scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA if sign_hash else TPM2_ALG.NULL)
        if sign_hash:
            scheme.details.anySig.hashAlg = tpm_hash(sign_hash)
        area = TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=tpm_hash(name_hash),
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
            nameAlg=tpm_hash(name_hash),
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



def public_key_from_tpm(public: TPM2B_PUBLIC) -> PublicKeyTypes:
    """Convert a TPM RSA/ECC public area to a ``cryptography`` public key."""
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

