"""``tpm_info`` reports what a real swtpm says about itself."""

from __future__ import annotations

from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.types import TPM2B_AUTH, TPM2B_SENSITIVE_CREATE, TPMS_SENSITIVE_CREATE

from tpmid.errors import TpmError
from tpmid.tpm import loaded, templates
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.info import tpm_info


def test_info_reports_vendor_versions_algorithms_and_handles(tpm: TpmConnection) -> None:
    info = tpm_info(tpm)
    assert (info["manufacturer"], info["manufacturer_hex"]) == ("IBM", "0x49424d00")
    assert info["vendor_string"].startswith("SW")
    assert info["spec"]["family"] == "2.0" and info["spec"]["level"] == 0
    assert info["spec"]["revision"].startswith("1.")
    assert {"rsa", "ecc", "sha256", "sha384", "ecdsa", "rsassa"} <= set(info["algorithms"])
    assert {"NIST P-256", "NIST P-384"} <= set(info["ecc_curves"])
    assert {"0x81010001", "0x81010016"} <= set(info["persistent_handles"])
    assert info["transient_slots"] == 3 and info["transient_handles"] == []
    assert info["nv_buffer_max"] >= 512
    assert info["hierarchies_enabled"] == {"platform": True, "owner": True, "endorsement": True}
    assert info["auth_set"] == {"owner": False, "endorsement": False, "lockout": False}
    assert info["lockout"]["counter"] == 0 and info["lockout"]["in_lockout"] is False
    assert len(info["firmware_version"].split(".")) == 4


def test_info_shows_passwords_set_and_the_lockout_state(tpm: TpmConnection) -> None:
    esapi = tpm.esapi
    esapi.dictionary_attack_parameters(1, 300, 400, ESYS_TR.LOCKOUT)
    sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(b"pw")))
    handle, public, _, _, _ = esapi.create_primary(sensitive, templates.idevid_template("H-2"),
                                                   ESYS_TR.OWNER)
    with loaded.LoadedKey(tpm, handle, public, transient=True, description="test key") as key:
        esapi.tr_set_auth(handle, b"wrong")
        for _ in range(2):
            try:
                key.sign_digest(b"\0" * 32)
            except TpmError:
                pass
    esapi.hierarchy_change_auth(ESYS_TR.OWNER, b"owner-pw")
    info = tpm_info(tpm)
    assert info["lockout"] == {"counter": 1, "max_tries": 1, "interval_s": 300,
                               "recovery_s": 400, "in_lockout": True}
    assert info["auth_set"]["owner"] is True
