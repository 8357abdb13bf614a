"""``tpmid aziot import``: IoT Edge's config.toml becomes a tpmid config, and nothing is dropped silently.

The walkthrough's config (tests/data/aziot-config.toml, the file the GlobalSign
walkthrough prints on one line) and variations of it: HTTP Basic, one URL for
all certificates, no Edge CA, PKCS#11 keys, unknown sections, a file that is not
TOML. Every case checks that each key of the TOML file is reported, mapped or
not, and that the config written is one tpmid accepts.
"""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tpmid.aziot import EDGE_CA_DEFAULT_CN, import_aziot, parse_amount
from tpmid.cli import main
from tpmid.config import parse_config

DATA = Path(__file__).resolve().parents[1] / "data"
WALKTHROUGH = (DATA / "aziot-config.toml").read_text()


def _leaves(doc: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in doc.items():
        path = f"{prefix}.{k}" if prefix else k
        out |= _leaves(v, path) if isinstance(v, dict) and v else {path}
    return out


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["aziot", "import", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _import(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
            *args: str) -> tuple[int, dict[str, Any]]:
    src = tmp_path / "config.toml"
    src.write_text(text)
    rc, out, err = _run(capsys, str(src), "--json", *args)
    return rc, json.loads(out)


def _finding(report: dict[str, Any], key: str) -> dict[str, Any]:
    return next(f for f in report["findings"] if f["key"] == key)


BASIC = """
[cert_issuance.est]
trusted_certs = ["file:///etc/aziot/est-root.pem"]
[cert_issuance.est.auth]
username = "estuser"
password = "s3cret-est-password"
[provisioning.attestation.identity_cert]
method = "est"
common_name = "dev-1"
url = "https://est.example.org/.well-known/est/ldevid"
[edge_ca]
method = "est"
common_name = "dev-1 Edge CA"
url = "https://est.example.org/.well-known/est/edgeca"
"""

ONE_URL = """
[cert_issuance.est]
trusted_certs = "file:///etc/aziot/est-root.pem"
[cert_issuance.est.urls]
default = "https://est.example.org/.well-known/est"
[cert_issuance.est.auth]
bootstrap_identity_cert = "file:///var/aziot/certs/bootstrap.pem"
bootstrap_identity_pk = "file:///var/aziot/secrets/bootstrap.key.pem"
[provisioning.attestation.identity_cert]
method = "est"
common_name = "dev-2"
[edge_ca]
method = "est"
"""

NO_EDGE_CA = """
[cert_issuance.est]
trusted_certs = ["file:///etc/aziot/est-root.pem"]
[provisioning]
source = "manual"
iothub_hostname = "hub.azure-devices.net"
device_id = "dev-3"
[provisioning.authentication]
method = "x509"
[provisioning.authentication.identity_cert]
method = "est"
url = "https://est.example.org/.well-known/est"
auto_renew = { threshold = "10d", retry = "30m", rotate_key = false }
"""

PKCS11 = """
[cert_issuance.est]
trusted_certs = ["file:///etc/aziot/est-root.pem"]
[cert_issuance.est.auth]
identity_cert = "file:///var/aziot/certs/est-id.pem"
identity_pk = "pkcs11:token=edge;object=est-id?pin-value=1234"
[provisioning.attestation.identity_cert]
method = "est"
common_name = "dev-4"
url = "https://est.example.org/.well-known/est/ldevid"
[aziot_keys]
pkcs11_lib_path = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
pkcs11_base_slot = "pkcs11:token=edge?pin-value=1234"
"""

UNKNOWN = """
hostname = "dev-5"
[cert_issuance.est]
trusted_certs = ["file:///etc/aziot/est-root.pem"]
[provisioning.attestation.identity_cert]
method = "est"
common_name = "dev-5"
url = "https://est.example.org/.well-known/est/ldevid"
colour = "blue"
[edge_ca]
method = "est"
url = "https://est.example.org/.well-known/est/edgeca"
expiry_days = 30
[frobnicator]
speed = 11
[agent.config]
image = "mcr.microsoft.com/azureiotedge-agent:1.4"
"""

CLEAN = """
[cert_issuance.est]
trusted_certs = ["file:///etc/aziot/est-root.pem"]
[cert_issuance.est.urls]
default = "https://est.example.org/.well-known/est"
[provisioning.attestation.identity_cert]
method = "est"
common_name = "dev-6"
[provisioning.attestation.identity_cert.auto_renew]
threshold = "80%"
retry = "4%"
rotate_key = true
[edge_ca]
method = "est"
common_name = "dev-6 Edge CA"
"""

CASES = {"walkthrough": WALKTHROUGH, "basic": BASIC, "one-url": ONE_URL,
         "no-edge-ca": NO_EDGE_CA, "pkcs11": PKCS11, "unknown": UNKNOWN, "clean": CLEAN}


@pytest.mark.parametrize("text", CASES.values(), ids=CASES.keys())
def test_every_key_of_the_file_is_reported_and_the_config_is_one_tpmid_accepts(
        text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = _import(tmp_path, capsys, text)
    keys = {f["key"] for f in report["findings"]}
    assert keys == _leaves(tomllib.loads(text))
    for f in report["findings"]:
        assert f["detail"], f
        assert f["status"] in ("mapped", "not mapped")
    assert rc == (0 if report["clean"] else 1)
    assert report["clean"] == all(f["status"] == "mapped" for f in report["findings"])
    parse_config(report["config"], "imported")


def test_the_walkthrough_maps_est_and_lists_dps_and_the_software_key_with_its_remedy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, r = _import(tmp_path, capsys, WALKTHROUGH, "--serial", "SN-1")
    assert rc == 1 and not r["clean"]
    ids = r["config"]["identities"]
    assert r["config"]["trust"]["est_anchors"] == ["/var/aziot/certs/globalsign-root.cert.pem"]
    assert ids["ldevid"]["subject"] == {"cn": "my-device-id", "serial_number": "SN-1"}
    assert ids["ldevid"]["est"]["auth"] == {"client": "idevid"}
    assert ids["ldevid"]["renew"] == {"threshold": "80%", "retry": "4%"}
    # [edge_ca] names no common_name: tpmid asks for IoT Edge's default, and says so.
    assert ids["edge-ca"]["subject"]["cn"] == EDGE_CA_DEFAULT_CN == "aziot-edge CA"
    assert any(EDGE_CA_DEFAULT_CN in d and "common_name" in d for d in r["decisions"])
    assert ids["edge-ca"]["profile"] == "ca" and ids["edge-ca"]["est"]["auth"] == {
        "client": "ldevid"}
    assert ids["idevid"]["key"] == {"kind": "persistent", "template": "H-2",
                                    "handle": 0x81020000}
    for key in ("provisioning.source", "provisioning.id_scope",
                "provisioning.global_endpoint", "provisioning.attestation.method"):
        f = _finding(r, key)
        assert f["status"] == "not mapped" and "DPS" in f["detail"], f
    pk = _finding(r, "cert_issuance.est.auth.identity_pk")
    assert pk["status"] == "not mapped" and pk["line"] == 14
    assert "software key file" in pk["detail"] and "cannot become a TPM key" in pk["detail"]
    assert "tpmid provision" in pk["remedy"] and "--adopt" in pk["remedy"]
    # The walkthrough's placeholders are not taken for URLs.
    url = _finding(r, "provisioning.attestation.identity_cert.url")
    assert url["status"] == "not mapped" and "placeholder" in url["detail"]
    assert any("identities.ldevid.est.url" in a for a in r["actions"])


def test_basic_auth_names_a_password_file_and_never_copies_the_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tpmid.yaml"
    rc, r = _import(tmp_path, capsys, BASIC, "--out", str(out), "--secrets-dir",
                    str(tmp_path / "secrets"))
    assert rc == 0, r["findings"]
    basic = r["config"]["identities"]["ldevid"]["est"]["auth"]["basic"]
    assert basic == {"username": "estuser",
                     "password": {"file": str(tmp_path / "secrets" / "est-password")}}
    assert "s3cret-est-password" not in out.read_text()
    assert "s3cret-est-password" not in json.dumps(r)
    assert any("est-password" in a for a in r["actions"])
    # The Edge CA authenticates with the LDevID, as IoT Edge's does after the first issuance.
    assert r["config"]["identities"]["edge-ca"]["est"]["auth"]["client"] == "ldevid"
    assert "idevid" not in r["config"]["identities"]


def test_one_default_url_serves_every_certificate_and_bootstrap_keys_become_the_idevid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, r = _import(tmp_path, capsys, ONE_URL)
    ids = r["config"]["identities"]
    assert ids["ldevid"]["est"]["url"] == ids["edge-ca"]["est"]["url"] == \
        "https://est.example.org/.well-known/est"
    assert ids["ldevid"]["est"]["auth"] == {"client": "idevid"}
    assert _finding(r, "cert_issuance.est.urls.default")["status"] == "mapped"
    pk = _finding(r, "cert_issuance.est.auth.bootstrap_identity_pk")
    assert pk["status"] == "not mapped" and "tpmid provision" in pk["remedy"]
    assert rc == 1


def test_without_an_edge_ca_only_the_ldevid_is_made_and_iot_edge_units_are_converted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, r = _import(tmp_path, capsys, NO_EDGE_CA)
    ids = r["config"]["identities"]
    assert set(ids) == {"ldevid"}
    # Manual provisioning: the device id is IoT Edge's default common name.
    assert ids["ldevid"]["subject"]["cn"] == "dev-3"
    assert ids["ldevid"]["renew"] == {"threshold": "10d", "retry": "30min", "rotate_key": False}
    assert _finding(r, "provisioning.device_id")["status"] == "mapped"
    assert _finding(r, "provisioning.iothub_hostname")["status"] == "not mapped"
    assert rc == 1


def test_pkcs11_uris_into_tpm2_pkcs11_keep_their_token_and_no_pin_is_copied(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, r = _import(tmp_path, capsys, PKCS11)
    p11 = r["config"]["pkcs11"]
    assert p11["token"] == "edge"
    assert p11["library"] == "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
    assert p11["user_pin"] == {"file": "/etc/tpmid/pkcs11-user-pin"}
    assert "1234" not in json.dumps(r["config"])
    assert _finding(r, "aziot_keys.pkcs11_base_slot")["status"] == "mapped"
    pk = _finding(r, "cert_issuance.est.auth.identity_pk")
    assert pk["status"] == "not mapped" and "kept" in pk["detail"] and "TPM object" in \
        pk["detail"]
    assert rc == 1


def test_a_pkcs11_library_that_is_not_tpm2_pkcs11_is_not_mapped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = PKCS11.replace("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
                          "/usr/lib/softhsm/libsofthsm2.so")
    rc, r = _import(tmp_path, capsys, text)
    f = _finding(r, "aziot_keys.pkcs11_lib_path")
    assert f["status"] == "not mapped" and "not tpm2-pkcs11" in f["detail"]
    assert r["config"]["pkcs11"]["token"] == "tpmid"  # tpmid's own token instead
    assert rc == 1


def test_unknown_sections_and_keys_are_listed_with_their_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, r = _import(tmp_path, capsys, UNKNOWN)
    assert rc == 1
    assert "unknown to tpmid" in _finding(r, "frobnicator.speed")["detail"]
    assert "IoT Edge's own" in _finding(r, "agent.config.image")["detail"]
    assert "IoT Edge's own" in _finding(r, "hostname")["detail"]
    assert _finding(r, "provisioning.attestation.identity_cert.colour")["status"] == \
        "not mapped"
    assert "lifetime" in _finding(r, "edge_ca.expiry_days")["detail"]
    assert _finding(r, "frobnicator.speed")["line"] == 15


def test_a_clean_file_exits_0_and_no_pkcs11_leaves_the_section_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, r = _import(tmp_path, capsys, CLEAN)
    assert rc == 0 and r["clean"]
    assert r["config"]["identities"]["ldevid"]["renew"]["rotate_key"] is True
    rc, r = _import(tmp_path, capsys, CLEAN, "--no-pkcs11")
    assert rc == 0 and "pkcs11" not in r["config"]


def test_a_malformed_file_exits_2_naming_the_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "config.toml"
    src.write_text('[edge_ca]\nmethod = "est"\nurl = https://no-quotes\n')
    rc, out, err = _run(capsys, str(src))
    assert rc == 2 and out == ""
    assert "line 3" in err and "not valid TOML" in err and "Traceback" not in err
    rc, out, err = _run(capsys, str(tmp_path / "missing.toml"))
    assert rc == 2 and "does not exist" in err


def test_out_writes_a_private_config_and_keeps_an_existing_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "config.toml"
    src.write_text(CLEAN)
    out = tmp_path / "tpmid.yaml"
    rc, stdout, _ = _run(capsys, str(src), "--out", str(out))
    assert rc == 0 and "every key was mapped" in stdout and str(out) in stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    parse_config(yaml.safe_load(out.read_text()), str(out))
    out.write_text("# the operator's own config\n")
    rc, _, err = _run(capsys, str(src), "--out", str(out))
    assert rc == 2 and "left as it is" in err
    assert out.read_text() == "# the operator's own config\n"
    rc, _, _ = _run(capsys, str(src), "--out", str(out), "--force")
    assert rc == 0 and "ldevid" in out.read_text()


def test_without_out_the_config_goes_to_stdout_and_the_report_to_stderr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "config.toml"
    src.write_text(WALKTHROUGH)
    rc, out, err = _run(capsys, str(src))
    assert rc == 1
    assert yaml.safe_load(out)["identities"]["ldevid"]["subject"]["cn"] == "my-device-id"
    assert "NOT MAPPED" in err and "line 14" in err and "identity_pk" in err


@pytest.mark.parametrize(("value", "expected"), [
    ("80%", "80%"), ("4%", "4%"), ("10m", "10min"), ("4d", "4d"), (" 7d ", "7d"),
    ("101%", None), ("10h", None), ("eighty", None), (80, None)])
def test_iot_edge_amounts(value: object, expected: str | None) -> None:
    assert parse_amount(value) == expected


def test_the_import_is_pure_and_reports_lines_for_dotted_and_inline_keys() -> None:
    r = import_aziot(NO_EDGE_CA, "x.toml")
    lines = {f.key: f.line for f in r.findings}
    assert lines["provisioning.authentication.identity_cert.auto_renew.threshold"] == 13
    assert lines["provisioning.device_id"] == 7


@pytest.mark.parametrize("sub", ["import", "export"])
def test_help_describes_each_command(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["aziot", sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out and "--out" in out
