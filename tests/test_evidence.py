"""The draft-ietf-lamps-csr-attestation structures (tpmid.evidence) and the config rules
around attestation, without a TPM."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tpmid.config import SanConfig, SubjectConfig, parse_config
from tpmid.csr import build_csr, build_csr_with_attribute
from tpmid.der import TAG_OCTET_STRING, TAG_SEQUENCE, der_oid, der_tlv
from tpmid.errors import ConfigError
from tpmid.evidence import (
    ID_AA_ATTESTATION,
    TCG_ATTEST_TPM_CERTIFY,
    AttestationBundle,
    EvidenceFormatError,
    TpmCertifyStatement,
    attribute,
    csr_attribute_values,
    decode_bundle,
)
from tpmid.tpm.identity import identity_key


def _bundle() -> AttestationBundle:
    stmt = TpmCertifyStatement(b"attest", b"signature", b"public").encode()
    return AttestationBundle(((TCG_ATTEST_TPM_CERTIFY, stmt),), (b"\x30\x03\x02\x01\x07",))


def test_bundle_survives_a_csr_round_trip_and_the_csr_still_verifies() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr_with_attribute(key, SubjectConfig(cn="d"), SanConfig(dns=("d.example",)),
                                   hash_name="sha256", attribute_der=attribute(_bundle()),
                                   challenge_password="pw")
    assert csr.is_signature_valid
    (value,) = csr_attribute_values(csr.public_bytes(Encoding.DER), ID_AA_ATTESTATION)
    bundle = decode_bundle(value)
    assert bundle == _bundle()
    assert bundle.tpm_certify() == [TpmCertifyStatement(b"attest", b"signature", b"public")]
    # The other attributes are still there (challengePassword, extensionRequest).
    assert {a.oid.dotted_string for a in csr.attributes} >= {
        "1.2.840.113549.1.9.7", "1.2.840.113549.1.9.14", ID_AA_ATTESTATION}


def test_a_csr_without_the_attribute_has_no_values() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr(key, SubjectConfig(cn="d"), SanConfig(), hash_name="sha256")
    assert csr_attribute_values(csr.public_bytes(Encoding.DER), ID_AA_ATTESTATION) == []


_OID = der_oid(TCG_ATTEST_TPM_CERTIFY)
_STATEMENT = der_tlv(TAG_SEQUENCE, _OID + der_tlv(TAG_OCTET_STRING, b"x"))
MALFORMED = {
    "not DER": b"\x01\x02",
    "no statement": der_tlv(TAG_SEQUENCE, der_tlv(TAG_SEQUENCE, b"")),
    "statement without stmt": der_tlv(TAG_SEQUENCE, der_tlv(TAG_SEQUENCE,
                                                             der_tlv(TAG_SEQUENCE, _OID))),
    "trailing bytes": _bundle().encode() + b"\x00",
    "certs not a SEQUENCE": der_tlv(TAG_SEQUENCE, der_tlv(TAG_SEQUENCE, _STATEMENT)
                                    + der_tlv(TAG_OCTET_STRING, b"")),
    "three fields": der_tlv(TAG_SEQUENCE, der_tlv(TAG_SEQUENCE, _STATEMENT) * 3),
}


@pytest.mark.parametrize("der", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bundles_are_format_errors(der: bytes) -> None:
    with pytest.raises(EvidenceFormatError):
        decode_bundle(der)


def test_a_statement_that_is_not_tcg_attest_certify_is_a_format_error() -> None:
    bundle = decode_bundle(der_tlv(TAG_SEQUENCE, der_tlv(TAG_SEQUENCE, _STATEMENT)))
    with pytest.raises(EvidenceFormatError, match="TcgAttestCertify is not"):
        bundle.tpm_certify()


def _config(**ldevid_est: Any) -> dict[str, Any]:
    return {"identities": {
        "idevid": {"key": {"kind": "persistent", "iak": True}, "subject": {"cn": "i"}},
        "ldevid": {"key": {"kind": "file"}, "subject": {"cn": "l"},
                   "est": {"url": "https://est.example/.well-known/est", **ldevid_est}},
    }}


def test_attestation_modes_parse() -> None:
    for mode in ("off", "include", "required-by-server"):
        est = parse_config(_config(attestation=mode)).identity("ldevid").est
        assert est is not None and est.attestation == mode


def test_attestation_without_an_iak_is_a_config_error() -> None:
    data = _config(attestation="include")
    data["identities"]["idevid"]["key"]["iak"] = False
    with pytest.raises(ConfigError, match="signed by the IAK, and no identity has one"):
        parse_config(data)


def test_an_unknown_attestation_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="attestation"):
        parse_config(_config(attestation="always"))


def test_an_iak_on_a_key_file_is_refused() -> None:
    data = _config()
    data["identities"]["ldevid"]["key"]["iak"] = True
    data["identities"]["idevid"]["key"]["iak"] = False
    config = parse_config(data)
    with pytest.raises(ConfigError, match="an IAK lives with an IDevID"):
        identity_key(config.identity("ldevid"))


def test_the_iak_cannot_share_the_idevid_handle() -> None:
    data = _config()
    data["identities"]["idevid"]["key"]["iak_handle"] = 0x81020000
    with pytest.raises(ConfigError, match="the IDevID's own handle"):
        parse_config(data)
