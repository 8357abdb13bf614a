"""What tpmid makes of a server's CSR attributes (``tpmid.est.csrattrs``): a pure table.

RFC 7030 §4.5.2 lists what the server wants; :func:`plan_csr` decides what the CSR
honours for one identity, and says why it cannot honour the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.est.test_messages import A2, fixture
from tpmid.est.csrattrs import DeviceFacts, describe_oid, oid_name, plan_csr
from tpmid.est.messages import CsrAttr, decode_csrattrs

CHALLENGE = CsrAttr.of("1.2.840.113549.1.9.7")
P384 = CsrAttr.of("1.2.840.10045.2.1", "1.3.132.0.34")
P256 = CsrAttr.of("1.2.840.10045.2.1", "1.2.840.10045.3.1.7")
BRAINPOOL = CsrAttr.of("1.2.840.10045.2.1", "1.3.36.3.3.2.8.1.1.11")
SHA384_ECDSA = CsrAttr.of("1.2.840.10045.4.3.3")
SHA256_ECDSA = CsrAttr.of("1.2.840.10045.4.3.2")
SHA256_RSA = CsrAttr.of("1.2.840.113549.1.1.11")
RSA_2048 = CsrAttr(CsrAttr.of("1.2.840.113549.1.1.1").oid, (bytes.fromhex("02020800"),))
RSA_4096 = CsrAttr(CsrAttr.of("1.2.840.113549.1.1.1").oid, (bytes.fromhex("02021000"),))
SAN_REQUEST = CsrAttr.of("1.2.840.113549.1.9.14", "2.5.29.17")
MAC_REQUEST = CsrAttr.of("1.2.840.113549.1.9.14", "1.3.6.1.1.1.1.22")
SERIAL = CsrAttr.of("2.5.4.5")
EMAIL = CsrAttr.of("1.2.840.113549.1.9.1")
UNKNOWN = CsrAttr.of("2.999.1", "2.999.3")

FILE_P256 = DeviceFacts(alg="ecc-p256", alg_fixed=False)
IDEVID_P256 = DeviceFacts(alg="ecc-p256", alg_fixed=True, kind_note="the persistent IDevID")


@dataclass(frozen=True)
class Case:
    attrs: tuple[CsrAttr, ...]
    facts: DeviceFacts
    alg: str
    pop: bool = False
    unhonoured: tuple[str, ...] = ()  # substrings, one per unhonoured item
    honoured: tuple[str, ...] = field(default=())


CASES = {
    "file key follows P-384 and SHA-384": Case(
        (P384, SHA384_ECDSA), FILE_P256, "ecc-p384",
        honoured=("a new ECC NIST P-384 key", "ecdsa-with-SHA384")),
    "a signature algorithm alone names the key": Case((SHA384_ECDSA,), FILE_P256, "ecc-p384"),
    "RSA-2048 by key size (RFC 9908 form)": Case((RSA_2048, SHA256_RSA), FILE_P256,
                                                 "rsa-2048"),
    "what the key already is": Case((P256, SHA256_ECDSA), FILE_P256, "ecc-p256",
                                    honoured=("key type", "ecdsa-with-SHA256")),
    "an IDevID never changes algorithm": Case(
        (P384, SHA384_ECDSA), IDEVID_P256, "ecc-p256",
        unhonoured=("the persistent IDevID is ECC NIST P-256 and never changes algorithm",
                    "signs with SHA-256 only")),
    "a kept key (rotate_key: false) never changes either": Case(
        (P384,), DeviceFacts(alg="ecc-p256", alg_fixed=True), "ecc-p256",
        unhonoured=("never changes algorithm",)),
    "a curve tpmid's TPM keys cannot have": Case(
        (BRAINPOOL,), FILE_P256, "ecc-p256", unhonoured=("brainpoolP384r1",)),
    "an RSA size tpmid's TPM keys cannot have": Case(
        (RSA_4096,), FILE_P256, "ecc-p256", unhonoured=("4096 bits",)),
    "a hash the key does not sign with": Case(
        (P256, SHA384_ECDSA), FILE_P256, "ecc-p256",
        unhonoured=("ECC NIST P-256 identity key signs with SHA-256 only",)),
    "challengePassword means proof-of-possession linking": Case(
        (CHALLENGE,), FILE_P256, "ecc-p256", pop=True, honoured=("tls-unique",)),
    "subjectAltName with configured values": Case(
        (SAN_REQUEST,), DeviceFacts(alg="ecc-p256", alg_fixed=False, san=True), "ecc-p256",
        honoured=("extension subjectAltName",)),
    "subjectAltName without values": Case(
        (SAN_REQUEST,), FILE_P256, "ecc-p256", unhonoured=("set san.dns, san.ip or san.uri",)),
    "a macAddress tpmid does not know": Case(
        (MAC_REQUEST,), FILE_P256, "ecc-p256", unhonoured=("macAddress (1.3.6.1.1.1.1.22)",)),
    "a configured serialNumber": Case(
        (SERIAL,), DeviceFacts(alg="ecc-p256", alg_fixed=False,
                               subject=frozenset({"cn", "serial_number"})), "ecc-p256",
        honoured=("subject serialNumber",)),
    "a serialNumber not configured": Case(
        (SERIAL,), FILE_P256, "ecc-p256", unhonoured=("set subject.serial_number",)),
    "an emailAddress tpmid has no value for": Case(
        (EMAIL,), FILE_P256, "ecc-p256", unhonoured=("emailAddress (1.2.840.113549.1.9.1)",)),
    "an attribute tpmid does not know": Case(
        (UNKNOWN,), FILE_P256, "ecc-p256", unhonoured=("2.999.1 (an attribute",)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_csr_attributes_are_followed_where_tpmid_can(case: Case) -> None:
    plan = plan_csr(case.attrs, case.facts)
    assert (plan.alg, plan.pop) == (case.alg, case.pop)
    assert len(plan.unhonoured) == len(case.unhonoured), plan.unhonoured
    for want, got in zip(case.unhonoured, plan.unhonoured, strict=True):
        assert want in got
    for want in case.honoured:
        assert any(want in h for h in plan.honoured), plan.honoured


def test_the_rfc_7030_example_asks_for_pop_p384_sha384_and_a_mac_address() -> None:
    # RFC 7030 §4.5.2 as corrected by RFC 8951 §4.
    attrs = decode_csrattrs(fixture("rfc7030-4.5.2-csrattrs.b64"))
    plan = plan_csr(attrs, FILE_P256)
    assert (plan.alg, plan.pop) == ("ecc-p384", True)
    assert [u.split(":")[0] for u in plan.unhonoured] == ["macAddress (1.3.6.1.1.1.1.22)"]


def test_the_appendix_a2_example_is_read_without_surprises() -> None:
    plan = plan_csr(decode_csrattrs(fixture(A2)), FILE_P256)
    assert plan.pop  # challengePassword
    assert plan.alg == "ecc-p256"  # brainpoolP384r1 is not a curve a TPM key here can have
    assert any("brainpoolP384r1" in u for u in plan.unhonoured)


def test_libests_example_list_with_its_trailing_nul_asks_for_p384_and_sha384() -> None:
    # libest's example server answers this C string, NUL included (what issue 14 saw):
    # macAddress, emailAddress, secp384r1 and sha384 as bare OIDs.
    body = b"MCYGBysGAQEBARYGCSqGSIb3DQEJAQYFK4EEACIGCWCGSAFlAwQCAg==\x00"
    attrs = decode_csrattrs(body.rstrip(b"\x00"))
    assert [describe_oid(a.oid.dotted_string) for a in attrs] == [
        "macAddress (1.3.6.1.1.1.1.22)", "emailAddress (1.2.840.113549.1.9.1)",
        "secp384r1 (1.3.132.0.34)", "sha384 (2.16.840.1.101.3.4.2.2)"]
    plan = plan_csr(attrs, FILE_P256)
    assert plan.alg == "ecc-p384"
    assert any("sha384" in h for h in plan.honoured)
    assert [u.split(":")[0] for u in plan.unhonoured] == [
        "macAddress (1.3.6.1.1.1.1.22)", "emailAddress (1.2.840.113549.1.9.1)"]


@pytest.mark.parametrize(("oid", "name"), [
    ("1.2.840.113549.1.9.1", "emailAddress"), ("2.16.840.1.101.3.4.2.2", "sha384"),
    ("1.2.840.10045.4.3.3", "ecdsa-with-SHA384"), ("2.5.4.5", "serialNumber"),
    ("1.3.6.1.1.1.1.22", "macAddress"), ("2.999.1", None),
], ids=str)
def test_common_oids_have_names(oid: str, name: str | None) -> None:
    assert oid_name(oid) == name
    assert describe_oid(oid) == (f"{name} ({oid})" if name else oid)


def test_a_request_for_attestation_evidence_is_honoured_only_with_attestation_on() -> None:
    attrs = [CsrAttr.of("1.2.840.113549.1.9.16.2.59")]  # id-aa-attestation
    on = plan_csr(attrs, DeviceFacts(alg="ecc-p256", alg_fixed=False, attestation=True))
    assert on.attestation and not on.unhonoured
    assert on.honoured == ("id-aa-attestation (1.2.840.113549.1.9.16.2.59): TPM2_Certify "
                           "evidence by the IAK (docs/attestation.md)",)
    off = plan_csr(attrs, FILE_P256)
    assert off.attestation
    assert off.unhonoured == ("id-aa-attestation (1.2.840.113549.1.9.16.2.59): key attestation "
                              "is off (set est.attestation: required-by-server or include)",)
    assert not plan_csr([], FILE_P256).attestation
