"""After TPM2_Clear a device heals itself, or says exactly what it needs (real swtpm).

TPM2_Clear (TPM 2.0 Part 3 §24.6) changes the storage primary seed (every key
file made under the old storage root key is lost), evicts the owner's persistent
objects (the persistent IDevID), deletes the owner's NV indices (an NV copy of
the IDevID certificate) and resets the owner password. The endorsement seed
stays, so the IDevID re-derives from its template.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from tpm2_pytss.constants import ESYS_TR

from tests.faults.conftest import IDEVID_HANDLE, Field, assert_key_signs
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.identity import spki_of

CERT_NV = 0x01800100


def _clear(field: Field) -> None:
    with TpmConnection(field.sim.tcti) as tpm:
        tpm.esapi.clear(ESYS_TR.LOCKOUT)


def _renewed_through_the_idevid(field: Field, name: str) -> None:
    rc, _, err = field.cli("renew", name, "--force")
    assert rc == 0, err
    assert field.server.issued()[-1]["operation"] == "simpleenroll"
    assert_key_signs(field, name, field.current(name))


def test_the_nv_copy_of_the_idevid_certificate_is_written_again(field: Field) -> None:
    idevid = field.current("idevid")
    with TpmConnection(field.sim.tcti) as tpm:
        tpm.write_certificate_nv(CERT_NV, idevid.cert.public_bytes(serialization.Encoding.DER),
                                 same_key_spki=spki_of(idevid.cert))
    field.edit(lambda d: d["identities"]["idevid"]["key"].update(cert_nv=f"{CERT_NV:#x}"))
    _clear(field)
    with TpmConnection(field.sim.tcti) as tpm:
        assert CERT_NV not in tpm.nv_indices()
    _renewed_through_the_idevid(field, "ldevid")
    with TpmConnection(field.sim.tcti) as tpm:
        assert tpm.read_certificate_nv(CERT_NV) == idevid.cert
        assert IDEVID_HANDLE in tpm.persistent_handles()


def test_an_owner_password_set_after_the_clear_is_asked_for_by_name(field: Field) -> None:
    _clear(field)
    with TpmConnection(field.sim.tcti) as tpm:  # the owner takes the TPM again
        tpm.esapi.hierarchy_change_auth(ESYS_TR.OWNER, b"new-owner")
    rc, _, err = field.cli("renew", "ldevid", "--force")
    assert rc == 3, err
    assert "tpm.auth.owner" in err
    assert "Traceback" not in err
    field.edit(lambda d: d["tpm"].update(auth={"owner": {"env": "OWNER_PW"}}))
    rc, _, err = field.cli("renew", "ldevid", "--force",
                           env={**field.env, "OWNER_PW": "new-owner"})
    assert rc == 0, err
    assert_key_signs(field, "ldevid", field.current("ldevid"), owner=b"new-owner")


def test_an_ek_derived_idevid_needs_nothing_restored(field_device: Field) -> None:
    f = field_device
    f.edit(lambda d: d["identities"]["idevid"].update(
        key={"kind": "ek-derived", "template": "H-2"}))
    f.enroll_all()
    _clear(f)
    _renewed_through_the_idevid(f, "ldevid")
    with TpmConnection(f.sim.tcti) as tpm:
        assert IDEVID_HANDLE not in tpm.persistent_handles()  # nothing is persisted for it


def test_a_changed_endorsement_seed_is_reported_and_nothing_is_persisted(field: Field) -> None:
    with TpmConnection(field.sim.tcti) as tpm:
        tpm.esapi.change_eps(ESYS_TR.PLATFORM)  # the IDevID can never come back
    _clear(field)
    rc, _, err = field.cli("renew", "ldevid", "--force")
    assert rc == 3, err
    assert "is not the key of the stored IDevID certificate" in err
    assert "tpmid provision" in err
    with TpmConnection(field.sim.tcti) as tpm:
        assert IDEVID_HANDLE not in tpm.persistent_handles()
    assert field.current("ldevid").version == field.before["ldevid"].version


@pytest.mark.parametrize("name", ["ldevid", "edge-ca"])
def test_status_and_check_after_the_clear_name_the_lost_key(field: Field, name: str) -> None:
    _clear(field)
    rc, out, _ = field.cli("check", "--no-est")
    assert rc == 1
    assert "TPM" in out and name in out
