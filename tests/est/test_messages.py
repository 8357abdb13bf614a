"""The RFC 7030 wire codec against the RFC's own example messages and the forms seen in the field.

The files in ``fixtures/`` are the base64 bodies of RFC 7030 Appendix A (A.1
cacerts response, A.2 csrattrs response, A.3 simpleenroll request and response)
and the corrected §4.5.2 csrattrs example of RFC 8951 §4 — see
``fixtures/README.md`` for provenance.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, NameOID

from tpmid.errors import EstProtocolError
from tpmid.est import messages
from tpmid.est.messages import CsrAttr

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def der_of(name: str) -> bytes:
    return base64.b64decode(b"".join(fixture(name).split()))


def self_signed(cn: str = "test") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return key, cert


def lines_of(body: bytes) -> list[bytes]:
    return body.split(b"\n")


# --------------------------------------------------------------------------- A.1 cacerts

A1 = "rfc7030-a1-cacerts-response.b64"
A1_SUBJECTS = {"CN=estExampleCA OwO", "CN=estExampleCA NwO", "CN=estExampleCA OwN",
               "CN=estExampleCA NwN"}


def test_rfc7030_a1_cacerts_response_yields_the_four_root_rollover_certificates() -> None:
    certs = messages.decode_certs_only(fixture(A1))
    # In the order the RFC lists them (its SET is BER-ordered; we keep what was sent).
    assert [c.subject.rfc4514_string() for c in certs] == [
        "CN=estExampleCA OwO", "CN=estExampleCA NwO", "CN=estExampleCA OwN",
        "CN=estExampleCA NwN"]
    # OldWithOld and NewWithNew are self-signed roots; the other two link them.
    self_issued = {c.subject.rfc4514_string() for c in certs if c.issuer == c.subject}
    assert self_issued == {"CN=estExampleCA OwO", "CN=estExampleCA NwN"}


def test_rfc7030_a1_cacerts_response_reencodes_to_the_same_certificates() -> None:
    certs = messages.decode_certs_only(fixture(A1))
    body = messages.encode_certs_only(certs)
    again = messages.decode_certs_only(body)
    assert sorted(c.public_bytes(serialization.Encoding.DER) for c in again) == sorted(
        c.public_bytes(serialization.Encoding.DER) for c in certs)


def test_encoded_certs_only_body_is_base64_in_64_column_lines_ending_in_newline() -> None:
    body = messages.encode_certs_only(messages.decode_certs_only(fixture(A1)))
    assert body.endswith(b"\n")
    assert all(len(line) <= 64 for line in lines_of(body))
    assert max(len(line) for line in lines_of(body)) == 64


def _transport_forms(der: bytes, pem_label: str) -> dict[str, bytes]:
    b64 = base64.b64encode(der)
    return {
        "rfc-64-column-lines": messages.b64_lines(der),
        "one-line-with-newline": b64 + b"\n",
        "one-line-without-newline": b64,
        "76-column-crlf-lines": b"\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),
        "pem": (f"-----BEGIN {pem_label}-----\n".encode() + messages.b64_lines(der)
                + f"-----END {pem_label}-----\n".encode()),
        "raw-der": der,
    }


FORMS = list(_transport_forms(b"0", "X"))


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_certs_only_body_decodes_in_every_transport_form(form: str) -> None:
    body = _transport_forms(der_of(A1), "PKCS7")[form]
    assert {c.subject.rfc4514_string() for c in messages.decode_certs_only(body)} == A1_SUBJECTS


def test_certs_only_decoder_accepts_pem_certificate_blocks() -> None:
    certs = messages.decode_certs_only(fixture(A1))
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    assert [c.subject for c in messages.decode_certs_only(pem)] == [c.subject for c in certs]


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"", "empty"),
        (b"<html>502 Bad Gateway</html>", "expected base64"),
        (b"MIIB!!!notbase64", "expected base64"),
        (b"MIIBAAA", "does not decode"),
        (base64.b64encode(b"\x30\x03\x02\x01\x00"), "not a PKCS#7"),
        (b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n", "without PKCS7"),
    ],
    ids=["empty", "html-error-page", "not-base64", "bad-padding", "der-but-not-pkcs7",
         "pem-of-another-type"],
)
def test_certs_only_decoder_rejects_garbage_with_a_reason(body: bytes, complaint: str) -> None:
    with pytest.raises(EstProtocolError, match=complaint):
        messages.decode_certs_only(body)


# --------------------------------------------------------------------------- A.3 enroll

A3_REQ = "rfc7030-a3-simpleenroll-request.b64"
A3_RESP = "rfc7030-a3-simpleenroll-response.b64"


def test_rfc7030_a3_request_decodes_with_its_tls_unique_challenge_password() -> None:
    csr = messages.decode_csr(fixture(A3_REQ))
    assert csr.subject.rfc4514_string() == "CN=demostep4 1368141352"
    challenge = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
    assert challenge.value == b"+rrCir/7+EYu50T4"  # RFC 7030 §3.5: base64 of tls-unique


def test_rfc7030_a3_request_reencodes_byte_for_byte() -> None:
    csr = messages.decode_csr(fixture(A3_REQ))
    assert messages.encode_csr(csr) == fixture(A3_REQ)


def test_rfc7030_a3_response_certifies_the_requested_key_and_subject() -> None:
    csr = messages.decode_csr(fixture(A3_REQ))
    (cert,) = messages.decode_certs_only(fixture(A3_RESP))
    assert cert.subject == csr.subject
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert.issuer.rfc4514_string() == "CN=estExampleCA NwN"
    assert cert.serial_number == 21


def test_rfc7030_a3_response_reencodes_to_an_equivalent_certs_only_body() -> None:
    # Not byte-identical: the RFC's SignedData carries an empty crls [1] field,
    # which we omit (RFC 5652 §5.1 makes it OPTIONAL). Same certificate, same DER.
    (original,) = messages.decode_certs_only(fixture(A3_RESP))
    body = messages.encode_certs_only([original])
    assert messages.decode_certs_only(body) == [original]
    assert base64.b64decode(b"".join(fixture(A3_RESP).split()))[-4:] == b"\xa1\x00\x31\x00"


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_csr_body_decodes_in_every_transport_form(form: str) -> None:
    body = _transport_forms(der_of(A3_REQ), "CERTIFICATE REQUEST")[form]
    assert messages.decode_csr(body).subject.rfc4514_string() == "CN=demostep4 1368141352"


def test_csr_decoder_accepts_openssl_new_certificate_request_pem_label() -> None:
    body = (b"-----BEGIN NEW CERTIFICATE REQUEST-----\n" + fixture(A3_REQ)
            + b"-----END NEW CERTIFICATE REQUEST-----\n")
    assert messages.decode_csr(body).subject.rfc4514_string() == "CN=demostep4 1368141352"


def test_encoded_csr_always_ends_in_newline_even_when_it_fits_one_line() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(key, hashes.SHA256()))
    body = messages.encode_csr(csr)
    assert body.endswith(b"\n") and b"\n" in body[:-1]  # libest needs the line breaks
    assert messages.decode_csr(body).subject == csr.subject


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"   \n", "empty"),
        (b"hello world, not a csr", "expected base64"),
        (base64.b64encode(b"\x30\x03\x02\x01\x00"), "does not parse as a CSR"),
        (base64.b64encode(der_of(A3_REQ)[:100]), "does not parse as a CSR"),
        (b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n", "exactly one PEM"),
    ],
    ids=["blank", "text", "der-but-not-a-csr", "truncated", "pem-certificate-not-request"],
)
def test_csr_decoder_rejects_malformed_bodies_with_a_reason(body: bytes, complaint: str) -> None:
    with pytest.raises(EstProtocolError, match=complaint):
        messages.decode_csr(body)


# --------------------------------------------------------------------------- csrattrs

A2 = "rfc7030-a2-csrattrs-response.b64"
S452 = "rfc7030-4.5.2-csrattrs.b64"


def test_rfc7030_a2_csrattrs_decode_to_oids_and_attributes_in_order() -> None:
    items = messages.decode_csrattrs(fixture(A2))
    assert [(i.oid.dotted_string, i.is_attribute) for i in items] == [
        ("1.3.6.1.1.1.1.22", False),  # macAddress
        ("2.999.1", True),
        ("1.2.840.113549.1.9.7", False),  # challengePassword
        ("2.999.2", True),
        ("1.3.36.3.3.2.8.1.1.11", False),  # brainpoolP384r1
        ("2.16.840.1.101.3.4.2.2", False),  # sha384
    ]
    assert items[3].value_oids == ("2.999.3", "2.999.4")
    assert len(items[3].values or ()) == 3  # two OIDs and a PrintableString


def test_rfc7030_a2_csrattrs_reencode_byte_for_byte() -> None:
    assert messages.encode_csrattrs(messages.decode_csrattrs(fixture(A2))) == fixture(A2)


def test_rfc7030_4_5_2_example_is_what_the_encoder_builds_from_scratch() -> None:
    # RFC 7030 §4.5.2 as corrected by RFC 8951 §4: challengePassword, an EC key
    # on secp384r1, a macAddress extension request, and ecdsa-with-SHA384.
    built = messages.encode_csrattrs([
        CsrAttr.of("1.2.840.113549.1.9.7"),
        CsrAttr.of("1.2.840.10045.2.1", "1.3.132.0.34"),
        CsrAttr.of("1.2.840.113549.1.9.14", "1.3.6.1.1.1.1.22"),
        CsrAttr.of("1.2.840.10045.4.3.3"),
    ])
    assert built == fixture(S452)
    parsed = messages.decode_csrattrs(fixture(S452))
    assert parsed[0].oid == AttributeOID.CHALLENGE_PASSWORD
    assert parsed[1].value_oids == ("1.3.132.0.34",)


@pytest.mark.parametrize(
    "body",
    [b"", b"  \n"],
    ids=["empty", "whitespace"],
)
def test_csrattrs_empty_body_means_no_attributes(body: bytes) -> None:
    assert messages.decode_csrattrs(body) == []


@pytest.mark.parametrize(
    "der",
    [
        b"\x31\x00",  # a SET, not a SEQUENCE
        b"\x30\x05\x06\x03\x2a\x03",  # truncated
        b"\x30\x03\x02\x01\x00",  # INTEGER inside
        b"\x30\x80\x00\x00",  # indefinite length (BER)
        b"\x30\x00\x00",  # trailing byte
    ],
    ids=["set-not-sequence", "truncated", "integer-item", "indefinite-length", "trailing-bytes"],
)
def test_csrattrs_decoder_rejects_malformed_der(der: bytes) -> None:
    with pytest.raises(EstProtocolError, match="malformed DER"):
        messages.decode_csrattrs(base64.b64encode(der))


@pytest.mark.parametrize(
    "oid",
    ["1.2.840.113549.1.9.7", "2.999.1", "0.9.2342.19200300.100.1.1", "1.3.132.0.34",
     "2.25.329800735698586629295641978511506172918"],
    ids=["challengePassword", "2.999.1", "first-arc-0", "secp384r1", "uuid-arc"],
)
def test_der_oid_roundtrips(oid: str) -> None:
    assert messages.oid_of_der(messages.der_oid(oid)) == oid


# --------------------------------------------------------------------------- HTTP details


@pytest.mark.parametrize(
    ("content_type", "expected", "matches"),
    [
        ("application/pkcs7-mime; smime-type=certs-only", messages.PKCS7_MIME, True),
        ("Application/PKCS7-MIME;smime-type=certs-only", messages.PKCS7_MIME, True),
        ("application/pkcs7-mime", messages.PKCS7_MIME, True),
        ("application/csrattrs", messages.CSRATTRS, True),
        ("text/plain; charset=utf-8", messages.PKCS7_MIME, False),
        ("application/pkcs7-mime-extra", messages.PKCS7_MIME, False),
        ("", messages.PKCS7_MIME, False),
        (None, messages.PKCS7_MIME, False),
    ],
    ids=["with-params", "mixed-case-no-space", "bare", "csrattrs", "text", "prefix-only",
         "empty", "missing"],
)
def test_media_type_match_ignores_case_and_parameters(content_type: str | None, expected: str,
                                                      matches: bool) -> None:
    assert messages.media_type_matches(content_type, expected) is matches


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (format_datetime(NOW - timedelta(seconds=90), usegmt=True), 0.0),
        ("Fri, 02 Jan 2026 03:05:05 GMT", 60.0),
        ("Friday, 02-Jan-26 03:05:05 GMT", 60.0),
        ("soon", None),
        ("-5", None),
        (None, None),
    ],
    ids=["delay-seconds", "padded", "zero", "http-date-ahead", "http-date-past",
         "imf-fixdate", "rfc850-date", "garbage", "negative", "absent"],
)
def test_retry_after_reads_seconds_and_http_dates(value: str | None,
                                                  seconds: float | None) -> None:
    assert messages.parse_retry_after(value, NOW) == seconds


# --------------------------------------------------------------------------- serverkeygen


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_serverkeygen_response_roundtrips_key_and_certificate() -> None:
    key, cert = self_signed()
    body, content_type = messages.encode_serverkeygen(_pkcs8(key), [cert])
    assert messages.media_type_matches(content_type, "multipart/mixed")
    key_der, certs = messages.parse_serverkeygen(body, content_type)
    assert key_der == _pkcs8(key)
    assert certs == [cert]


def test_serverkeygen_parser_reads_the_rfc7030_a4_layout() -> None:
    # RFC 7030 Appendix A.4 layout: "multipart/mixed ; boundary=est", a pkcs8
    # part and a certs-only part, each base64. (The RFC's own bytes are not
    # reproduced here; the layout is what clients meet.) LF line ends and no
    # Content-Transfer-Encoding, as RFC 8951 allows.
    key, cert = self_signed("serverkeygen")
    body = (b"--est\n"
            b"Content-Type: application/pkcs8\n\n"
            + messages.b64_lines(_pkcs8(key))
            + b"--est\n"
            b"Content-Type: application/pkcs7-mime; smime-type=certs-only\n\n"
            + messages.encode_certs_only([cert])
            + b"--est--\n")
    key_der, certs = messages.parse_serverkeygen(body, "multipart/mixed ; boundary=est")
    assert key_der == _pkcs8(key)
    assert certs == [cert]


@pytest.mark.parametrize(
    ("parts", "content_type", "complaint"),
    [
        ([("application/pkcs8", "KEY")], "multipart/mixed; boundary=b", "no certs-only part"),
        ([("application/pkcs7-mime; smime-type=certs-only", "CERTS")],
         "multipart/mixed; boundary=b", "no application/pkcs8 part"),
        ([("application/pkcs7-mime; smime-type=server-generated-key", "KEY"),
          ("application/pkcs7-mime; smime-type=certs-only", "CERTS")],
         "multipart/mixed; boundary=b", "encrypted key"),
        ([("application/pkcs8", "KEY")], "application/pkcs7-mime", "expected multipart/mixed"),
        ([("application/pkcs8", "KEY")], "multipart/mixed", "no boundary"),
        ([("application/pkcs8", "GARBAGE"), ("application/pkcs7-mime", "CERTS")],
         "multipart/mixed; boundary=b", "not a PKCS#8 key"),
    ],
    ids=["no-certs", "no-key", "encrypted-key", "not-multipart", "no-boundary", "bad-key"],
)
def test_serverkeygen_parser_rejects_incomplete_responses(
    parts: list[tuple[str, str]], content_type: str, complaint: str
) -> None:
    key, cert = self_signed()
    payloads = {"KEY": messages.b64_lines(_pkcs8(key)), "CERTS": messages.encode_certs_only([cert]),
                "GARBAGE": messages.b64_lines(b"\x30\x03\x02\x01\x00")}
    body = b"".join(b"--b\r\nContent-Type: " + ct.encode() + b"\r\n\r\n" + payloads[p]
                    for ct, p in parts) + b"--b--\r\n"
    with pytest.raises(EstProtocolError, match=complaint):
        messages.parse_serverkeygen(body, content_type)
