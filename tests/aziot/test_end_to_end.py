"""From IoT Edge's own EST client to tpmid and back to IoT Edge, on a real swtpm and EST server.

The walkthrough's config.toml (tests/data/aziot-config.toml; its placeholder URLs
and its demo root replaced by the reference server's) is imported; the tpmid
config it becomes enrolls the LDevID and the Edge CA with the provisioned TPM
IDevID. ``tpmid aziot export`` then writes the IoT Edge fragment that uses them:
it parses with ``tomllib``, every file it names exists, and every PKCS#11 URI
names a key in the token that OpenSC's ``pkcs11-tool`` finds and signs with.
The renewal hook of docs/iot-edge.md runs after a renewal, with ``iotedge``
replaced by a stand-in that records how it was called.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.pkcs11.conftest import MODULE, SO_PIN, USER_PIN, needs_tools, verify_ecdsa
from tpmid.cli import main
from tpmid.pkcs11.uri import parse_pkcs11_uri
from tpmid.store import Store

pytestmark = [needs_tools, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WALKTHROUGH = REPO / "tests" / "data" / "aziot-config.toml"
DOC = REPO / "docs" / "iot-edge.md"
SERIAL = "FIELD-0001"  # the field device's IDevID serialNumber


class Migrated:
    """The field device after ``tpmid aziot import`` (see the module docstring)."""

    def __init__(self, field: Any, capsys: pytest.CaptureFixture[str]) -> None:
        self.field = field
        self.capsys = capsys
        self.dir: Path = field.dir
        self.config = self.dir / "imported.yaml"
        self.secrets = self.dir / "secrets"
        self.report: dict[str, Any] = {}

    def tpmid(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = main(["--config", str(self.config), "--tcti", self.field.sim.tcti, *args])
        out, err = self.capsys.readouterr()
        return rc, out, err

    @property
    def data(self) -> dict[str, Any]:
        return dict(yaml.safe_load(self.config.read_text()))

    def edit(self, data: dict[str, Any]) -> None:
        self.config.write_text(yaml.safe_dump(data, sort_keys=False))


def _walkthrough_for(field: Any) -> str:
    """The walkthrough's config with its placeholders replaced by the reference server's."""
    text = WALKTHROUGH.read_text()
    for placeholder, value in (
            ("https://<YOUR-LDEVID-ENDPOINT>", field.server.url("ldevid")),
            ("https://<YOUR-EDGE-CA-ENDPOINT>", field.server.url("edgeca")),
            ("/var/aziot/certs/globalsign-root.cert.pem", str(field.server.tls_ca))):
        assert placeholder in text
        text = text.replace(placeholder, value)
    return text


@pytest.fixture
def migrated(field_device: Any, capsys: pytest.CaptureFixture[str]) -> Migrated:
    # A provisioned IDevID: its certificate from the manufacturer's EST label.
    rc, _, err = field_device.cli("enroll", "idevid")
    assert rc == 0, err
    m = Migrated(field_device, capsys)
    src = m.dir / "config.toml"
    src.write_text(_walkthrough_for(field_device))
    capsys.readouterr()
    rc = main(["aziot", "import", str(src), "--out", str(m.config), "--serial", SERIAL,
               "--store", str(field_device.store_dir), "--secrets-dir", str(m.secrets),
               "--json"])
    m.report = json.loads(capsys.readouterr().out)
    assert rc == 1  # the DPS section and the software IDevID key are not mapped
    m.secrets.mkdir(mode=0o700)
    for name, pin in (("pkcs11-user-pin", USER_PIN), ("pkcs11-so-pin", SO_PIN)):
        (m.secrets / name).write_text(pin + "\n")
        (m.secrets / name).chmod(0o600)
    return m


def test_the_walkthrough_config_imports_and_enrolls_the_ldevid_and_the_edge_ca(
        migrated: Migrated) -> None:
    report = migrated.report
    not_mapped = {f["key"]: f for f in report["findings"] if f["status"] == "not mapped"}
    assert {"provisioning.source", "provisioning.id_scope", "provisioning.global_endpoint",
            "provisioning.attestation.method",
            "provisioning.attestation.registration_id"} <= set(not_mapped)
    pk = not_mapped["cert_issuance.est.auth.identity_pk"]
    assert "cannot become a TPM key" in pk["detail"] and "tpmid provision" in pk["remedy"]
    # Nothing else was left behind: the URLs and the anchor were mapped.
    assert set(not_mapped) == {"provisioning.source", "provisioning.global_endpoint",
                               "provisioning.id_scope", "provisioning.attestation.method",
                               "provisioning.attestation.registration_id",
                               "cert_issuance.est.auth.identity_cert",
                               "cert_issuance.est.auth.identity_pk"}
    assert stat.S_IMODE(migrated.config.stat().st_mode) == 0o600

    for name in ("ldevid", "edge-ca"):
        rc, out, err = migrated.tpmid("enroll", name)
        assert rc == 0, err
    store = Store(migrated.field.store_dir)
    ldevid, edge = store.current("ldevid"), store.current("edge-ca")
    assert ldevid is not None and edge is not None
    assert _subject(ldevid.cert) == {"CN": "my-device-id", "serialNumber": SERIAL}
    # [edge_ca] names no common_name: tpmid asked for IoT Edge's default.
    assert _subject(edge.cert) == {"CN": "aziot-edge CA", "serialNumber": SERIAL}
    rc, out, err = migrated.tpmid("pkcs11", "list", "--json")
    assert rc == 0, out + err
    assert [e["identity"] for e in json.loads(out)] == ["ldevid", "edge-ca"]


def _subject(cert: x509.Certificate) -> dict[str, str]:
    names = {NameOID.COMMON_NAME: "CN", NameOID.SERIAL_NUMBER: "serialNumber"}
    return {names[a.oid]: str(a.value) for a in cert.subject}


def _pkcs11_tool(env: dict[str, str], token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pkcs11-tool", "--module", str(MODULE), "--token-label", token,
         "--login", "--pin", "env:EXPORT_TEST_PIN", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False)


def _export(m: Migrated, out: Path) -> tuple[dict[str, Any], str]:
    rc, stdout, err = m.tpmid("aziot", "export", "--out", str(out), "--json")
    assert rc == 0, err
    return json.loads(stdout), out.read_text()


def test_the_export_names_only_files_and_token_objects_that_exist(migrated: Migrated) -> None:
    for name in ("ldevid", "edge-ca"):
        rc, _, err = migrated.tpmid("enroll", name)
        assert rc == 0, err
    out = migrated.dir / "aziot-export.toml"
    report, text = _export(migrated, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert report["mode"] == "0600" and report["root_owned"] == (out.stat().st_uid == 0)
    assert USER_PIN not in json.dumps(report)  # the report never shows the PIN
    doc = tomllib.loads(text)
    att, edge, keys = doc["provisioning"]["attestation"], doc["edge_ca"], doc["aziot_keys"]
    assert att["method"] == "x509" and att["registration_id"] == "my-device-id"
    assert Path(keys["pkcs11_lib_path"]).is_file()

    # Every file:// URI names a file that exists: the fullchain behind the current link.
    store = Store(migrated.field.store_dir)
    for uri, name in ((att["identity_cert"], "ldevid"), (edge["cert"], "edge-ca")):
        path = Path(unquote(urlparse(uri).path))
        assert uri.startswith("file:///") and path.is_file(), uri
        assert path == store.current_dir(name) / "fullchain.pem"
        current = store.current(name)
        assert current is not None and current.fullchain_path is not None
        assert path.read_bytes() == current.fullchain_path.read_bytes()

    # Every pkcs11: URI names the token (and a key in it), with the user PIN IoT Edge needs.
    env = {"PATH": os.environ["PATH"], "TSS2_LOG": "all+none", "TPM2_PKCS11_LOG_LEVEL": "0",
           **report["environment"], "EXPORT_TEST_PIN": USER_PIN}
    assert env["TPM2_PKCS11_TCTI"] == migrated.field.sim.tcti
    base = parse_pkcs11_uri(keys["pkcs11_base_slot"])
    assert base == {"token": "tpmid", "pin-value": USER_PIN}
    for uri, name in ((att["identity_pk"], "ldevid"), (edge["pk"], "edge-ca")):
        attrs = parse_pkcs11_uri(uri)
        assert attrs["pin-value"] == USER_PIN and attrs["type"] == "private"
        listing = _pkcs11_tool(env, attrs["token"], "--list-objects", "--type", "privkey")
        assert listing.returncode == 0, listing.stderr
        found = re.search(rf"label:\s+{re.escape(attrs['object'])}\n(?:.*\n)*?\s+ID:\s+(\w+)",
                          listing.stdout)
        assert found, listing.stdout
        # ... and it is the key of the certificate the fragment names: it signs for it
        # (pkcs11-tool picks the key to sign with by its ID, not its label).
        digest = hashlib.sha256(f"IoT Edge signs with {name}".encode()).digest()
        (migrated.dir / "digest.bin").write_bytes(digest)
        sig = _pkcs11_tool(env, attrs["token"], "--sign", "--mechanism", "ECDSA",
                           "--id", found.group(1), "--input-file",
                           str(migrated.dir / "digest.bin"), "--output-file",
                           str(migrated.dir / "sig.bin"))
        assert sig.returncode == 0, sig.stderr
        current = store.current(name)
        assert current is not None
        verify_ecdsa(current.cert, (migrated.dir / "sig.bin").read_bytes(), digest)

    # Exporting again replaces the file this command wrote, but not somebody else's.
    assert _export(migrated, out)[1] == text
    theirs = migrated.dir / "config.toml"
    before = theirs.read_text()
    rc, _, err = migrated.tpmid("aziot", "export", "--out", str(theirs))
    assert rc == 2 and "left as it is" in err and theirs.read_text() == before


def test_export_refuses_before_enrollment_and_without_a_pkcs11_section(
        migrated: Migrated) -> None:
    out = migrated.dir / "aziot-export.toml"
    rc, _, err = migrated.tpmid("aziot", "export", "--out", str(out))
    assert rc == 7 and "has no certificate yet" in err and "tpmid enroll ldevid" in err
    assert not out.exists()
    data = migrated.data
    del data["pkcs11"]
    migrated.edit(data)
    rc, _, err = migrated.tpmid("aziot", "export", "--out", str(out))
    assert rc == 2 and "no pkcs11 section" in err and not out.exists()


def _doc_block(marker: str) -> str:
    m = re.search(rf"<!-- {re.escape(marker)} -->\s*\n```\w*\n(.*?)\n```", DOC.read_text(), re.S)
    assert m, f"docs/iot-edge.md has no block marked {marker}"
    return m.group(1)


def test_the_documented_renewal_hook_reapplies_iot_edge_with_the_renewed_identity(
        migrated: Migrated) -> None:
    for name in ("ldevid", "edge-ca"):
        rc, _, err = migrated.tpmid("enroll", name)
        assert rc == 0, err
    # Stand-in for iotedge: records its arguments and the TPMID_* variables it was given.
    record = migrated.dir / "iotedge-calls.jsonl"
    stand_in = migrated.dir / "iotedge"
    stand_in.write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in "
        "os.environ.items() if k.startswith('TPMID_')}}) + '\\n')\n")
    stand_in.chmod(0o755)
    script_text = _doc_block("iot-edge-hook: script")
    assert "sudo -n /usr/bin/iotedge config apply" in script_text
    hook = migrated.dir / "tpmid-iotedge-apply"
    hook.write_text(script_text.replace("sudo -n /usr/bin/iotedge", str(stand_in)))
    hook.chmod(0o755)
    hooks_doc = yaml.safe_load(_doc_block("iot-edge-hook: config"))
    data = migrated.data
    for name, ident in hooks_doc["identities"].items():
        argv = [str(hook) if a == "/usr/local/sbin/tpmid-iotedge-apply" else a
                for a in ident["hooks"]["after_renew"]]
        assert argv == [str(hook)]
        data["identities"][name]["hooks"] = {**ident["hooks"], "after_renew": argv}
    migrated.edit(data)

    rc, _, err = migrated.tpmid("renew", "ldevid", "--force")
    assert rc == 0, err
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    store = Store(migrated.field.store_dir)
    current = store.current("ldevid")
    assert current is not None
    assert len(calls) == 1 and calls[0]["argv"] == ["config", "apply"]
    env = calls[0]["env"]
    assert env["TPMID_IDENTITY"] == "ldevid" and env["TPMID_VERSION"] == current.version
    assert Path(env["TPMID_FULLCHAIN"]).read_bytes() == \
        (store.current_dir("ldevid") / "fullchain.pem").read_bytes()
    assert Path(env["TPMID_CERT"]).is_file() and Path(env["TPMID_KEY"]).is_file()
    # The exported fragment names the renewed certificate and key without a change.
    rc, out, err = migrated.tpmid("pkcs11", "list", "--json")
    assert rc == 0, err
    assert next(e for e in json.loads(out) if e["identity"] == "ldevid")["version"] == \
        current.version


KEY_SERVICE_GID = 4242  # the store's group (tpmid's) in the test below; any unused gid


@pytest.mark.skipif(os.geteuid() != 0, reason="runs pkcs11-tool as another user (setpriv)")
def test_a_member_of_the_store_group_signs_with_the_ldevid_as_iot_edges_key_service_would(
        migrated: Migrated) -> None:
    rc, _, err = migrated.tpmid("enroll", "ldevid")
    assert rc == 0, err
    store = migrated.field.store_dir / "pkcs11"
    db = store / "tpm2_pkcs11.sqlite3"
    # What tpmid made: the group may create tpm2-pkcs11's lock file, and only read the database.
    assert stat.S_IMODE(store.stat().st_mode) == 0o770
    assert stat.S_IMODE(db.stat().st_mode) & 0o077 == 0o040
    # pytest's directories are root's alone (0700), so the store is copied, modes and all,
    # into a directory anybody may pass through; its files belong to root and the group.
    base = Path(tempfile.mkdtemp(prefix="tpmid-aziot-"))
    try:
        base.chmod(0o755)
        copy = base / "pkcs11"
        shutil.copytree(store, copy)
        for p in (copy, *copy.iterdir()):
            os.chown(p, 0, KEY_SERVICE_GID)
        digest = hashlib.sha256(b"aziot-keyd signs").digest()
        (base / "digest.bin").write_bytes(digest)
        (base / "digest.bin").chmod(0o644)
        (base / "out").mkdir()
        (base / "out").chmod(0o777)
        entry = next(e for e in json.loads(migrated.tpmid("pkcs11", "list", "--json")[1])
                     if e["identity"] == "ldevid")
        env = {"PATH": os.environ["PATH"], "TSS2_LOG": "all+none",
               "TPM2_PKCS11_LOG_LEVEL": "0", "TPM2_PKCS11_STORE": str(copy),
               "TPM2_PKCS11_TCTI": migrated.field.sim.tcti, "EXPORT_TEST_PIN": USER_PIN,
               "HOME": str(base)}
        proc = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--groups",
             str(KEY_SERVICE_GID), "pkcs11-tool", "--module", str(MODULE), "--token-label",
             "tpmid", "--login", "--pin", "env:EXPORT_TEST_PIN", "--sign", "--mechanism",
             "ECDSA", "--id", entry["id"], "--input-file", str(base / "digest.bin"),
             "--output-file", str(base / "out" / "sig.bin")],
            env=env, capture_output=True, timeout=60, check=False)
        signature = (base / "out" / "sig.bin").read_bytes() if proc.returncode == 0 else b""
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr.decode()
    current = Store(migrated.field.store_dir).current("ldevid")
    assert current is not None
    verify_ecdsa(current.cert, signature, digest)
