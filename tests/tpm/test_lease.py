"""The TPM lease: borrowed for the signature, given back before the network (real swtpm)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_der_public_key

from tpmid.errors import KeyUnavailableError, StoreError
from tpmid.store import host_tpm_lock
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.lease import LeasedKey, TpmLease


@pytest.fixture
def key_files(swtpm: Swtpm) -> tuple[bytes, bytes, bytes]:
    """Two P-256 key files and the SPKI of the first."""
    with TpmConnection(swtpm.tcti) as tpm, tpm.storage_parent_scope():
        pem1, k1 = tpm.create_key_file("ecc-p256")
        spki = k1.public_key_der()
        k1.close()
        pem2, k2 = tpm.create_key_file("ecc-p256")
        k2.close()
    return pem1, pem2, spki


def _opener(swtpm: Swtpm, lock: Path, opened: list[int]) -> object:
    @contextlib.contextmanager
    def open_tpm() -> Iterator[TpmConnection]:
        with host_tpm_lock(lock, timeout=1), TpmConnection(swtpm.tcti) as tpm:
            opened.append(1)
            yield tpm
    return open_tpm


def _lock_is_free(lock: Path) -> bool:
    try:
        with host_tpm_lock(lock, wait=False):
            return True
    except StoreError:
        return False


def test_a_leased_key_signs_then_gives_the_tpm_back(swtpm: Swtpm, tmp_path: Path,
                                                   key_files: tuple[bytes, bytes, bytes]) -> None:
    pem, _, spki = key_files
    lock, opened = tmp_path / "tpm.lock", []
    lease = TpmLease(_opener(swtpm, lock, opened))  # type: ignore[arg-type]
    key = LeasedKey(lease, lambda tpm: tpm.load_key_file(pem), spki, description="test key")
    assert (key.alg, key.hash_name) == ("ecc-p256", "sha256")
    assert not lease.held and _lock_is_free(lock)  # nothing is taken before it is needed

    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"handshake transcript")
    d = digest.finalize()
    sig = key.sign_digest(d)
    pub = load_der_public_key(spki)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, d, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert not lease.held and _lock_is_free(lock)  # given back right after the signature
    with TpmConnection(swtpm.tcti) as tpm:
        assert tpm.transient_handles() == []  # key and storage parent flushed

    key.sign_digest(d)  # a second handshake borrows it again
    assert len(opened) == lease.acquisitions == 2


def test_work_under_the_lease_keeps_it_until_the_handshake_signs(
        swtpm: Swtpm, tmp_path: Path, key_files: tuple[bytes, bytes, bytes]) -> None:
    pem, _, spki = key_files
    lock, opened = tmp_path / "tpm.lock", []
    lease = TpmLease(_opener(swtpm, lock, opened))  # type: ignore[arg-type]
    lease.tpm().esapi.get_random(4)  # the CSR step
    assert lease.held and not _lock_is_free(lock)
    LeasedKey(lease, lambda tpm: tpm.load_key_file(pem), spki,
              description="test key").sign_digest(b"\x01" * 32)
    assert len(opened) == 1  # the signature used the lease already held: no extra open
    assert not lease.held and _lock_is_free(lock)


def test_a_key_that_is_no_longer_the_certificates_key_is_unavailable(
        swtpm: Swtpm, tmp_path: Path, key_files: tuple[bytes, bytes, bytes]) -> None:
    _, other_pem, spki = key_files  # the certificate names key 1, the TPM loads key 2
    lease = TpmLease(_opener(swtpm, tmp_path / "tpm.lock", []))  # type: ignore[arg-type]
    key = LeasedKey(lease, lambda tpm: tpm.load_key_file(other_pem), spki, description="ldevid")
    with pytest.raises(KeyUnavailableError, match="not the key of its certificate"):
        key.sign_digest(b"\x01" * 32)
    assert not lease.held
    with TpmConnection(swtpm.tcti) as tpm:
        assert tpm.transient_handles() == []
