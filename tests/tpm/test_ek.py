"""Endorsement keys and their certificates, on a manufactured swtpm (EK certs in NV)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

from tests.tpm.helpers import transient_objects
from tpmid.errors import TpmError
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm import ek as ekmod
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import read_persistent_public


def _by_template(eks: list[ekmod.EkInfo]) -> dict[str, ekmod.EkInfo]:
    return {e.template: e for e in eks}


def test_manufactured_tpm_reports_persistent_eks_with_certificates_from_nv(
        swtpm: Swtpm, tpm: TpmConnection) -> None:
    eks = _by_template(ekmod.read_eks(tpm))
    assert list(eks) == ["L-1", "L-2", "H-3"]
    rsa, ecc, p384 = eks["L-1"], eks["L-2"], eks["H-3"]
    assert (rsa.alg, rsa.source, rsa.cert_index) == ("rsa-2048", "persistent 0x81010001",
                                                     0x01C00002)
    assert (p384.alg, p384.source, p384.cert_index) == ("ecc-p384", "persistent 0x81010016",
                                                        0x01C00016)
    issuer = x509.load_pem_x509_certificate((swtpm.ca_dir / "issuercert.pem").read_bytes())
    for e in (rsa, p384):
        assert e.cert_der is not None and e.cert_matches_key is True
        assert e.cert_fingerprint == hashlib.sha256(e.cert_der).hexdigest()
        assert e.fingerprint == hashlib.sha256(e.public_key_der).hexdigest()
        x509.load_der_x509_certificate(e.cert_der).verify_directly_issued_by(issuer)
    # No certificate for the L-2 EK: reported, not an error.
    assert (ecc.source, ecc.cert_der, ecc.cert_index, ecc.cert_fingerprint) == (
        "template L-2", None, None, None)
    assert tpm.transient_handles() == []


def test_ek_templates_re_create_the_eks_the_manufacturer_persisted(tpm: TpmConnection) -> None:
    before = _by_template(ekmod.read_eks(tpm))
    for handle in (0x81010001, 0x81010016):
        tr = tpm.esapi.tr_from_tpmpublic(handle)
        tpm.esapi.evict_control(ESYS_TR.OWNER, tr, handle)
    after = _by_template(ekmod.read_eks(tpm))
    assert after["L-1"].source == "template L-1" and after["H-3"].source == "template H-3"
    for name in ("L-1", "H-3"):
        assert after[name].public_key_der == before[name].public_key_der
        assert after[name].cert_matches_key is True
    assert tpm.transient_handles() == []


@pytest.mark.parametrize(
    ("what", "hash_name", "expected"),
    [
        ("policy_a", "sha256", "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"),
        ("policy_b", "sha256", "ca3d0a99a2b93906f7a3342414efcfb3a385d44cd1fd459089d19b5071c0b7a0"),
        ("policy_b", "sha384", "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419ca"
                               "cb47ba09699646150f9fc000f3f80e12"),
    ],
    ids=["policyA-sha256", "policyB-sha256", "policyB-sha384"],
)
def test_ek_policy_digests_equal_the_ek_credential_profile_values(
        what: str, hash_name: str, expected: str) -> None:
    assert getattr(ekmod, what)(hash_name).hex() == expected


def test_high_range_ek_policy_equals_the_manufactured_p384_ek_policy(tpm: TpmConnection) -> None:
    public = read_persistent_public(tpm, 0x81010016)
    assert public is not None
    assert bytes(public.publicArea.authPolicy) == ekmod.policy_b("sha384")


def test_tpm_clear_keeps_the_device_fingerprint_and_change_eps_changes_it(
        swtpm: Swtpm, tpm: TpmConnection) -> None:
    fingerprint = ekmod.device_fingerprint(ekmod.read_eks(tpm))
    tpm.esapi.clear(ESYS_TR.LOCKOUT)  # removes the persistent EKs; the seed stays
    eks = ekmod.read_eks(tpm)
    assert ekmod.device_fingerprint(eks) == fingerprint
    assert _by_template(eks)["L-1"].source == "template L-1"
    tpm.esapi.change_eps(ESYS_TR.PLATFORM)
    eks = _by_template(ekmod.read_eks(tpm))
    assert eks["L-1"].fingerprint != fingerprint
    # The certificates in NV still certify the old EKs.
    assert eks["L-1"].cert_matches_key is False
    tpm.close()
    assert transient_objects(swtpm) == []


@pytest.mark.parametrize(
    ("attrs", "size"),
    [
        (TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE | TPMA_NV.OWNERREAD | TPMA_NV.NO_DA, 2048),
        (TPMA_NV.OWNERREAD | TPMA_NV.OWNERWRITE | TPMA_NV.NO_DA, 1500),
    ],
    ids=["authread-2048-bytes", "ownerread-1500-bytes"],
)
def test_read_nv_reads_an_index_larger_than_one_nv_read(tpm: TpmConnection, attrs: int,
                                                        size: int) -> None:
    index = 0x01500010
    nv = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(nvIndex=index, nameAlg=TPM2_ALG.SHA256,
                                                 attributes=attrs, dataSize=size))
    tr = tpm.esapi.nv_define_space(b"", nv, ESYS_TR.OWNER)
    data = bytes((i * 7 + 3) % 256 for i in range(size))
    auth = tr if attrs & TPMA_NV.AUTHWRITE else ESYS_TR.OWNER
    for off in range(0, size, 512):
        tpm.esapi.nv_write(tr, data[off:off + 512], off, auth_handle=auth)
    tpm.esapi.tr_close(tr)
    assert tpm.properties(0x12C, 1)[0x12C] < size  # TPM_PT_NV_BUFFER_MAX: needs >1 read
    assert ekmod.read_nv(tpm, index) == data


def test_read_nv_of_a_missing_index_names_it(tpm: TpmConnection) -> None:
    with pytest.raises(TpmError, match="NV index 0x01500099"):
        ekmod.read_nv(tpm, 0x01500099)


def _ek(alg: str, tag: str) -> ekmod.EkInfo:
    der = f"{alg}-{tag}".encode()
    return ekmod.EkInfo(alg=alg, source="test", public_key_der=der,
                        fingerprint=hashlib.sha256(der).hexdigest(), cert_der=None,
                        cert_index=None, cert_fingerprint=None, template=tag)


@pytest.mark.parametrize(
    ("eks", "winner"),
    [
        ([_ek("rsa-2048", "L-1"), _ek("ecc-p256", "L-2")], "L-1"),
        ([_ek("ecc-p256", "L-2"), _ek("rsa-2048", "H-1")], "H-1"),
        ([_ek("ecc-p256", "L-2"), _ek("ecc-p384", "H-3")], "L-2"),
        ([_ek("rsa-3072", "H-6"), _ek("ecc-p384", "H-3")], "H-3"),
        ([_ek("rsa-4096", "H-7")], "H-7"),
    ],
    ids=["rsa2048-first", "rsa2048-even-after-ecc", "first-ecc", "ecc-over-other-rsa",
         "anything-else"],
)
def test_device_fingerprint_prefers_rsa_2048_then_the_first_ecc_ek(
        eks: list[ekmod.EkInfo], winner: str) -> None:
    assert ekmod.device_fingerprint(eks) == _by_template(eks)[winner].fingerprint


def test_device_fingerprint_without_any_ek_is_an_error() -> None:
    with pytest.raises(TpmError, match="no endorsement key"):
        ekmod.device_fingerprint([])
