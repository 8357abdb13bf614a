"""What tpmid knows about identity-key algorithms and TCG templates, as plain data.

No TPM access and no tpm2-pytss import: commands that only describe keys
(``tpmid status``) read this without loading the TPM stack.

IDevID templates follow TCG "TPM 2.0 Keys for Device Identity and Attestation"
v1.00 r12 (2021): attributes §7.3.4.1 Table 3, algorithms §7.3.4.2 Table 4
(H-1 RSA-2048/SHA-256, H-2 ECC P-256/SHA-256, H-3 ECC P-384/SHA-384), the
``unique`` value "IDEVID" §7.3.1 and the authPolicy digests §7.3.6.6 Table 19.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpmid.errors import ConfigError


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

# NV indices tpmid may define for an IDevID certificate copy (TPM 2.0 Part 2 §13,
# TCG handle registry: 0x01C00000-0x01C0FFFF holds EK and platform certificates).
NV_INDEX_FIRST = 0x01000000
NV_INDEX_LAST = 0x01FFFFFF
NV_TCG_RESERVED = (0x01C00000, 0x01C0FFFF)


def check_nv_index(index: int) -> None:
    """ConfigError unless ``index`` is an NV index tpmid may define for a certificate."""
    if not NV_INDEX_FIRST <= index <= NV_INDEX_LAST:
        raise ConfigError(f"{index:#x} is not an NV index (0x01000000-0x01FFFFFF)",
                          hint="for example 0x01800100 (TCG handle registry: owner range)")
    if NV_TCG_RESERVED[0] <= index <= NV_TCG_RESERVED[1]:
        raise ConfigError(f"{index:#010x} is in the range the TCG reserves for EK and platform "
                          "certificates (0x01c00000-0x01c0ffff)",
                          hint="use an index from the owner range, e.g. 0x01800100")

# TCG DevID v1.00 r12 §7.3.1 and §7.3.6.6 Table 19: the IAK's unique value and its
# authPolicy (SHA-256). tpmid makes IAKs from the ECC P-256 template only (restricted
# signing, ECDSA with SHA-256), the algorithm the IDevID H-2 template uses.
IAK_UNIQUE = b"IAK"
IAK_POLICY_SHA256 = bytes.fromhex(
    "5437182326e414fca797d5f174615a1641f61255797c3a2b22c21d120b2d1e07")
IAK_ALG = "ecc-p256"
# tpmid's default place for a persistent IAK: next to the IDevID's 0x81020000.
DEFAULT_IAK_HANDLE = 0x81020001
