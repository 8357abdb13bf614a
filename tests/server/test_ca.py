"""The reference CAs and the server directory made by ``init_server_dir``."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.server.helpers import HARDWARE_MODULE_NAME, hardware_module_name, new_key
from tpmid.errors import ConfigError
from tpmid.server import init_server_dir
from tpmid.server.auth import hash_secret, verify_secret
from tpmid.server.ca import CertificateAuthority, IssueLog, create_root_ca, load_ca
from tpmid.server.state import ServerPaths, ServerState

SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def operator_ca() -> CertificateAuthority:
    return create_root_ca("operator", "test operator", "ecc-p256", 10 * 365 * 86400,
                          path_length=None)


@pytest.mark.parametrize(
    ("alg", "key_type", "size"),
    [("ecc-p256", ec.EllipticCurvePublicKey, 256), ("ecc-p384", ec.EllipticCurvePublicKey, 384),
     ("rsa-2048", rsa.RSAPublicKey, 2048)],
    ids=["ecc-p256", "ecc-p384", "rsa-2048"],
)
def test_init_creates_three_cas_and_a_loopback_tls_certificate_of_the_chosen_algorithm(
    tmp_path: Path, alg: str, key_type: type, size: int
) -> None:
    res = init_server_dir(tmp_path / "srv", alg=alg)
    state = ServerState.load(res.dir)
    tls_cert = x509.load_pem_x509_certificate(state.paths.tls_cert.read_bytes())
    for cert in (state.cas["manufacturer"].cert, state.cas["operator"].cert, state.tls_ca,
                 tls_cert):
        assert isinstance(cert.public_key(), key_type)
        assert cert.public_key().key_size == size
    assert len({c.cert.subject for c in state.cas.values()} | {state.tls_ca.subject}) == 3
    san = tls_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    tls_cert.verify_directly_issued_by(state.tls_ca)
    assert res.fingerprints == state.fingerprints()


def test_init_keeps_private_keys_0600_in_a_0700_directory_and_publishes_ca_certs(
    tmp_path: Path,
) -> None:
    res = init_server_dir(tmp_path / "srv")
    paths = ServerPaths(res.dir)
    assert mode(paths.private) == 0o700
    keys = sorted(paths.private.iterdir())
    assert [k.name for k in keys] == ["manufacturer-ca.key", "operator-ca.key", "server.key",
                                      "tls-ca.key"]
    assert all(mode(k) == 0o600 for k in keys)
    assert mode(paths.config) == 0o600
    for pem in (res.tls_ca_path, res.manufacturer_ca_path, res.operator_ca_path):
        assert mode(pem) == 0o644
        x509.load_pem_x509_certificate(pem.read_bytes())


def test_init_stores_only_a_salted_hash_of_the_idevid_secret(tmp_path: Path) -> None:
    res = init_server_dir(tmp_path / "srv")
    everything = b"".join(p.read_bytes() for p in res.dir.rglob("*") if p.is_file())
    assert res.secret.encode() not in everything
    config = res.config_path.read_text()
    stored = next(line.split('"')[1] for line in config.splitlines() if "hash:" in line)
    assert stored.startswith("scrypt$")
    assert verify_secret(res.secret, stored)
    assert not verify_secret(res.secret + "x", stored)


def test_two_inits_produce_different_secrets_and_cas(tmp_path: Path) -> None:
    a, b = init_server_dir(tmp_path / "a"), init_server_dir(tmp_path / "b")
    assert a.secret != b.secret
    assert set(a.fingerprints.values()).isdisjoint(b.fingerprints.values())


def test_init_refuses_a_directory_that_already_holds_a_server(tmp_path: Path) -> None:
    init_server_dir(tmp_path / "srv")
    with pytest.raises(ConfigError, match="already holds an EST server"):
        init_server_dir(tmp_path / "srv")


def test_secret_hashes_are_salted(tmp_path: Path) -> None:
    assert hash_secret("same") != hash_secret("same")
    assert verify_secret("same", hash_secret("same"))
    assert not verify_secret("same", "plaintext-is-never-a-valid-hash")


def test_ca_roundtrips_through_its_files(tmp_path: Path) -> None:
    res = init_server_dir(tmp_path / "srv")
    paths = ServerPaths(res.dir)
    ca = load_ca("operator", paths.ca_cert("operator"), paths.ca_key("operator"))
    cert = ca.issue(public_key=new_key().public_key(), subject=SUBJECT, profile="ldevid",
                    lifetime=60)
    assert ca.issued(cert)


# --------------------------------------------------------------------------- profiles


def ext(cert: x509.Certificate, cls: type) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(cls).value


@pytest.mark.parametrize("profile", ["idevid", "ldevid"], ids=str)
def test_device_profiles_are_client_auth_end_entities(operator_ca: CertificateAuthority,
                                                      profile: str) -> None:
    cert = operator_ca.issue(public_key=new_key().public_key(), subject=SUBJECT, profile=profile,
                             lifetime=3600)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(cert, x509.KeyUsage)
    assert ku.digital_signature and not ku.key_cert_sign
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(operator_ca.cert)


def test_edge_ca_profile_is_a_ca_with_path_length_zero(operator_ca: CertificateAuthority) -> None:
    cert = operator_ca.issue(public_key=new_key().public_key(), subject=SUBJECT,
                             profile="edgeca", lifetime=3600)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.ca is True and bc.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_idevid_keeps_the_hardware_module_name_san_from_the_request(
    operator_ca: CertificateAuthority,
) -> None:
    hmn = hardware_module_name("1.3.6.1.4.1.45724.1.1.1", b"SN-0001")
    san = x509.SubjectAlternativeName([x509.OtherName(HARDWARE_MODULE_NAME, hmn)])
    cert = operator_ca.issue(public_key=new_key().public_key(), subject=SUBJECT, san=san,
                             profile="idevid", lifetime=3600)
    got = ext(cert, x509.SubjectAlternativeName).get_values_for_type(x509.OtherName)
    assert [(o.type_id, o.value) for o in got] == [(HARDWARE_MODULE_NAME, hmn)]


def test_lifetime_can_be_seconds(operator_ca: CertificateAuthority) -> None:
    cert = operator_ca.issue(public_key=new_key().public_key(), subject=SUBJECT,
                             profile="ldevid", lifetime=30)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(seconds=30)
    assert abs(cert.not_valid_before_utc - datetime.now(UTC)) < timedelta(seconds=5)


def test_lifetime_is_capped_by_the_ca_not_after() -> None:
    short_ca = create_root_ca("operator", "short", "ecc-p256", 3600, path_length=None)
    cert = short_ca.issue(public_key=new_key().public_key(), subject=SUBJECT, profile="idevid",
                          lifetime=20 * 365 * 86400)
    assert cert.not_valid_after_utc == short_ca.cert.not_valid_after_utc


def test_serials_are_128_bit_random_and_unique(operator_ca: CertificateAuthority) -> None:
    key = new_key().public_key()
    serials = [operator_ca.issue(public_key=key, subject=SUBJECT, profile="ldevid",
                                 lifetime=60).serial_number for _ in range(40)]
    assert len(set(serials)) == 40
    assert all(0 < s < 2**128 for s in serials)
    assert max(s.bit_length() for s in serials) > 120  # not a counter


def test_issue_log_appends_one_json_line_per_record(tmp_path: Path) -> None:
    log = IssueLog(tmp_path / "issued.jsonl")
    log.append({"serial": "01"})
    log.append({"serial": "02"})
    assert [r["serial"] for r in log.records()] == ["01", "02"]
    assert len((tmp_path / "issued.jsonl").read_text().splitlines()) == 2


def test_concurrent_issue_log_appends_never_interleave_and_all_reach_the_file(
        tmp_path: Path) -> None:
    import threading

    log = IssueLog(tmp_path / "issued.jsonl")
    # Lines longer than a pipe buffer, from many threads at once.
    payload = "x" * 9000

    def worker(n: int) -> None:
        for i in range(20):
            log.append({"thread": n, "i": i, "payload": payload})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = log.records()  # json.loads of every line: a torn line would raise
    assert sorted((r["thread"], r["i"]) for r in records) == [
        (n, i) for n in range(8) for i in range(20)]
    assert all(r["payload"] == payload for r in records)
