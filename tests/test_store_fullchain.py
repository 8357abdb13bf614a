"""``fullchain.pem``: leaf + issuing chain beside cert.pem in every version, kept intact by recovery.

A real two-level PKI (root → intermediate → device) issues real certificates;
the store writes and reads them on a real filesystem.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tpmid.errors import StoreError
from tpmid.store import Store, recover
from tpmid.store.versions import FULLCHAIN, full_chain


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class TwoLevelPki:
    """Root CA → issuing intermediate → device certificates."""

    def __init__(self) -> None:
        now = datetime.now(UTC)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = (
            x509.CertificateBuilder().subject_name(_name("Root")).issuer_name(_name("Root"))
            .public_key(self.root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.root_key, hashes.SHA256()))
        self.int_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = (
            x509.CertificateBuilder().subject_name(_name("Issuing CA")).issuer_name(_name("Root"))
            .public_key(self.int_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.root_key, hashes.SHA256()))

    def issue(self, cn: str = "device-1") -> x509.Certificate:
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder().subject_name(_name(cn))
            .issuer_name(self.intermediate.subject)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(days=30))
            .sign(self.int_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki() -> TwoLevelPki:
    return TwoLevelPki()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def _read(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def test_fullchain_is_the_leaf_and_its_issuing_chain_without_the_root(
        store: Store, pki: TwoLevelPki) -> None:
    cert = pki.issue()
    stored = store.commit("ldevid", cert, [pki.intermediate, pki.root], None)
    assert stored.fullchain_path == store.current_dir("ldevid").parent / stored.version / FULLCHAIN
    assert _read(store.current_dir("ldevid") / FULLCHAIN) == [cert, pki.intermediate]
    # chain.pem is unchanged: the whole validated path, root included.
    assert _read(stored.chain_path) == [pki.intermediate, pki.root]
    assert os.stat(stored.fullchain_path).st_mode & 0o777 == 0o644


def test_fullchain_keeps_the_root_when_the_server_sent_it(store: Store, pki: TwoLevelPki) -> None:
    cert = pki.issue()
    stored = store.commit("ldevid", cert, [pki.intermediate, pki.root], None,
                          server_sent=[pki.intermediate, pki.root])
    assert stored.fullchain_path is not None
    assert _read(stored.fullchain_path) == [cert, pki.intermediate, pki.root]


def test_a_certificate_issued_by_the_root_itself_has_a_fullchain_of_one(
        store: Store, pki: TwoLevelPki) -> None:
    assert full_chain(pki.intermediate, [pki.root]) == [pki.intermediate]


@pytest.mark.parametrize("damage", ["missing", "truncated", "another certificate"])
def test_a_version_without_an_intact_fullchain_is_damaged_and_recovery_rewrites_it(
        store: Store, pki: TwoLevelPki, damage: str) -> None:
    cert = pki.issue()
    stored = store.commit("ldevid", cert, [pki.intermediate, pki.root], None)
    path = stored.fullchain_path
    assert path is not None
    if damage == "missing":  # as in a version committed before tpmid wrote one
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(pki.issue("other").public_bytes(Encoding.PEM))
    with pytest.raises(StoreError, match="fullchain.pem"):
        store.current("ldevid")

    actions = [str(a) for a in recover(store)]

    assert any("rewrote fullchain.pem of version" in a for a in actions), actions
    cur = store.current("ldevid")
    assert cur is not None and cur.version == stored.version  # no fallback: it was repaired
    assert _read(path) == [cert, pki.intermediate]


def test_recovery_falls_back_when_the_certificate_itself_is_damaged(
        store: Store, pki: TwoLevelPki) -> None:
    first = store.commit("ldevid", pki.issue("one"), [pki.intermediate, pki.root], None)
    second = store.commit("ldevid", pki.issue("two"), [pki.intermediate, pki.root], None)
    second.cert_path.write_bytes(b"-----BEGIN CERT")
    assert second.fullchain_path is not None
    second.fullchain_path.unlink()

    recover(store)

    cur = store.current("ldevid")
    assert cur is not None and cur.version == first.version
