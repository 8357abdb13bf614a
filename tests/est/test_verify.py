"""Verification of enrollment results (``tpmid.est.verify``): pure functions, real certificates.

Certificates come from throwaway software CAs (:class:`TestCa`); the TPM-backed
end-to-end checks live in ``tests/lifecycle/test_enroll.py``.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.est.test_client_support import TestCa, name, server_identity, spki
from tpmid.errors import VerificationError
from tpmid.est.verify import (
    check_pinned_root,
    fingerprint_sha256,
    verify_enrollment,
    verify_server_certificate,
)

NOW = datetime.datetime.now(datetime.UTC)
CLIENT = [ExtendedKeyUsageOID.CLIENT_AUTH]


@dataclass
class World:
    root: TestCa
    inter: TestCa
    other_root: TestCa
    key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def world() -> World:
    root = TestCa.root("issuing root")
    return World(root, root.sub_ca("issuing intermediate"), TestCa.root("someone else"),
                 ec.generate_private_key(ec.SECP256R1()))


@dataclass(frozen=True)
class Case:
    """One issued certificate and how verification must judge it."""

    make: Callable[[World], x509.Certificate]
    error: str | None  # substring of the VerificationError, None: accepted
    profile: str = "device"
    requested: x509.Name = name("dev")
    anchors: str = "inter"  # which CA certificates count as the label's issuers
    extra: bool = False  # pass the intermediate as an extra certificate


def _leaf(**kw: object) -> Callable[[World], x509.Certificate]:
    def make(w: World) -> x509.Certificate:
        args: dict[str, object] = {"eku": CLIENT}
        args.update(kw)
        return w.inter.issue(w.key.public_key(), name("dev"), **args)  # type: ignore[arg-type]
    return make


CASES = {
    "device cert from the label CA": Case(_leaf(), None),
    "device cert without EKU (RFC 5280: no restriction)": Case(_leaf(eku=None), None),
    "device cert with SAN": Case(_leaf(san=[x509.DNSName("dev.example")]), None),
    "chain through an intermediate sent as extra cert": Case(_leaf(), None, anchors="root",
                                                             extra=True),
    "intermediate missing from the answer": Case(_leaf(), "does not validate", anchors="root"),
    "certificate for another key": Case(
        lambda w: w.inter.issue(ec.generate_private_key(ec.SECP256R1()).public_key(),
                                name("dev"), eku=CLIENT),
        "issued a certificate for another key"),
    "issued by another CA": Case(
        lambda w: w.other_root.issue(w.key.public_key(), name("dev"), eku=CLIENT),
        "does not validate"),
    "expired": Case(_leaf(not_before=NOW - datetime.timedelta(days=10),
                          not_after=NOW - datetime.timedelta(days=1)), "already expired"),
    "not yet valid": Case(_leaf(not_before=NOW + datetime.timedelta(days=1)), "not valid yet"),
    "serverAuth-only EKU for a device": Case(_leaf(eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
                                             "does not include id-kp-clientAuth"),
    "CA certificate where a device cert was asked": Case(_leaf(ca=True, eku=None),
                                                         "does not validate"),
    "rewritten subject (re-enrollment forcing)": Case(
        lambda w: w.inter.issue(w.key.public_key(), name("old-device-name"), eku=CLIENT),
        "rewrote the subject: requested 'CN=dev', issued 'CN=old-device-name'"),
    "Edge CA: CA:TRUE with keyCertSign": Case(_leaf(ca=True, eku=None), None, profile="ca"),
    "Edge CA profile refuses a device cert": Case(_leaf(), "basicConstraints cA=TRUE",
                                                  profile="ca"),
    "Edge CA profile refuses a CA without keyCertSign": Case(
        _leaf(ca=True, eku=None, cert_sign=False), "needs keyUsage keyCertSign", profile="ca"),
    "Edge CA profile refuses a CA without keyUsage": Case(
        _leaf(ca=True, eku=None, key_usage=False),
        "the CA profile needs keyUsage keyCertSign, and it has no keyUsage", profile="ca"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_enrollment_result_is_judged(case: Case, world: World) -> None:
    cert = case.make(world)
    issuers = [world.inter.cert] if case.anchors == "inter" else [world.root.cert]
    kwargs = {
        "key_spki_der": spki(world.key), "requested_subject": case.requested,
        "issuers": issuers, "extra_certs": [world.inter.cert] if case.extra else [],
        "profile": case.profile, "now": NOW,
    }
    if case.error is None:
        result = verify_enrollment(cert, **kwargs)  # type: ignore[arg-type]
        assert result.certificate == cert
        assert result.chain[-1] in issuers
        assert not result.subject_rewritten
    else:
        with pytest.raises(VerificationError) as info:
            verify_enrollment(cert, **kwargs)  # type: ignore[arg-type]
        assert case.error in info.value.message


def test_rewritten_subject_is_accepted_only_when_configured_and_then_reported(
    world: World,
) -> None:
    cert = world.inter.issue(world.key.public_key(), name("old-device-name"), eku=CLIENT)
    result = verify_enrollment(cert, key_spki_der=spki(world.key), requested_subject=name("dev"),
                               issuers=[world.inter.cert], now=NOW,
                               accept_rewritten_subject=True)
    assert result.subject_rewritten
    assert result.requested_subject == name("dev")


def test_key_mismatch_is_reported_before_anything_else(world: World) -> None:
    # A foreign key *and* a foreign CA: the key is the more dangerous fault to name.
    stranger = ec.generate_private_key(ec.SECP256R1())
    cert = world.other_root.issue(stranger.public_key(), name("x"), eku=CLIENT)
    with pytest.raises(VerificationError, match="another key"):
        verify_enrollment(cert, key_spki_der=spki(world.key), requested_subject=name("dev"),
                          issuers=[world.inter.cert], now=NOW)


def test_no_issuers_is_an_error_not_a_pass(world: World) -> None:
    cert = world.inter.issue(world.key.public_key(), name("dev"), eku=CLIENT)
    with pytest.raises(VerificationError, match="no issuing CA certificates"):
        verify_enrollment(cert, key_spki_der=spki(world.key), requested_subject=name("dev"),
                          issuers=[], now=NOW)


# --------------------------------------------------------------------------- pins


def _fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


PIN_FORMATS = {
    "lower-case hex": lambda c: _fp(c),
    "upper-case with colons (openssl -fingerprint)": lambda c: fingerprint_sha256(c),
    "upper-case hex": lambda c: _fp(c).upper(),
}


@pytest.mark.parametrize("fmt", PIN_FORMATS.values(), ids=PIN_FORMATS.keys())
def test_pinned_root_is_found_in_any_usual_fingerprint_format(
    fmt: Callable[[x509.Certificate], str], world: World,
) -> None:
    got = check_pinned_root([world.inter.cert, world.root.cert], fmt(world.root.cert))
    assert got == world.root.cert


def test_pin_mismatch_is_refused_naming_what_the_server_offered(world: World) -> None:
    with pytest.raises(VerificationError) as info:
        check_pinned_root([world.root.cert], _fp(world.other_root.cert))
    assert _fp(world.root.cert) in info.value.message
    assert "CN=issuing root" in info.value.message


def test_pinning_an_intermediate_is_refused(world: World) -> None:
    with pytest.raises(VerificationError, match="not a root"):
        check_pinned_root([world.inter.cert, world.root.cert], _fp(world.inter.cert))


def test_a_pin_that_is_not_a_sha256_fingerprint_is_refused(world: World) -> None:
    with pytest.raises(VerificationError, match="not a SHA-256 fingerprint"):
        check_pinned_root([world.root.cert], "abcd")


SERVER_CASES = {
    "IP in SAN": ("127.0.0.1", None),
    "IP not in SAN": ("127.0.0.2", "does not validate for '127.0.0.2'"),
    "DNS name in SAN": ("est.example", None),
    "other DNS name": ("evil.example", "does not validate for 'evil.example'"),
}


@pytest.mark.parametrize(("host", "error"), SERVER_CASES.values(), ids=SERVER_CASES.keys())
def test_server_certificate_must_chain_to_the_pinned_root_and_name_the_host(
    host: str, error: str | None, world: World,
) -> None:
    chain, _ = server_identity(world.inter, dns=("est.example",), ips=("127.0.0.1",))
    if error is None:
        verify_server_certificate(chain[0], root=world.root.cert, intermediates=[world.inter.cert],
                                  host=host, now=NOW)
    else:
        with pytest.raises(VerificationError, match=error):
            verify_server_certificate(chain[0], root=world.root.cert,
                                      intermediates=[world.inter.cert], host=host, now=NOW)


def test_server_certificate_from_another_ca_fails_the_pinned_bootstrap(world: World) -> None:
    chain, _ = server_identity(world.other_root)
    with pytest.raises(VerificationError, match="against the pinned root"):
        verify_server_certificate(chain[0], root=world.root.cert, intermediates=[],
                                  host=str(ipaddress.ip_address("127.0.0.1")), now=NOW)


# --------------------------------------------------------------------------- RFC 5280 trust anchors

# What lab, legacy and vendor-made private CAs look like: a self-signed root whose
# basicConstraints is not critical and which has no keyUsage (and no key identifiers);
# intermediates of the same make. RFC 5280 §6.1 trusts an anchor's name and key, and
# checks the certificates below it with its own rules, which do not care for criticality.

LAB_BC = (x509.BasicConstraints(ca=True, path_length=None), False)


def _ku(cert_sign: bool) -> tuple[x509.KeyUsage, bool]:
    return (x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                          decipher_only=False), True)


def make_cert(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, public_key: object,
              extensions: list[tuple[x509.ExtensionType, bool]], *,
              not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
         .public_key(public_key).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
         .not_valid_before(not_before or NOW - datetime.timedelta(hours=1))
         .not_valid_after(not_after or NOW + datetime.timedelta(days=1)))
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    if subject != issuer:
        # Below the anchor, an authorityKeyIdentifier (which the webpki profile demands).
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            key.public_key()), critical=False)
    return b.sign(key, hashes.SHA256())


@dataclass
class Lab:
    root_key: ec.EllipticCurvePrivateKey
    inter_key: ec.EllipticCurvePrivateKey
    device_key: ec.EllipticCurvePrivateKey

    def root(self, *extensions: tuple[x509.ExtensionType, bool]) -> x509.Certificate:
        return make_cert("lab root", "lab root", self.root_key, self.root_key.public_key(),
                         list(extensions))

    def inter(self, *extensions: tuple[x509.ExtensionType, bool], **kw: object
              ) -> x509.Certificate:
        return make_cert("lab intermediate", "lab root", self.root_key,
                         self.inter_key.public_key(), list(extensions), **kw)  # type: ignore[arg-type]

    def device(self, issuer: str = "lab root", *extensions: tuple[x509.ExtensionType, bool]
               ) -> x509.Certificate:
        key = self.root_key if issuer == "lab root" else self.inter_key
        return make_cert("dev", issuer, key, self.device_key.public_key(), list(extensions))


@pytest.fixture(scope="module")
def lab() -> Lab:
    return Lab(*(ec.generate_private_key(ec.SECP256R1()) for _ in range(3)))


def _verify(lab: Lab, cert: x509.Certificate, anchors: list[x509.Certificate],
            extra: list[x509.Certificate] = (), **kw: object) -> tuple[x509.Certificate, ...]:  # type: ignore[assignment]
    return verify_enrollment(cert, key_spki_der=spki(lab.device_key), requested_subject=name("dev"),
                             issuers=anchors, extra_certs=extra, now=NOW, **kw).chain  # type: ignore[arg-type]


ANCHOR_SHAPES = {
    "basicConstraints not critical, no keyUsage": [LAB_BC],
    "no basicConstraints at all, no keyUsage": [],
    "keyUsage without keyCertSign": [LAB_BC, _ku(False)],
    "critical basicConstraints with pathLen 0 (not applied to a trust anchor)": [
        (x509.BasicConstraints(ca=True, path_length=0), True)],
}


@pytest.mark.parametrize("extensions", ANCHOR_SHAPES.values(), ids=ANCHOR_SHAPES.keys())
def test_an_anchor_is_a_name_and_a_key_whatever_its_extensions(
    lab: Lab, extensions: list[tuple[x509.ExtensionType, bool]],
) -> None:
    root = lab.root(*extensions)
    inter = lab.inter(LAB_BC)
    for cert, extra in ((lab.device(), []), (lab.device("lab intermediate"), [inter])):
        chain = _verify(lab, cert, [root], extra)
        assert chain[-1] == root  # the chain keeps the configured anchor itself


def test_the_webpki_profile_keeps_refusing_a_lab_anchor_naming_it_and_the_switch(
    lab: Lab,
) -> None:
    root = lab.root(LAB_BC)
    with pytest.raises(VerificationError) as info:
        _verify(lab, lab.device(), [root], trust="webpki")
    message = info.value.message
    assert "the trust anchor 'CN=lab root' (SHA-256 " in message
    assert "does not mark basicConstraints critical" in message
    assert "trust.profile: rfc5280" in (info.value.hint or "")


def test_an_anchor_that_says_ca_false_is_refused_naming_it(lab: Lab) -> None:
    root = lab.root((x509.BasicConstraints(ca=False, path_length=None), True))
    with pytest.raises(VerificationError) as info:
        _verify(lab, lab.device(), [root])
    assert "the trust anchor 'CN=lab root' (SHA-256 " in info.value.message
    assert "its basicConstraints says cA=FALSE" in info.value.message
    assert "not a device or server certificate" in (info.value.hint or "")


BROKEN_INTERMEDIATES = {
    "cA=FALSE": ([(x509.BasicConstraints(ca=False, path_length=None), True)], {},
                 "is not a CA certificate: its basicConstraints says cA=FALSE "
                 "(RFC 5280 §6.1.4 (k))"),
    "no basicConstraints": ([], {}, "is not a CA certificate: it has no basicConstraints"),
    "keyUsage without keyCertSign": ([LAB_BC, _ku(False)], {},
                                     "may not sign certificates: its keyUsage lacks keyCertSign "
                                     "(RFC 5280 §6.1.4 (n))"),
    "expired": ([LAB_BC], {"not_before": NOW - datetime.timedelta(days=9),
                           "not_after": NOW - datetime.timedelta(days=1)},
                "is not valid now"),
    "unknown critical extension": (
        [LAB_BC, (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"),
                                             b"\x05\x00"), True)], {},
        "carries the critical extension 1.3.6.1.4.1.99999.1"),
}


@pytest.mark.parametrize(("extensions", "validity", "error"), BROKEN_INTERMEDIATES.values(),
                         ids=BROKEN_INTERMEDIATES.keys())
@pytest.mark.parametrize("trust", ["rfc5280", "webpki"])
def test_a_broken_intermediate_is_refused_naming_it_and_the_rule(
    lab: Lab, extensions: list[tuple[x509.ExtensionType, bool]], validity: dict[str, object],
    error: str, trust: str,
) -> None:
    root = make_cert("lab root", "lab root", lab.root_key, lab.root_key.public_key(),
                     [(x509.BasicConstraints(ca=True, path_length=None), True), _ku(True)])
    inter = lab.inter(*extensions, **validity)
    with pytest.raises(VerificationError) as info:
        _verify(lab, lab.device("lab intermediate"), [root], [inter], trust=trust)
    message = info.value.message
    assert "'CN=lab intermediate' (SHA-256 " in message
    assert error in message
    assert info.value.hint
    for internal in ("candidates exhausted", "encountered processing", "Certificate(",
                     "invalid extension"):
        assert internal not in message


def test_path_length_constraint_of_an_intermediate_is_applied_and_named(lab: Lab) -> None:
    root = lab.root(LAB_BC)
    inter = lab.inter((x509.BasicConstraints(ca=True, path_length=0), False))
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub = make_cert("lab sub CA", "lab intermediate", lab.inter_key, sub_key.public_key(),
                    [LAB_BC])
    dev = make_cert("dev", "lab sub CA", sub_key, lab.device_key.public_key(), [])
    with pytest.raises(VerificationError) as info:
        _verify(lab, dev, [root], [inter, sub])
    assert "'CN=lab intermediate' (SHA-256 " in info.value.message
    assert "allows 0 CA certificate(s) below it (pathLenConstraint), the chain has 1" \
        in info.value.message


def test_a_device_certificate_without_client_auth_is_refused_under_rfc5280_too(lab: Lab) -> None:
    dev = make_cert("dev", "lab root", lab.root_key, lab.device_key.public_key(),
                    [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    with pytest.raises(VerificationError, match="does not include id-kp-clientAuth"):
        _verify(lab, dev, [lab.root(LAB_BC)])


def test_a_chain_to_nowhere_names_where_it_ends(lab: Lab, world: World) -> None:
    inter = lab.inter(LAB_BC)
    with pytest.raises(VerificationError) as info:
        _verify(lab, lab.device("lab intermediate"), [world.root.cert], [inter])
    assert "its chain ends at 'CN=lab intermediate'" in info.value.message
    assert "issued by 'CN=lab root', which is neither one of those CA certificates" \
        in info.value.message
