"""Facts about a TPM for ``tpmid tpm info``: vendor, versions, algorithms, lockout state.

All values come from TPM2_GetCapability (TPM 2.0 Part 3 §30.2); property
numbers are TPM_PT values of Part 2 §6.13, permanent and startup flags are
TPMA_PERMANENT (§8.6) and TPMA_STARTUP_CLEAR (§8.7).
"""

from __future__ import annotations

from typing import Any

from tpm2_pytss.constants import TPM2_ALG, TPM2_CAP

from tpmid.tpm.context import TpmContext
from tpmid.tpm.rc import tpm_call

PT_FAMILY_INDICATOR = 0x100
PT_LEVEL = 0x101
PT_REVISION = 0x102
PT_DAY_OF_YEAR = 0x103
PT_YEAR = 0x104
PT_MANUFACTURER = 0x105
PT_VENDOR_STRING_1 = 0x106
PT_VENDOR_TPM_TYPE = 0x10A
PT_FIRMWARE_VERSION_1 = 0x10B
PT_FIRMWARE_VERSION_2 = 0x10C
PT_HR_TRANSIENT_MIN = 0x10E
PT_HR_PERSISTENT_MIN = 0x10F
PT_NV_BUFFER_MAX = 0x12C
PT_PERMANENT = 0x200
PT_STARTUP_CLEAR = 0x201
PT_HR_TRANSIENT_AVAIL = 0x207
PT_HR_PERSISTENT_AVAIL = 0x209
PT_LOCKOUT_COUNTER = 0x20E
PT_MAX_AUTH_FAIL = 0x20F
PT_LOCKOUT_INTERVAL = 0x210
PT_LOCKOUT_RECOVERY = 0x211

# TPMA_PERMANENT bits (Part 2 §8.6).
PERM_OWNER_AUTH_SET = 1 << 0
PERM_ENDORSEMENT_AUTH_SET = 1 << 1
PERM_LOCKOUT_AUTH_SET = 1 << 2
PERM_DISABLE_CLEAR = 1 << 8
PERM_IN_LOCKOUT = 1 << 9
# TPMA_STARTUP_CLEAR bits (Part 2 §8.7).
SU_PH_ENABLE = 1 << 0
SU_SH_ENABLE = 1 << 1
SU_EH_ENABLE = 1 << 2

# TCG Algorithm Registry, TPM_ECC_CURVE.
ECC_CURVE_NAMES = {
    0x0001: "NIST P-192", 0x0002: "NIST P-224", 0x0003: "NIST P-256", 0x0004: "NIST P-384",
    0x0005: "NIST P-521", 0x0010: "BN P-256", 0x0011: "BN P-638", 0x0020: "SM2 P-256",
    0x0030: "Brainpool P-256 r1", 0x0031: "Brainpool P-384 r1", 0x0032: "Brainpool P-512 r1",
    0x0040: "Curve25519", 0x0041: "Curve448",
}


def _ascii(*words: int) -> str:
    """Decode big-endian 32-bit words of ASCII, dropping NULs and padding."""
    raw = b"".join(w.to_bytes(4, "big") for w in words)
    return raw.replace(b"\0", b"").decode("ascii", errors="replace").strip()


def _alg_name(alg: int) -> str:
    try:
        name = str(TPM2_ALG(alg))
    except (ValueError, TypeError):
        name = ""
    return name if name and not name.isdigit() else f"{alg:#06x}"


def tpm_info(tpm: TpmContext) -> dict[str, Any]:
    """A JSON-ready description of the TPM (see ``docs/cli.md``, ``tpmid tpm info``)."""
    with tpm.lock:
        fixed = tpm.properties(0x100, 0x100)
        var = tpm.properties(0x200, 0x100)
        algs: list[str] = []
        curves: list[str] = []
        with tpm_call("listing algorithms and curves", tpm):
            start = 0
            while True:
                more, data = tpm.esapi.get_capability(TPM2_CAP.ALGS, start, 128)
                batch = list(data.data.algorithms)
                algs.extend(_alg_name(int(a.alg)) for a in batch)
                if not more or not batch:
                    break
                start = int(batch[-1].alg) + 1
            start = 0
            while True:
                more, data = tpm.esapi.get_capability(TPM2_CAP.ECC_CURVES, start, 64)
                batch_c = [int(c) for c in data.data.eccCurves]
                curves.extend(ECC_CURVE_NAMES.get(c, f"{c:#06x}") for c in batch_c)
                if not more or not batch_c:
                    break
                start = batch_c[-1] + 1
        persistent = tpm.persistent_handles()
        transient = tpm.transient_handles()

    manufacturer = fixed.get(PT_MANUFACTURER, 0)
    fw1 = fixed.get(PT_FIRMWARE_VERSION_1, 0)
    fw2 = fixed.get(PT_FIRMWARE_VERSION_2, 0)
    revision = fixed.get(PT_REVISION, 0)
    permanent = var.get(PT_PERMANENT, 0)
    startup = var.get(PT_STARTUP_CLEAR, 0)
    return {
        "tcti": tpm.tcti,
        "manufacturer": _ascii(manufacturer),
        "manufacturer_hex": f"{manufacturer:#010x}",
        "vendor_string": _ascii(*(fixed.get(PT_VENDOR_STRING_1 + i, 0) for i in range(4))),
        "vendor_tpm_type": fixed.get(PT_VENDOR_TPM_TYPE, 0),
        # TCG PC Client PTP: firmware version is vendor-defined; tpm2-tools prints the
        # 16-bit halves of the two words, as does tpmid.
        "firmware_version": f"{fw1 >> 16}.{fw1 & 0xFFFF}.{fw2 >> 16}.{fw2 & 0xFFFF}",
        "firmware_version_hex": f"{fw1:#010x} {fw2:#010x}",
        "spec": {
            "family": _ascii(fixed.get(PT_FAMILY_INDICATOR, 0)),
            "level": fixed.get(PT_LEVEL, 0),
            "revision": f"{revision // 100}.{revision % 100:02d}",
            "day_of_year": fixed.get(PT_DAY_OF_YEAR, 0),
            "year": fixed.get(PT_YEAR, 0),
        },
        "algorithms": algs,
        "ecc_curves": curves,
        "persistent_handles": [f"{h:#010x}" for h in persistent],
        "transient_handles": [f"{h:#010x}" for h in transient],
        "transient_slots": fixed.get(PT_HR_TRANSIENT_MIN, 0),
        "persistent_slots_available": var.get(PT_HR_PERSISTENT_AVAIL),
        "nv_buffer_max": fixed.get(PT_NV_BUFFER_MAX, 0),
        "auth_set": {
            "owner": bool(permanent & PERM_OWNER_AUTH_SET),
            "endorsement": bool(permanent & PERM_ENDORSEMENT_AUTH_SET),
            "lockout": bool(permanent & PERM_LOCKOUT_AUTH_SET),
        },
        "hierarchies_enabled": {
            "platform": bool(startup & SU_PH_ENABLE),
            "owner": bool(startup & SU_SH_ENABLE),
            "endorsement": bool(startup & SU_EH_ENABLE),
        },
        "clear_disabled": bool(permanent & PERM_DISABLE_CLEAR),
        "lockout": {
            "counter": var.get(PT_LOCKOUT_COUNTER, 0),
            "max_tries": var.get(PT_MAX_AUTH_FAIL, 0),
            "interval_s": var.get(PT_LOCKOUT_INTERVAL, 0),
            "recovery_s": var.get(PT_LOCKOUT_RECOVERY, 0),
            "in_lockout": bool(permanent & PERM_IN_LOCKOUT),
        },
    }
