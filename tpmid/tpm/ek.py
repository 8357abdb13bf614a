"""Endorsement keys: public keys, certificates in NV, and the device fingerprint.

TCG EK Credential Profile for TPM Family 2.0 (v2.5) defines where a TPM
manufacturer stores EK certificates (the NV indices below) and the
templates the EKs are created from (Annex B.3: low range L-1/L-2, high range
H-1...H-7). An EK is a primary key, so its public key can always be re-created
from the template; many platforms also persist it (TCG Provisioning Guidance:
0x81010001 for RSA, other handles in 0x81010000-0x8101FFFF).

For every template tpmid reports an EK when the TPM has a certificate for it or
a persistent EK made from it; L-1 (RSA-2048) and L-2 (ECC P-256) are always
reported, created from the template when neither exists. A missing certificate
is reported as ``cert_der=None``, never as an error.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_PUBLIC_KEY_RSA,
    TPM2B_SENSITIVE_CREATE,
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

from tpmid.der import der_prefix
from tpmid.errors import TpmError
from tpmid.tpm.context import TpmContext
from tpmid.tpm.idevid import read_persistent_public
from tpmid.tpm.loaded import flush_transient
from tpmid.tpm.nv import read_nv
from tpmid.tpm.rc import UNSUPPORTED_CODES, tpm_call, tpm_code
from tpmid.tpm.templates import public_key_from_tpm, template_fields

log = logging.getLogger(__name__)

EK_PERSISTENT_FIRST = 0x81010000
EK_PERSISTENT_LAST = 0x8101FFFF

# TPM 2.0 Part 2 §6.5.2 (TPM_CC) and §23 policy commands used to build EK policies.
CC_POLICY_SECRET = 0x151
CC_POLICY_OR = 0x171
RH_ENDORSEMENT = 0x4000000B

# EK Credential Profile Annex B.6.4 ("Computing PolicyC"): TPM2_PolicyAuthorizeNV
# over the published Name of NV index I-1 / I-2 / I-3 (0x01C07F01..03).
POLICY_C = {
    "sha256": bytes.fromhex("3767e2edd43ff45a3a7e1eaefcef78643dca964632e7aad82c673a30d8633fde"),
    "sha384": bytes.fromhex("d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b4"
                            "55e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165"),
    "sha512": bytes.fromhex("589ee1e146544716e8deafe6db247b01b81e9f9c7dd16b814aa159138749105f"
                            "ba5388dd1dea702f35240c184933121e2c61b8f50d3ef91393a49a38c3f73fc8"),
}


def policy_secret(hash_name: str, auth_handle: int, previous: bytes | None = None) -> bytes:
    """Policy digest after TPM2_PolicySecret(``auth_handle``) with empty policyRef.

    TPM 2.0 Part 3 §23.4: digest = H(H(old || TPM_CC_PolicySecret || authName) || policyRef);
    the Name of a permanent handle is the handle itself.
    """
    size = hashlib.new(hash_name).digest_size
    old = previous if previous is not None else b"\0" * size
    inner = hashlib.new(hash_name, old + struct.pack(">II", CC_POLICY_SECRET, auth_handle))
    return hashlib.new(hash_name, inner.digest()).digest()


def policy_or(hash_name: str, branches: list[bytes]) -> bytes:
    """TPM 2.0 Part 3 §23.6: digest = H(0...0 || TPM_CC_PolicyOR || digest1 || digest2 ...)."""
    size = hashlib.new(hash_name).digest_size
    return hashlib.new(hash_name, b"\0" * size + struct.pack(">I", CC_POLICY_OR)
                       + b"".join(branches)).digest()


def policy_a(hash_name: str) -> bytes:
    """EK Credential Profile B.6.1 PolicyA: PolicySecret(TPM_RH_ENDORSEMENT)."""
    return policy_secret(hash_name, RH_ENDORSEMENT)


def policy_b(hash_name: str) -> bytes:
    """EK Credential Profile B.6.5 PolicyB: PolicyOR(PolicyA, PolicyC), the high-range authPolicy."""
    return policy_or(hash_name, [policy_a(hash_name), POLICY_C[hash_name]])


@dataclass(frozen=True)
class EkTemplate:
    """One row of EK Credential Profile Annex B.3 with its certificate NV index."""

    name: str  # "L-1", "H-3", ...
    alg: str  # "rsa-2048", "ecc-p384", ...
    cert_index: int
    hash_name: str
    high_range: bool
    sym_bits: int
    creatable: bool = True  # False: tpmid cannot build the template (SM2/SM3)

    def public(self) -> TPM2B_PUBLIC:
        """A fresh TPM2B_PUBLIC of this EK template."""
        if not self.creatable:
            raise TpmError(f"tpmid cannot build EK template {self.name} ({self.alg})")
        attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
                 | TPMA_OBJECT.ADMINWITHPOLICY | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)
        if self.high_range:
            attrs |= TPMA_OBJECT.USERWITHAUTH  # Annex B.3.4: high-range EKs allow userWithAuth
        name_alg = {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384,
                    "sha512": TPM2_ALG.SHA512}[self.hash_name]
        policy = policy_b(self.hash_name) if self.high_range else policy_a(self.hash_name)
        sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES,
                                  keyBits=TPMU_SYM_KEY_BITS(aes=self.sym_bits),
                                  mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))
        if self.alg.startswith("rsa-"):
            bits = int(self.alg.split("-")[1])
            # Annex B.3.3: the low-range template's unique is keyBits/8 zero bytes;
            # high-range templates leave unique empty.
            unique = TPMU_PUBLIC_ID(rsa=TPM2B_PUBLIC_KEY_RSA(b"" if self.high_range
                                                             else b"\0" * (bits // 8)))
            area = TPMT_PUBLIC(
                type=TPM2_ALG.RSA, nameAlg=name_alg, objectAttributes=attrs, authPolicy=policy,
                parameters=TPMU_PUBLIC_PARMS(rsaDetail=TPMS_RSA_PARMS(
                    symmetric=sym, scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                    keyBits=bits, exponent=0)),
                unique=unique,
            )
        else:
            curve, size = {"ecc-p256": (TPM2_ECC.NIST_P256, 32),
                           "ecc-p384": (TPM2_ECC.NIST_P384, 48),
                           "ecc-p521": (TPM2_ECC.NIST_P521, 66)}[self.alg]
            zeros = b"" if self.high_range else b"\0" * size
            area = TPMT_PUBLIC(
                type=TPM2_ALG.ECC, nameAlg=name_alg, objectAttributes=attrs, authPolicy=policy,
                parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
                    symmetric=sym, scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL), curveID=curve,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL))),
                unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=zeros, y=zeros)),
            )
        return TPM2B_PUBLIC(publicArea=area)


# EK Credential Profile: low-range and high-range EK certificate NV indices.
EK_TEMPLATES: tuple[EkTemplate, ...] = (
    EkTemplate("L-1", "rsa-2048", 0x01C00002, "sha256", False, 128),
    EkTemplate("L-2", "ecc-p256", 0x01C0000A, "sha256", False, 128),
    EkTemplate("H-1", "rsa-2048", 0x01C00012, "sha256", True, 128),
    EkTemplate("H-2", "ecc-p256", 0x01C00014, "sha256", True, 128),
    EkTemplate("H-3", "ecc-p384", 0x01C00016, "sha384", True, 256),
    EkTemplate("H-4", "ecc-p521", 0x01C00018, "sha512", True, 256),
    EkTemplate("H-5", "ecc-sm2-p256", 0x01C0001A, "sha256", True, 128, creatable=False),
    EkTemplate("H-6", "rsa-3072", 0x01C0001C, "sha384", True, 256),
    EkTemplate("H-7", "rsa-4096", 0x01C0001E, "sha384", True, 256),
)
ALWAYS_REPORTED = ("L-1", "L-2")


@dataclass(frozen=True)
class EkInfo:
    """One endorsement key of the TPM and its certificate, if the TPM has one."""

    alg: str  # "rsa-2048", "ecc-p256", "ecc-p384", ...
    source: str  # "persistent 0x81010001" | "template L-2" | "certificate 0x01c0001a"
    public_key_der: bytes  # SubjectPublicKeyInfo
    fingerprint: str  # SHA-256 hex of public_key_der
    cert_der: bytes | None
    cert_index: int | None
    cert_fingerprint: str | None  # SHA-256 hex of cert_der
    template: str = ""  # "L-1", "H-3", ...
    cert_matches_key: bool | None = None  # None without certificate


def _create_ek_public(tpm: TpmContext, template: EkTemplate) -> TPM2B_PUBLIC | None:
    """Create the EK from ``template``, read its public area, flush it; None if unsupported."""

    esapi = tpm.esapi
    try:
        ek_template = template.public()
        with tpm.creating(f"the {template.name} EK", template=ek_template), \
                tpm_call(f"creating the EK from template {template.name}", tpm,
                         handles=("the endorsement hierarchy",)):
            handle, public, _, _, _ = esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), ek_template, ESYS_TR.ENDORSEMENT)
            tpm.track(handle, f"the {template.name} EK")
    except TpmError as e:
        if tpm_code(e) in UNSUPPORTED_CODES:
            log.info("TPM cannot create EK template %s (%s): %s", template.name, template.alg, e)
            return None
        raise
    flush_transient(tpm, handle, f"the {template.name} EK")
    return public


def _spki(public: TPM2B_PUBLIC) -> bytes:
    return public_key_from_tpm(public).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert_spki(cert_der: bytes) -> bytes | None:
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        return cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception as e:  # malformed or exotic certificates are reported, not fatal
        log.warning("cannot parse the EK certificate: %s", e)
        return None


def read_eks(tpm: TpmContext, *, from_certificates: bool = False) -> list[EkInfo]:
    """All endorsement keys tpmid can find, in EK-template order (L-1, L-2, H-1 ...).

    ``from_certificates`` (provisioning, where every TPM command counts): the EKs
    that have a certificate, each with the public key its certificate certifies —
    no persistent EK is read and no EK is created (``cert_matches_key`` stays
    unknown). A TPM without any EK certificate is read the full way.
    """
    if from_certificates:
        eks = _eks_from_certificates(tpm)
        if eks:
            return eks
    with tpm.lock:
        nv = set(tpm.nv_indices())
        persistent: dict[str, tuple[int, TPM2B_PUBLIC]] = {}
        fields = {t.name: template_fields(t.public()) for t in EK_TEMPLATES if t.creatable}
        for handle in tpm.persistent_handles():
            if not EK_PERSISTENT_FIRST <= handle <= EK_PERSISTENT_LAST:
                continue
            public = read_persistent_public(tpm, handle)
            if public is None:
                continue
            found = template_fields(public)
            for name, f in fields.items():
                if f == found and name not in persistent:
                    persistent[name] = (handle, public)
                    break
        out: list[EkInfo] = []
        for t in EK_TEMPLATES:
            cert: bytes | None = None
            if t.cert_index in nv:
                cert = der_prefix(read_nv(tpm, t.cert_index))
            spki: bytes | None
            if t.name in persistent:
                handle, public = persistent[t.name]
                spki, source = _spki(public), f"persistent {handle:#010x}"
            elif cert is not None or t.name in ALWAYS_REPORTED:
                created = _create_ek_public(tpm, t) if t.creatable else None
                if created is not None:
                    spki, source = _spki(created), f"template {t.name}"
                elif cert is not None and (spki := _cert_spki(cert)) is not None:
                    source = f"certificate {t.cert_index:#010x}"
                else:
                    continue
            else:
                continue
            matches = None
            if cert is not None:
                matches = _cert_spki(cert) == spki
                if not matches:
                    log.warning("EK certificate in %#010x does not certify the %s EK",
                                t.cert_index, t.name)
            out.append(EkInfo(
                alg=t.alg, source=source, public_key_der=spki,
                fingerprint=hashlib.sha256(spki).hexdigest(),
                cert_der=cert, cert_index=t.cert_index if cert is not None else None,
                cert_fingerprint=hashlib.sha256(cert).hexdigest() if cert is not None else None,
                template=t.name, cert_matches_key=matches,
            ))
        return out


def _eks_from_certificates(tpm: TpmContext) -> list[EkInfo]:
    out: list[EkInfo] = []
    with tpm.lock:
        nv = set(tpm.nv_indices())
        for t in EK_TEMPLATES:
            if t.cert_index not in nv:
                continue
            cert = der_prefix(read_nv(tpm, t.cert_index))
            spki = _cert_spki(cert)
            if spki is None:
                continue
            out.append(EkInfo(
                alg=t.alg, source=f"certificate {t.cert_index:#010x}", public_key_der=spki,
                fingerprint=hashlib.sha256(spki).hexdigest(), cert_der=cert,
                cert_index=t.cert_index, cert_fingerprint=hashlib.sha256(cert).hexdigest(),
                template=t.name, cert_matches_key=None,
            ))
    return out


def primary_ek(eks: list[EkInfo]) -> EkInfo:
    """The EK that identifies the device: the first RSA-2048 EK, else the first ECC EK.

    "First" is EK-template order (L-1 before H-1, L-2 before H-2 ...). RSA-2048
    comes first because it is the EK every TPM 2.0 certification requires and
    the one with a certificate on most hardware.
    """
    if not eks:
        raise TpmError("the TPM has no endorsement key tpmid can read")
    for ek in eks:
        if ek.alg == "rsa-2048":
            return ek
    for ek in eks:
        if ek.alg.startswith("ecc-"):
            return ek
    return eks[0]


def device_fingerprint(eks: list[EkInfo]) -> str:
    """SHA-256 hex of the SubjectPublicKeyInfo of :func:`primary_ek` (documented precedence)."""
    return primary_ek(eks).fingerprint
