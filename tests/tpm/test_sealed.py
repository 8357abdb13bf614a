"""Secrets sealed to the TPM (tpmid.tpm.sealed) on a real swtpm.

What the docs promise: the value comes back only from this TPM, a PCR-bound one
stops opening once a PCR changes, TPM2_Clear does not lose it (a change of the
endorsement seed does), nothing stays loaded, and the value never crosses the
TPM connection in clear.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import TPM2B_ECC_POINT, TPML_DIGEST_VALUES, TPMS_ECC_POINT, TPMT_HA, TPMU_HA

from tpmid.errors import SealedSecretError
from tpmid.store import Store
from tpmid.store.ledger import TransientLedger
from tpmid.store.sealed import SealedBlob, SealedSecrets
from tpmid.testing.swtpm import Swtpm
from tpmid.testing.tpmproxy import TpmProxy
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.sealed import _create_sealing_key

VALUE = b"est-basic-password-7f3a9c"
NOW = "2026-11-28T10:00:00Z"
SESSIONS = (0x02000000, 0x03000000)  # HMAC/loaded and policy session handle ranges


def extend_pcr16(tpm: TpmConnection) -> None:
    digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x5a" * 32))
    tpm.esapi.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([digest]))


def assert_nothing_left(tpm: TpmConnection) -> None:
    assert tpm.transient_handles() == []
    assert [h for first in SESSIONS for h in tpm.handles(first)] == []


def test_a_sealed_secret_opens_again_and_leaves_nothing_loaded(
    swtpm: Swtpm, tmp_path: Path,
) -> None:
    ledger = TransientLedger(tmp_path / "tpm.lock.objects.json")
    with TpmConnection(swtpm.tcti, ledger=ledger) as tpm:
        blob = tpm.seal_secret("est", VALUE, sealed_at=NOW)
        assert_nothing_left(tpm)
        value = tpm.unseal_secret(blob)
        assert isinstance(value, bytearray) and value == VALUE
        assert_nothing_left(tpm)
    assert ledger.entries() == []  # every object it loaded was recorded and flushed


def test_the_stored_blob_holds_no_plaintext_and_round_trips(swtpm: Swtpm, tmp_path: Path) -> None:
    secrets = SealedSecrets(Store(tmp_path / "store").root)
    with TpmConnection(swtpm.tcti) as tpm:
        path = secrets.save(tpm.seal_secret("est", VALUE, sealed_at=NOW))
        assert VALUE not in path.read_bytes()
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert tpm.unseal_secret(secrets.load("est")) == VALUE


def test_two_seals_of_one_value_differ(swtpm: Swtpm) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        a = tpm.seal_secret("est", VALUE, sealed_at=NOW)
        b = tpm.seal_secret("est", VALUE, sealed_at=NOW)
    assert a.key_name == b.key_name  # the same key of this TPM ...
    assert a.ciphertext != b.ciphertext  # ... but a fresh ECDH share and nonce each time


def test_a_pcr_bound_secret_stops_opening_when_the_pcr_changes(swtpm: Swtpm) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        blob = tpm.seal_secret("est", VALUE, pcrs=(16,), sealed_at=NOW)
        assert blob.bound() == "sha256:16"
        assert tpm.unseal_secret(blob) == VALUE  # PCR 16 unchanged
        tpm.check_sealed_secret(blob)
        extend_pcr16(tpm)
        with pytest.raises(SealedSecretError, match="would refuse to open it"):
            tpm.check_sealed_secret(blob)  # tells without unsealing
        with pytest.raises(SealedSecretError) as e:
            tpm.unseal_secret(blob)
        assert "bound to PCRs sha256:16, which changed since it was sealed" in e.value.message
        assert e.value.hint is not None and "tpmid secret seal est --force" in e.value.hint
        assert e.value.exit_code == 3  # a TPM error, like the others
        assert_nothing_left(tpm)
        # Sealed again under the new value, it opens.
        assert tpm.unseal_secret(tpm.seal_secret("est", VALUE, pcrs=(16,),
                                                 sealed_at=NOW)) == VALUE


def test_a_pcr_bound_key_cannot_be_used_without_its_policy(swtpm: Swtpm) -> None:
    """No userWithAuth: a plain password authorization of the sealing key is refused."""
    with TpmConnection(swtpm.tcti) as tpm:
        blob = tpm.seal_secret("est", VALUE, pcrs=(16,), sealed_at=NOW)
        handle, _ = _create_sealing_key(tpm, blob.policy)
        try:
            with pytest.raises(Exception, match="auth"):
                tpm.esapi.ecdh_zgen(handle, _point(blob))
        finally:
            tpm.esapi.flush_context(handle)


@pytest.mark.parametrize("pcrs", [(), (16,)], ids=["unbound", "pcr-bound"])
def test_a_sealed_secret_survives_tpm2_clear(swtpm: Swtpm, pcrs: tuple[int, ...]) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        blob = tpm.seal_secret("est", VALUE, pcrs=pcrs, sealed_at=NOW)
        # TPM 2.0 Part 3 §24.6: new storage seed, new proofs, owner objects gone.
        tpm.esapi.clear(ESYS_TR.PLATFORM)
    with TpmConnection(swtpm.tcti) as tpm:
        assert tpm.unseal_secret(blob) == VALUE


def test_a_new_endorsement_seed_loses_the_secret_with_a_clear_error(swtpm: Swtpm) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        blob = tpm.seal_secret("est", VALUE, sealed_at=NOW)
        tpm.esapi.change_eps(ESYS_TR.PLATFORM)  # what a replaced TPM looks like
        with pytest.raises(SealedSecretError, match="sealed to another key than this TPM's"):
            tpm.unseal_secret(blob)
        assert_nothing_left(tpm)


def test_an_altered_blob_is_refused(swtpm: Swtpm) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        blob = tpm.seal_secret("est", VALUE, sealed_at=NOW)
        flipped = bytes([blob.ciphertext[0] ^ 1]) + blob.ciphertext[1:]
        for bad in (dataclasses.replace(blob, ciphertext=flipped),
                    dataclasses.replace(blob, name="other")):  # the name is authenticated
            with pytest.raises(SealedSecretError, match="altered or damaged"):
                tpm.unseal_secret(bad)
        assert_nothing_left(tpm)


def _point(blob: SealedBlob) -> TPM2B_ECC_POINT:
    x, y = blob.ephemeral[1:33], blob.ephemeral[33:]
    return TPM2B_ECC_POINT(TPMS_ECC_POINT(x=x, y=y))


def test_neither_the_secret_nor_the_shared_point_crosses_the_tpm_connection_in_clear(
    swtpm: Swtpm,
) -> None:
    with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port, record=True).start() as proxy:
        with TpmConnection(proxy.tcti) as tpm:
            blob = tpm.seal_secret("est", VALUE, sealed_at=NOW)
            assert tpm.unseal_secret(blob) == VALUE
            ours = proxy.wire
            assert "TPM2_ECDH_ZGen" in proxy.commands
            # The same ZGen without an encrypting session shows the shared point on the
            # wire: the test can see it when it is there.
            handle, _ = _create_sealing_key(tpm, b"")
            try:
                out = tpm.esapi.ecdh_zgen(handle, _point(blob))  # kept: pytss frees it
                z = bytes(out.point.x)
            finally:
                tpm.esapi.flush_context(handle)
            assert z in proxy.wire[len(ours):]
    assert VALUE not in ours
    assert z not in ours


def test_blob_file_format_names_its_binding_but_no_value(swtpm: Swtpm) -> None:
    with TpmConnection(swtpm.tcti) as tpm:
        blob = tpm.seal_secret("est", VALUE, pcrs=(16, 7), sealed_at=NOW)
    doc = json.loads(json.dumps(blob.to_json()))
    assert doc["format"] == "tpmid-sealed-secret/1"
    assert (doc["name"], doc["pcr_bank"], doc["pcrs"]) == ("est", "sha256", [16, 7])
    assert SealedBlob.from_json(doc) == blob


def test_why_not_a_sealed_object_a_keyedhash_child_of_an_endorsement_primary_dies_with_clear(
    swtpm: Swtpm,
) -> None:
    """The design note of docs/sealed-secrets.md, kept true: TPM2_Clear changes the
    endorsement hierarchy's proof, and a sealed *object* under an endorsement primary no
    longer loads afterwards, while the primary itself comes back the same."""
    from tpm2_pytss.constants import TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPM2B_SENSITIVE_DATA,
        TPMS_SENSITIVE_CREATE,
        TPMT_PUBLIC,
    )

    from tpmid.tpm.templates import storage_parent_template

    sealed_object = TPM2B_PUBLIC(TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256,
        objectAttributes=(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                          | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)))
    sealed_object.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    with TpmConnection(swtpm.tcti) as tpm:
        e = tpm.esapi
        parent, before, *_ = e.create_primary(TPM2B_SENSITIVE_CREATE(), storage_parent_template(),
                                              ESYS_TR.ENDORSEMENT)
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(
            data=TPM2B_SENSITIVE_DATA(VALUE)))
        private, public, *_ = e.create(parent, sensitive, sealed_object)
        e.flush_context(parent)
        e.clear(ESYS_TR.PLATFORM)
        parent, after, *_ = e.create_primary(TPM2B_SENSITIVE_CREATE(), storage_parent_template(),
                                             ESYS_TR.ENDORSEMENT)
        try:
            assert bytes(after.publicArea.unique.ecc.x) == bytes(before.publicArea.unique.ecc.x)
            with pytest.raises(Exception, match="integrity"):
                e.load(parent, private, public)
        finally:
            e.flush_context(parent)
