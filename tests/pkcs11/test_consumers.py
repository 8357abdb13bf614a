"""Consumers nobody here wrote use tpmid's TPM keys through PKCS#11 (tpm2-pkcs11).

OpenSC's ``pkcs11-tool`` signs with the LDevID and the Edge CA keys and the
signatures verify with the stored certificates; curl with OpenSSL's pkcs11
engine (libp11) completes mutual TLS with the LDevID against the reference EST
server; after ``tpmid renew ldevid --force`` the same URI signs with the new key.
The token's transient parent is tpmid's storage parent: the same key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.pkcs11.conftest import (
    USER_PIN,
    USER_PIN_ENV,
    P11Field,
    needs_tools,
    verify_ecdsa,
)
from tpmid.tpm.connection import TpmConnection

pytestmark = [needs_tools, pytest.mark.slow]


def _sign_with_pkcs11_tool(f: P11Field, pkcs11_id: str, digest: bytes) -> bytes:
    (f.dir / "digest.bin").write_bytes(digest)
    r = f.pkcs11_tool("--sign", "--mechanism", "ECDSA", "--id", pkcs11_id,
                      "--input-file", str(f.dir / "digest.bin"),
                      "--output-file", str(f.dir / "sig.bin"), pin=True)
    assert r.returncode == 0, r.stderr
    return (f.dir / "sig.bin").read_bytes()


def test_pkcs11_tool_lists_and_signs_with_the_ldevid_and_edge_ca_keys(p11: P11Field) -> None:
    listing = p11.pkcs11_tool("--list-objects", pin=True)
    assert listing.returncode == 0, listing.stderr
    for name in ("ldevid", "edge-ca"):
        # A private key, its public key and its certificate, all under the identity's label.
        assert listing.stdout.count(f"label:      {name}\n") == 3, listing.stdout
        entry = p11.entry(name)
        assert entry["in_step"] and entry["uri"] == f"pkcs11:token=tpmid;object={name};type=private"
        cur = p11.current(name)
        digest = hashlib.sha256(f"signed by {name} through PKCS#11".encode()).digest()
        verify_ecdsa(cur.cert, _sign_with_pkcs11_tool(p11, entry["id"], digest), digest)
        # The certificate object is the stored certificate.
        out = p11.dir / f"{name}.der"
        r = p11.pkcs11_tool("--read-object", "--type", "cert", "--id", entry["id"],
                            "--output-file", str(out))
        assert r.returncode == 0, r.stderr
        assert x509.load_der_x509_certificate(out.read_bytes()) == cur.cert


def test_the_idevid_is_not_in_the_token(p11: P11Field) -> None:
    assert [e["identity"] for e in p11.listing()] == ["ldevid", "edge-ca"]
    assert "idevid" not in p11.pkcs11_tool("--list-objects", pin=True).stdout


def _csr_pem(serial: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
        x509.NameAttribute(NameOID.COMMON_NAME, "curl through pkcs11")]))
        .sign(key, hashes.SHA256()))
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def _curl(f: P11Field, env: dict[str, str], *client: str) -> tuple[int, bytes]:
    body = f.dir / "csr.b64"
    body.write_bytes(_csr_pem("FIELD-0001"))
    url = f.server.url("ldevid", "simpleenroll")
    proc = subprocess.run(
        ["curl", "-sS", "--cacert", str(f.server.tls_ca), "-o", str(f.dir / "answer"),
         "-w", "%{http_code}", "-H", "Content-Type: application/pkcs10",
         "-H", "Content-Transfer-Encoding: base64", "--data-binary", f"@{body}", *client, url],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout), (f.dir / "answer").read_bytes()


def test_curl_completes_mutual_tls_with_the_ldevid_through_the_pkcs11_engine(
        p11: P11Field) -> None:
    cur = p11.current("ldevid")
    assert cur.fullchain_path is not None
    # curl takes the PIN in the key's URI only; it is in curl's argv here, in a test.
    uri = p11.entry("ldevid")["uri"] + f"?pin-value={USER_PIN}"
    with p11.p11kit() as env:
        # The label accepts only clients with a manufacturer or operator certificate.
        assert _curl(p11, env)[0] == 401
        status, answer = _curl(p11, env, "--engine", "pkcs11", "--key-type", "ENG",
                               "--key", uri, "--cert", str(cur.fullchain_path))
    assert status == 200, answer[:300]
    assert b"MII" in answer  # a base64 certs-only PKCS#7 with the issued certificate


def _sign_with_uri(f: P11Field, uri: str, digest: bytes) -> bytes:
    """OpenSSL (pkcs11 engine) signs ``digest`` with the key ``uri`` names; PIN from the env."""
    (f.dir / "digest.bin").write_bytes(digest)
    with f.p11kit() as env:
        proc = subprocess.run(
            ["openssl", "pkeyutl", "-sign", "-engine", "pkcs11", "-keyform", "engine",
             "-inkey", uri, "-passin", f"env:{USER_PIN_ENV}", "-in", str(f.dir / "digest.bin"),
             "-out", str(f.dir / "uri-sig.der")],
            env={**env, USER_PIN_ENV: USER_PIN}, capture_output=True, text=True, timeout=60,
            check=False)
    assert proc.returncode == 0, proc.stderr
    return (f.dir / "uri-sig.der").read_bytes()


def test_after_a_forced_renewal_the_same_uri_signs_with_the_new_key(p11: P11Field) -> None:
    uri = p11.entry("ldevid")["uri"]
    old = p11.current("ldevid")
    digest = hashlib.sha256(b"before and after").digest()
    verify_ecdsa(old.cert, _sign_with_uri(p11, uri, digest), digest)

    rc, out, err = p11.cli("renew", "ldevid", "--force")
    assert rc == 0, err

    new = p11.current("ldevid")
    assert new.version != old.version and new.cert.public_key() != old.cert.public_key()
    entry = p11.entry("ldevid")
    assert entry["uri"] == uri and entry["in_step"] and entry["version"] == new.version
    signature = _sign_with_uri(p11, uri, digest)
    verify_ecdsa(new.cert, signature, digest)
    with pytest.raises(Exception):  # noqa: B017  (cryptography's InvalidSignature)
        verify_ecdsa(old.cert, signature, digest)
    # Nothing waits under the staging label, and exactly one key pair has the label.
    listing = p11.pkcs11_tool("--list-objects", pin=True).stdout
    assert "ldevid.next" not in listing
    assert listing.count("label:      ldevid\n") == 3


TOOLING_PRIMARY = """
import sys, tempfile
from tpm2_pkcs11.tpm2 import Tpm2
from tpm2_pkcs11.utils import create_primary
with tempfile.TemporaryDirectory() as d:
    ctx = create_primary(Tpm2(d), "", "", sys.argv[1])
    print(ctx, flush=True)
    import subprocess
    subprocess.run(["tpm2_readpublic", "-c", ctx, "-f", "tss", "-o", sys.argv[2]], check=True,
                   capture_output=True)
"""


def test_the_tokens_transient_parent_is_tpmids_storage_parent(p11: P11Field) -> None:
    """tpm2-pkcs11 re-creates the token's primary from its template; it is the same key."""
    from tpmid.pkcs11.token import TokenStore, tooling_python

    view = TokenStore(p11.p11_store, "tpmid").view()
    assert view.token is not None
    assert view.token.primary_config == {"transient": True, "template-name": "tss2-engine-key"}
    # The primary as tpm2-pkcs11's own tooling makes it (tpm2-tools under the hood).
    out = p11.dir / "tooling-primary.pub"
    env = {"PATH": "/usr/bin:/bin", "TPM2TOOLS_TCTI": p11.sim.tcti, "TSS2_LOG": "all+none"}
    proc = subprocess.run([tooling_python(), "-c", TOOLING_PRIMARY,
                           view.token.primary_config["template-name"], str(out)],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    # tpm2-tools leaves what it made in the TPM (no resource manager here): flush it.
    subprocess.run(["tpm2_flushcontext", "-t"], env=env, capture_output=True, timeout=30,
                   check=False)
    assert proc.returncode == 0, proc.stderr
    with TpmConnection(p11.sim.tcti) as tpm:
        mine = tpm.storage_parent_public()
    # Same template and same seed: the same public area, unique (the public key) included.
    assert out.read_bytes() == mine


def test_list_json_maps_each_identity_to_its_uri(p11: P11Field) -> None:
    rc, out, err = p11.cli("pkcs11", "list", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [(r["identity"], r["label"], r["uri"], r["in_step"]) for r in rows] == [
        ("ldevid", "ldevid", "pkcs11:token=tpmid;object=ldevid;type=private", True),
        ("edge-ca", "edge-ca", "pkcs11:token=tpmid;object=edge-ca;type=private", True)]
    assert all(r["public_key"].startswith("public key SHA-256 ") for r in rows)
    rc, human, _ = p11.cli("pkcs11", "list")
    assert "ldevid: pkcs11:token=tpmid;object=ldevid;type=private" in human


def test_a_label_from_the_config_is_the_uris_object(p11_device: P11Field) -> None:
    p11_device.edit(lambda d: d["identities"]["ldevid"].update(pkcs11={"label": "device id"}))
    for name in ("idevid", "ldevid"):
        rc, _, err = p11_device.cli("enroll", name)
        assert rc == 0, err
    entry = p11_device.entry("ldevid")
    assert entry["uri"] == "pkcs11:token=tpmid;object=device%20id;type=private"
    assert entry["in_step"]


