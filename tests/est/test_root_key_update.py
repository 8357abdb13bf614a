"""What a client trusts among the certificates /cacerts offers after a CA rollover.

RFC 7030 §4.1.3 (Root CA Key Update): the server offers the new root with OldWithOld,
OldWithNew and NewWithOld, in any order; a client accepts the new root only through
a NewWithOld it validates with its current anchor. The key-update certificates here
are the reference server's own (``tpmid.server.rollover`` on a real server directory,
no network); damaged or foreign ones are made from them. The checks are the client's:
``follow_root_key_update`` and the path validation an enrollment runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tpmid.errors import VerificationError
from tpmid.est.verify import CacertsTrust, follow_root_key_update, spki_der, verify_enrollment
from tpmid.server.ca import load_ca
from tpmid.server.rollover import load_rollover_state, rollover_ca
from tpmid.server.state import init_server_dir

DEVICE = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")])


@dataclass
class Rolled:
    """A server directory after one rollover of its operator CA."""

    dir: Path
    old: x509.Certificate  # the root the device trusts (OldWithOld)
    new: x509.Certificate  # NewWithNew
    old_with_new: x509.Certificate
    new_with_old: x509.Certificate
    old_key: ec.EllipticCurvePrivateKey
    at: datetime

    @property
    def offered(self) -> list[x509.Certificate]:
        """What /cacerts serves: the new root, then the key-update certificates."""
        return [self.new, self.old, self.old_with_new, self.new_with_old]


def _roll(dir: Path, at: datetime) -> Rolled:
    old = load_ca("operator", dir / "operator-ca.pem", dir / "private" / "operator-ca.key")
    result = rollover_ca(dir, "ldevid", now=at)
    oldwithold, oldwithnew, newwithold = load_rollover_state(dir, "operator").links
    assert oldwithold == old.cert == result.old
    assert isinstance(old.key, ec.EllipticCurvePrivateKey)
    return Rolled(dir, old.cert, result.new, oldwithnew, newwithold, old.key, at)


@pytest.fixture
def rolled(tmp_path: Path) -> Rolled:
    init_server_dir(tmp_path / "srv")
    return _roll(tmp_path / "srv", datetime.now(UTC).replace(microsecond=0))


def _device_cert(dir: Path, at: datetime) -> tuple[x509.Certificate, bytes]:
    """A certificate the server's current operator CA issues, and its key's SPKI."""
    ca = load_ca("operator", dir / "operator-ca.pem", dir / "private" / "operator-ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(public_key=key.public_key(), subject=DEVICE, profile="ldevid",
                    lifetime=86400, now=at)
    return cert, spki_der(key.public_key())


def _stored_anchor(trust: CacertsTrust, cert: x509.Certificate, spki: bytes,
                   now: datetime) -> x509.Certificate:
    """The anchor an enrollment stores with ``cert`` (as tpmid.lifecycle.enroll verifies it)."""
    verified = verify_enrollment(cert, key_spki_der=spki, requested_subject=DEVICE,
                                 issuers=trust.anchors, extra_certs=trust.intermediates,
                                 now=now)
    return verified.chain[-1]


def _resigned(cert: x509.Certificate, *, by: ec.EllipticCurvePrivateKey,
              ca: bool = True, issuer: x509.Name | None = None,
              not_after: datetime | None = None) -> x509.Certificate:
    """``cert`` rebuilt (name, key, validity) and signed by ``by``."""
    b = (x509.CertificateBuilder().subject_name(cert.subject)
         .issuer_name(issuer or cert.issuer).public_key(cert.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(cert.not_valid_before_utc)
         .not_valid_after(not_after or cert.not_valid_after_utc)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return b.sign(by, cert.signature_hash_algorithm)  # type: ignore[arg-type]


def _bad_signature(cert: x509.Certificate) -> x509.Certificate:
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature value
    return x509.load_der_x509_certificate(bytes(der))


ORDERS = list(itertools.permutations(range(4)))


@pytest.mark.parametrize("order", ORDERS, ids=["".join(map(str, o)) for o in ORDERS])
def test_the_new_root_is_trusted_through_new_with_old_in_any_order(
    rolled: Rolled, order: tuple[int, ...],
) -> None:
    offered = [rolled.offered[i] for i in order]
    now = rolled.at + timedelta(minutes=1)
    trust = follow_root_key_update(offered, rolled.old, now=now)
    assert trust.anchors == (rolled.old, rolled.new)
    assert trust.new_roots == (rolled.new,) and trust.unvouched == ()
    cert, spki = _device_cert(rolled.dir, rolled.at)
    # The enrollment stores the self-signed new root as the anchor, not NewWithOld
    # and not the old root through it.
    assert _stored_anchor(trust, cert, spki, now) == rolled.new


@pytest.mark.parametrize("missing", ["old_with_new", "old"])
def test_old_with_new_and_old_with_old_are_not_needed_to_follow_the_new_root(
    rolled: Rolled, missing: str,
) -> None:
    offered = [c for c in rolled.offered if c != getattr(rolled, missing)]
    now = rolled.at + timedelta(minutes=1)
    trust = follow_root_key_update(offered, rolled.old, now=now)
    assert trust.new_roots == (rolled.new,)
    cert, spki = _device_cert(rolled.dir, rolled.at)
    assert _stored_anchor(trust, cert, spki, now) == rolled.new


def _refused(rolled: Rolled, offered: list[x509.Certificate], now: datetime) -> str:
    trust = follow_root_key_update(offered, rolled.old, now=now)
    assert trust.anchors == (rolled.old,) and trust.new_roots == ()
    (unvouched,) = trust.unvouched
    assert unvouched.root == rolled.new
    cert, spki = _device_cert(rolled.dir, rolled.at)
    with pytest.raises(VerificationError):
        _stored_anchor(trust, cert, spki, rolled.at + timedelta(minutes=1))
    return unvouched.reason


def test_a_new_with_old_with_a_bad_signature_vouches_for_nothing(rolled: Rolled) -> None:
    offered = [rolled.new, rolled.old, rolled.old_with_new, _bad_signature(rolled.new_with_old)]
    reason = _refused(rolled, offered, rolled.at + timedelta(minutes=1))
    assert "its signature does not verify with the anchor's key" in reason


def test_a_new_root_without_new_with_old_is_refused(rolled: Rolled) -> None:
    offered = [rolled.new, rolled.old, rolled.old_with_new]
    reason = _refused(rolled, offered, rolled.at + timedelta(minutes=1))
    assert reason == "/cacerts holds no NewWithOld certificate for it signed by the anchor"


def test_an_expired_new_with_old_vouches_for_nothing(rolled: Rolled) -> None:
    expired = _resigned(rolled.new_with_old, by=rolled.old_key,
                        not_after=rolled.at + timedelta(seconds=30))
    offered = [rolled.new, rolled.old, rolled.old_with_new, expired]
    reason = _refused(rolled, offered, rolled.at + timedelta(minutes=1))
    assert "it is valid only from" in reason


def test_a_new_with_old_that_is_not_a_ca_certificate_vouches_for_nothing(
    rolled: Rolled,
) -> None:
    not_ca = _resigned(rolled.new_with_old, by=rolled.old_key, ca=False)
    offered = [rolled.new, rolled.old, rolled.old_with_new, not_ca]
    reason = _refused(rolled, offered, rolled.at + timedelta(minutes=1))
    assert "cA=FALSE" in reason


def test_a_new_with_old_signed_by_another_ca_vouches_for_nothing(
    rolled: Rolled, tmp_path: Path,
) -> None:
    init_server_dir(tmp_path / "other")
    other = load_ca("operator", tmp_path / "other" / "operator-ca.pem",
                    tmp_path / "other" / "private" / "operator-ca.key")
    assert isinstance(other.key, ec.EllipticCurvePrivateKey)
    foreign = _resigned(rolled.new_with_old, by=other.key,
                        issuer=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Other CA")]))
    offered = [rolled.new, rolled.old, rolled.old_with_new, foreign]
    reason = _refused(rolled, offered, rolled.at + timedelta(minutes=1))
    assert "not by the anchor" in reason
    # Same issuer name as the anchor, another key: the signature gives it away.
    forged = _resigned(rolled.new_with_old, by=other.key)
    offered = [rolled.new, rolled.old, rolled.old_with_new, forged]
    assert "signature does not verify" in _refused(rolled, offered,
                                                   rolled.at + timedelta(minutes=1))


def test_a_second_rollover_is_followed_from_the_first_ones_new_root(rolled: Rolled) -> None:
    first = rolled
    second = _roll(first.dir, first.at + timedelta(minutes=5))
    assert second.old == first.new  # generation 2 rolls over to generation 3
    now = second.at + timedelta(minutes=1)
    cert, spki = _device_cert(second.dir, second.at)
    # A device that renewed during the first rollover anchors at generation 2.
    trust = follow_root_key_update(second.offered, first.new, now=now)
    assert trust.new_roots == (second.new,)
    assert _stored_anchor(trust, cert, spki, now) == second.new
    # One that slept through both still anchors at generation 1: nothing it trusts
    # vouches for generation 3, so it is refused (and must be given the new root).
    stale = follow_root_key_update(second.offered, first.old, now=now)
    assert stale.new_roots == ()
    assert {u.root for u in stale.unvouched} == {second.new, first.new}
    with pytest.raises(VerificationError):
        _stored_anchor(stale, cert, spki, now)


def test_a_root_that_issued_the_anchor_is_not_reported_as_a_stranger(rolled: Rolled) -> None:
    # An identity whose stored anchor is an intermediate (here: NewWithOld stands in
    # for one, issued by the old root): the old root above it is no new root.
    trust = follow_root_key_update([rolled.old], rolled.new_with_old,
                                   now=rolled.at + timedelta(minutes=1))
    assert trust.unvouched == () and trust.new_roots == ()
