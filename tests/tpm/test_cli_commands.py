"""``tpmid tpm ...``, ``tpmid key ...`` and ``tpmid csr`` run in-process against a real swtpm.

After every command the TPM must hold no transient object.
"""

from __future__ import annotations

import io
import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from tpm2_pytss.constants import ESYS_TR

from tests.tpm.helpers import run_tool, transient_objects
from tpmid.cli import main
from tpmid.csr import OID_HARDWARE_MODULE_NAME, TCG_TPM_HW_TYPE, parse_hardware_module_name
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm import ek as ekmod
from tpmid.tpm.connection import TpmConnection


class Cli:
    """Runs ``tpmid`` with a config for one swtpm and checks the TPM afterwards."""

    def __init__(self, sim: Swtpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.sim = sim
        self.tmp = tmp_path
        self.capsys = capsys
        self.store = tmp_path / "store"
        self.config = tmp_path / "config.yaml"

    def write_config(self, identities: dict[str, Any], auth: dict[str, Any] | None = None) -> None:
        tpm: dict[str, Any] = {"tcti": self.sim.tcti}
        if auth:
            tpm["auth"] = auth
        self.config.write_text(yaml.safe_dump({"tpm": tpm, "store": {"dir": str(self.store)},
                                               "identities": identities}))

    def run(self, *argv: str) -> tuple[int, str, str]:
        rc = main(["--config", str(self.config), *argv])
        out, err = self.capsys.readouterr()
        assert transient_objects(self.sim) == [], f"transient objects left by {argv}"
        return rc, out, err

    def json(self, *argv: str) -> Any:
        rc, out, err = self.run("--json", *argv)
        assert rc == 0, err
        return json.loads(out)


@pytest.fixture
def cli(swtpm: Swtpm, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.delenv("TPMID_CONFIG", raising=False)
    monkeypatch.delenv("TPMID_TCTI", raising=False)
    c = Cli(swtpm, tmp_path, capsys)
    c.write_config({
        "dev": {"key": {"kind": "persistent", "template": "H-2"},
                "subject": {"cn": "device-0001", "o": "Acme", "serial_number": "SN0001"},
                "san": {"dns": ["dev1.example"], "ip": ["127.0.0.1", "::1"],
                        "uri": ["urn:acme:dev:0001"], "hardware_module_name": True}},
        "p384": {"key": {"kind": "ek-derived", "template": "H-3"},
                 "subject": {"cn": "device-0001-ek"}},
        "edge": {"key": {"kind": "file", "alg": "ecc-p256"}, "subject": {"cn": "edge-ca"}},
    })
    return c


def test_tpm_info_works_without_a_config_file(swtpm: Swtpm, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPMID_CONFIG", raising=False)
    monkeypatch.setenv("TPMID_TCTI", swtpm.tcti)
    assert main(["tpm", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["manufacturer"] == "IBM" and info["tcti"] == swtpm.tcti
    assert main(["tpm", "info"]) == 0
    assert "manufacturer:       IBM" in capsys.readouterr().out
    assert transient_objects(swtpm) == []


def test_tpm_ek_reports_the_device_fingerprint_and_ek_certificates(cli: Cli) -> None:
    data = cli.json("tpm", "ek")
    with TpmConnection(cli.sim.tcti) as tpm:
        expected = ekmod.device_fingerprint(ekmod.read_eks(tpm))
    assert data["device_fingerprint"] == expected
    l1 = data["eks"][0]
    assert (l1["alg"], l1["cert_index"], l1["cert_matches_key"]) == ("rsa-2048", "0x01c00002",
                                                                     True)
    assert l1["cert_pem"].startswith("-----BEGIN CERTIFICATE-----")
    rc, out, _ = cli.run("tpm", "ek")
    assert rc == 0 and f"device fingerprint: {expected}" in out and "none in NV" in out


def test_key_create_persistent_is_idempotent_and_show_and_delete_work(cli: Cli) -> None:
    first = cli.json("key", "create", "dev")
    second = cli.json("key", "create", "dev")
    assert (first["created"], second["created"]) == (True, False)
    assert first["public_key_sha256"] == second["public_key_sha256"]
    assert first["handle"] == "0x81020000" and first["template"] == "H-2"
    shown = cli.json("key", "show", "dev")
    assert shown["public_key_sha256"] == first["public_key_sha256"]
    rc, _, err = cli.run("key", "delete", "dev", "--yes")
    assert rc == 0
    rc, _, err = cli.run("key", "show", "dev")
    assert rc == 3
    assert "no key at 0x81020000" in err and "tpmid key create dev" in err


def test_key_create_refuses_a_different_key_at_the_handle_unless_forced(cli: Cli) -> None:
    assert cli.run("key", "create", "dev")[0] == 0
    cli.write_config({"dev": {"key": {"kind": "persistent", "template": "H-3"},
                              "subject": {"cn": "device-0001"}}})
    rc, _, err = cli.run("key", "create", "dev")
    assert rc == 3 and "not an IDevID from template H-3" in err and "--force" in err
    assert cli.json("key", "create", "dev", "--force")["alg"] == "ecc-p384"


def _commit_file_key(cli: Cli, name: str, alg: str = "ecc-p256") -> Path:
    """Put a TPM key file with a certificate into the store, as enrollment would.

    The certificate comes from a throwaway software CA: this test is about the
    key commands, not EST (enrollment itself is tested in tests/lifecycle).
    """
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tpmid.store import Store
    from tpmid.tpm.keyfile import create_key_file, load_key_file

    with TpmConnection(cli.sim.tcti) as tpm:
        pem = create_key_file(tpm, alg)
        with load_key_file(tpm, pem) as key:
            public = key.public_key()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    store = Store(cli.store)
    staged = store.stage_key(name, pem)
    stored = store.commit(name, cert, [], staged)
    assert stored.key_file is not None
    return stored.key_file


def test_file_keys_come_with_enrollment_and_live_privately_in_the_store(
        cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    rc, _, err = cli.run("key", "create", "edge")
    assert rc == 7 and "tpmid enroll edge" in err
    path = _commit_file_key(cli, "edge")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    shown = cli.json("key", "show", "edge")
    assert shown["path"] == str(path)
    kept = cli.json("key", "create", "edge")
    assert kept["created"] is False and kept["public_key_sha256"] == shown["public_key_sha256"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, _, err = cli.run("key", "delete", "edge", "--yes")
    assert rc == 2 and "tpmid reset edge" in err and path.exists()


def test_ek_derived_identity_needs_no_storage(cli: Cli) -> None:
    created = cli.json("key", "create", "p384")
    assert created["created"] is False and "nothing to store" in created["status"]
    assert cli.json("key", "show", "p384")["public_key_sha256"] == created["public_key_sha256"]
    assert cli.json("key", "delete", "p384")["deleted"] is False


def test_csr_is_signed_by_the_tpm_key_and_names_the_tpm(cli: Cli) -> None:
    assert cli.run("key", "create", "dev")[0] == 0
    out = cli.tmp / "dev.csr"
    rc, _, _ = cli.run("csr", "dev", "--out", str(out))
    assert rc == 0
    verify = run_tool(cli.sim, "openssl", "req", "-in", str(out), "-verify", "-noout")
    assert "verify OK" in verify.stdout + verify.stderr
    csr = x509.load_pem_x509_csr(out.read_bytes())
    assert csr.is_signature_valid
    shown = cli.json("key", "show", "dev")
    assert csr.public_key().public_bytes(
        *_spki_format()).decode() == shown["public_key_pem"]
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    other = san.get_values_for_type(x509.OtherName)
    assert [o.type_id.dotted_string for o in other] == [OID_HARDWARE_MODULE_NAME]
    hw_type, serial = parse_hardware_module_name(other[0].value)
    with TpmConnection(cli.sim.tcti) as tpm:
        rsa_ek = ekmod.primary_ek(ekmod.read_eks(tpm))
    assert rsa_ek.cert_der is not None
    ek_cert = x509.load_der_x509_certificate(rsa_ek.cert_der)
    aki = ek_cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    assert hw_type == TCG_TPM_HW_TYPE
    assert serial == f"00001014:{aki.key_identifier.hex()}:{ek_cert.serial_number:x}".encode()
    assert san.get_values_for_type(x509.DNSName) == ["dev1.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


def _spki_format() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo


def test_csr_takes_a_challenge_password_from_stdin(cli: Cli,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.x509.oid import AttributeOID

    monkeypatch.setattr(sys, "stdin", io.StringIO("tls+unique/value=\n"))
    data = cli.json("csr", "p384", "--challenge-password-stdin")
    csr = x509.load_pem_x509_csr(data["csr_pem"].encode())
    assert csr.is_signature_valid
    assert csr.attributes.get_attribute_for_oid(
        AttributeOID.CHALLENGE_PASSWORD).value == b"tls+unique/value="


def test_owner_password_comes_from_the_environment_and_is_never_printed(
        cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    with TpmConnection(cli.sim.tcti) as tpm:
        tpm.esapi.hierarchy_change_auth(ESYS_TR.OWNER, b"S3cret-owner-pw")
    cli.write_config({"dev": {"key": {"kind": "persistent"}, "subject": {"cn": "d"}}},
                     auth={"owner": {"env": "TPMID_TEST_OWNER_PW"}})
    monkeypatch.setenv("TPMID_TEST_OWNER_PW", "Wrong-owner-pw")
    rc, out, err = cli.run("key", "create", "dev")
    assert rc == 3 and "owner hierarchy" in err and "tpm.auth.owner" in err
    assert "owner-pw" not in out + err
    monkeypatch.setenv("TPMID_TEST_OWNER_PW", "S3cret-owner-pw")
    rc, out, err = cli.run("key", "create", "dev")
    assert rc == 0 and "owner-pw" not in out + err


def test_file_key_from_before_a_tpm_clear_asks_for_re_enrollment(cli: Cli) -> None:
    _commit_file_key(cli, "edge")
    assert cli.run("csr", "edge")[0] == 0
    with TpmConnection(cli.sim.tcti) as tpm:
        tpm.esapi.clear(ESYS_TR.LOCKOUT)
    rc, _, err = cli.run("csr", "edge")
    assert rc == 3 and "before a TPM clear" in err and "tpmid enroll edge" in err


def test_unknown_identity_is_a_config_error(cli: Cli) -> None:
    rc, _, err = cli.run("key", "show", "nope")
    assert rc == 2 and "no identity named 'nope'" in err
