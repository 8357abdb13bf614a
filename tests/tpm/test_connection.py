"""TpmConnection and TSS2 error mapping, against a real swtpm.

Every error here is produced by a real TPM (or a real closed socket); nothing is
faked.
"""

from __future__ import annotations

import socket
import threading

import pytest
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_RC
from tpm2_pytss.types import TPM2B_AUTH, TPM2B_SENSITIVE_CREATE, TPMS_SENSITIVE_CREATE

from tests.tpm.helpers import transient_objects
from tpmid.errors import TpmError
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm import idevid, loaded, templates
from tpmid.tpm.connection import HierarchyPasswords, TpmConnection
from tpmid.tpm.rc import tpm_call, tpm_code

RC_AUTH_FAIL = int(TPM2_RC.AUTH_FAIL)
RC_BAD_AUTH = int(TPM2_RC.BAD_AUTH)
RC_CURVE = int(TPM2_RC.CURVE)
RC_HANDLE = int(TPM2_RC.HANDLE)
RC_LOCKOUT = int(TPM2_RC.LOCKOUT)
RC_OBJECT_MEMORY = int(TPM2_RC.OBJECT_MEMORY)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_tpm_error_names_the_tcti() -> None:
    tcti = f"swtpm:host=127.0.0.1,port={_closed_port()}"
    with pytest.raises(TpmError) as err:  # at the first command: connecting costs none
        TpmConnection(tcti).properties(0x100, 1)
    assert "TPM not reachable" in err.value.message
    assert tcti in err.value.message
    assert err.value.hint and "running" in err.value.hint


def test_missing_device_error_names_the_device_and_permissions() -> None:
    with pytest.raises(TpmError) as err:
        TpmConnection("device:/dev/tpmrm-does-not-exist")
    assert "device:/dev/tpmrm-does-not-exist" in err.value.message
    assert err.value.hint and "tss" in err.value.hint


def test_unknown_tcti_module_is_reported_as_such() -> None:
    with pytest.raises(TpmError) as err:
        TpmConnection("bogus:whatever")
    assert "cannot load the TCTI module 'bogus'" in err.value.message


def test_tpm_that_goes_away_mid_session_is_reported_unreachable(swtpm: Swtpm) -> None:
    tpm = TpmConnection(swtpm.tcti)
    try:
        swtpm.stop()
        with pytest.raises(TpmError) as err:
            tpm.transient_handles()
        assert "not reachable" in err.value.message and swtpm.tcti in err.value.message
    finally:
        tpm.close()


def test_connection_starts_a_power_cycled_tpm_like_firmware_would(swtpm: Swtpm) -> None:
    swtpm.power_cycle()
    with TpmConnection(swtpm.tcti) as tpm:
        assert tpm.persistent_handles()  # would be TPM_RC_INITIALIZE without Startup
        with idevid.derive_idevid(tpm, "H-2") as key:
            assert key.alg == "ecc-p256"


def test_closed_connection_refuses_use(swtpm: Swtpm) -> None:
    tpm = TpmConnection(swtpm.tcti)
    tpm.close()
    tpm.close()  # idempotent
    with pytest.raises(TpmError, match="already closed"):
        _ = tpm.esapi


def test_hierarchy_passwords_never_show_in_repr() -> None:
    pw = HierarchyPasswords(owner=b"owner-secret", endorsement=b"eh-secret", lockout=b"lk")
    assert "secret" not in repr(pw) and "lk" not in repr(pw)


def test_wrong_owner_password_names_the_owner_hierarchy_and_the_config_key(
        swtpm: Swtpm) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        tpm.esapi.hierarchy_change_auth(ESYS_TR.OWNER, b"right-owner-pw")
    with TpmConnection(swtpm.tcti, HierarchyPasswords(owner=b"wrong-owner-pw")) as tpm:
        with pytest.raises(TpmError) as err:
            idevid.create_persistent_idevid(tpm, "H-2", 0x81020000)
        assert err.value.rc is not None and tpm_code(err.value) == RC_BAD_AUTH
        assert "authorization failed for the owner hierarchy" in err.value.message
        assert err.value.hint and "tpm.auth.owner" in err.value.hint
        assert "pw" not in err.value.message + err.value.hint
    with TpmConnection(swtpm.tcti, HierarchyPasswords(owner=b"right-owner-pw")) as tpm:
        assert idevid.create_persistent_idevid(tpm, "H-2", 0x81020000).created
    assert transient_objects(swtpm) == []


def test_wrong_endorsement_password_names_the_endorsement_hierarchy(swtpm: Swtpm) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        tpm.esapi.hierarchy_change_auth(ESYS_TR.ENDORSEMENT, b"eh-pw")
    with TpmConnection(swtpm.tcti) as tpm, pytest.raises(TpmError) as err:
        idevid.derive_idevid(tpm, "H-2")
    assert "endorsement hierarchy" in err.value.message
    assert err.value.hint and "tpm.auth.endorsement" in err.value.hint
    with TpmConnection(swtpm.tcti, HierarchyPasswords(endorsement=b"eh-pw")) as tpm:
        idevid.derive_idevid(tpm, "H-2").close()


def test_wrong_key_password_then_lockout_report_counter_and_wait_time(tpm: TpmConnection) -> None:
    """A DA-protected key with a password, wrong password until the TPM locks out."""
    esapi = tpm.esapi
    esapi.dictionary_attack_parameters(2, 600, 900, ESYS_TR.LOCKOUT)
    sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(b"key-pw")))
    handle, public, _, _, _ = esapi.create_primary(sensitive, templates.idevid_template("H-2"),
                                                   ESYS_TR.OWNER)
    with loaded.LoadedKey(tpm, handle, public, transient=True, description="the test key") as key:
        esapi.tr_set_auth(handle, b"not-the-key-pw")
        with pytest.raises(TpmError) as first:
            key.sign_digest(b"\x01" * 32)
        assert first.value.rc is not None and tpm_code(first.value) == RC_AUTH_FAIL
        assert "authorization failed for the test key" in first.value.message
        assert "dictionary-attack" in first.value.message
        codes = [RC_AUTH_FAIL]
        while codes[-1] == RC_AUTH_FAIL and len(codes) <= 3:
            with pytest.raises(TpmError) as locked:
                key.sign_digest(b"\x01" * 32)
            assert locked.value.rc is not None
            codes.append(tpm_code(locked.value))
        assert codes[-1] == RC_LOCKOUT, codes
        assert "dictionary-attack lockout" in locked.value.message
        assert "2 allowed" in locked.value.message and "600 s" in locked.value.message
        assert locked.value.hint and "600 s" in locked.value.hint and "900 s" in locked.value.hint
        # Even the right password is refused while locked out.
        esapi.tr_set_auth(handle, b"key-pw")
        with pytest.raises(TpmError, match="lockout"):
            key.sign_digest(b"\x01" * 32)
    assert tpm.transient_handles() == []


def test_full_object_memory_asks_about_a_missing_resource_manager(swtpm: Swtpm) -> None:
    """Another client holds all transient slots, as a second process would without an RM."""
    with TpmConnection(swtpm.tcti) as other, TpmConnection(swtpm.tcti) as tpm:
        held = [idevid.derive_idevid(other, "H-2") for _ in range(3)]
        try:
            with pytest.raises(TpmError) as err:
                idevid.derive_idevid(tpm, "H-2")
            assert err.value.rc is not None
            assert tpm_code(err.value) == RC_OBJECT_MEMORY
            assert "3 transient slots" in err.value.message
            assert "resource manager" in err.value.message
        finally:
            for key in held:
                key.close()
    assert transient_objects(swtpm) == []


def test_missing_handle_names_the_handle(tpm: TpmConnection) -> None:
    with pytest.raises(TpmError) as err, tpm_call("opening a key", tpm,
                                                  handles=("key 0x81020005",)):
        tpm.esapi.tr_from_tpmpublic(0x81020005)
    assert err.value.rc is not None and tpm_code(err.value) == RC_HANDLE
    assert "key 0x81020005 does not exist in the TPM" in err.value.message


@pytest.mark.parametrize("curve", [0x0030, 0x0040], ids=["brainpool-p256", "curve25519"])
def test_unsupported_curve_is_reported_as_unsupported(tpm: TpmConnection, curve: int) -> None:
    public = templates.idevid_template("H-2")
    public.publicArea.parameters.eccDetail.curveID = curve
    with pytest.raises(TpmError) as err, tpm_call("creating a test key", tpm):
        tpm.esapi.create_primary(TPM2B_SENSITIVE_CREATE(), public, ESYS_TR.OWNER)
    assert err.value.rc is not None and tpm_code(err.value) == RC_CURVE
    assert "does not support the ECC curve" in err.value.message
    assert err.value.hint and "tpmid tpm info" in err.value.hint


@pytest.mark.parametrize(
    ("rc", "code", "handle", "parameter", "session"),
    [
        (0x9A2, 0x0A2, 0, 0, 1),
        (0x1DF, 0x09F, 0, 1, 0),
        (0x18B, 0x08B, 1, 0, 0),
        (0x921, 0x921, 0, 0, 0),
        (0x100, 0x100, 0, 0, 0),
        (0xC098E, 0x08E, 0, 0, 1),
        (0xA000A, None, 0, 0, 0),
        (0xB098E, None, 0, 0, 0),
    ],
    ids=["bad-auth-session-1", "integrity-param-1", "handle-1", "lockout-warning",
         "initialize", "auth-fail-through-resource-manager", "tcti-io-error",
         "resmgr-own-code"],
)
def test_return_codes_split_into_tpm_code_and_numbers(rc: int, code: int | None, handle: int,
                                                      parameter: int, session: int) -> None:
    e = TSS2_Exception(rc)
    assert tpm_code(e) == code
    if code is not None:
        assert (e.handle, e.parameter, e.session) == (handle, parameter, session)


def test_lock_serialises_signing_from_several_threads(tpm: TpmConnection) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    with idevid.derive_idevid(tpm, "H-2") as key:
        public = key.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                for i in range(5):
                    digest = bytes([n, i]) * 16
                    sig = key.sign_digest(digest)
                    public.verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
            except BaseException as e:  # collected and re-raised in the test thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_a_key_closed_after_the_tpm_went_away_does_not_hide_the_original_error(
        swtpm: Swtpm) -> None:
    tpm = TpmConnection(swtpm.tcti)
    try:
        with pytest.raises(TpmError) as err, idevid.derive_idevid(tpm, "H-2") as key:
            swtpm.stop()
            key.sign_digest(b"\x01" * 32)
        assert "while signing with ek-derived H-2 IDevID" in err.value.message
        assert "not reachable" in err.value.message
    finally:
        tpm.close()
