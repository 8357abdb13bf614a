"""``tpmid enroll NAME --serverkeygen``: the EST server makes the key, the TPM keeps it.

RFC 7030 §4.4 server-side key generation against the reference server (a real
process), a swtpm and the CLI: the private key that comes back is imported into the
TPM (TPM2_Import under the storage root key) and becomes an ordinary TSS2 key file,
which signs through tpmid's TLS shim and through OpenSSL's tpm2 provider. The
plaintext key must never reach a file or a log: the test records what the server
sent (a wrapper around the real multipart parser that only remembers its result) and
greps the store, the server directory, every log and the temporary directories for it.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey

from tests.est.test_client_support import SECRET_ENV, transient_handles
from tpmid.cli import main
from tpmid.est import messages
from tpmid.testing.estserver import RunningEstServer
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import create_persistent_idevid
from tpmid.tpm.keyfile import load_key_file

ALGS = {"ecc-p256": "sha256", "ecc-p384": "sha384", "rsa-2048": "sha256"}


class Device:
    """A swtpm, a config file and a reference server whose ldevid label makes ``alg`` keys."""

    def __init__(self, swtpm: Swtpm, server: RunningEstServer, tmp: Path) -> None:
        self.swtpm = swtpm
        self.server = server
        self.tmp = tmp
        self.store = tmp / "store"
        self.data: dict[str, Any] = {
            "tpm": {"tcti": swtpm.tcti},
            "store": {"dir": str(self.store)},
            "trust": {"est_anchors": [str(server.tls_ca)]},
            "identities": {
                "idevid": {
                    "key": {"kind": "persistent", "template": "H-2"},
                    "subject": {"cn": "IDevID", "serial_number": "SKG-0001"},
                    "est": {"url": server.url("idevid"),
                            "auth": {"headers": {"Secret-Value": {"env": SECRET_ENV}}}},
                },
                "ldevid": {
                    "key": {"kind": "file", "alg": "ecc-p256"},
                    "subject": {"cn": "keygen-device", "serial_number": "SKG-0001"},
                    "est": {"url": server.url("ldevid"), "auth": {"client": "idevid"}},
                },
            },
        }
        self.config = tmp / "config.yaml"
        self.write()

    def write(self) -> None:
        self.config.write_text(yaml.safe_dump(self.data))
        self.config.chmod(0o600)

    def ldevid_est(self, **settings: Any) -> None:
        self.data["identities"]["ldevid"]["est"].update(settings)
        self.write()

    def tpmid(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])


@pytest.fixture
def device(swtpm: Swtpm, est_server_factory: Callable[..., RunningEstServer], tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Device]:
    alg = getattr(request, "param", "ecc-p256")
    server = est_server_factory(process=True, config=lambda d: d["labels"]["ldevid"].update(
        serverkeygen_alg=alg))
    with TpmConnection(swtpm.tcti) as tpm:
        create_persistent_idevid(tpm, "H-2")
    monkeypatch.delenv("TPMID_TCTI", raising=False)
    monkeypatch.delenv("TPMID_CONFIG", raising=False)
    monkeypatch.setenv(SECRET_ENV, server.secret)
    yield Device(swtpm, server, tmp_path)


@pytest.fixture
def sent_keys(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The private keys the server sent, as the client parsed them (the real parser runs)."""
    seen: list[bytes] = []
    real = messages.parse_serverkeygen

    def recording(body: bytes, content_type: str) -> tuple[bytes, list[x509.Certificate]]:
        key_der, certs = real(body, content_type)
        seen.append(key_der)
        return key_der, certs

    monkeypatch.setattr(messages, "parse_serverkeygen", recording)
    return seen


def _forms(key_der: bytes) -> dict[str, bytes]:
    """Every form in which the plaintext key could have been written down."""
    key = serialization.load_der_private_key(key_der, None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        secret = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8,
                                                              "big")
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        secret = key.private_numbers().p.to_bytes(128, "big")
    b64 = base64.b64encode(key_der)
    return {
        "DER": key_der, "base64": b64[16:76], "secret scalar/prime": secret,
        "secret hex": secret.hex().encode(), "secret base64": base64.b64encode(secret)[4:40],
        "PEM": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).splitlines()[2],
    }


def _files_to_search(device: Device, started: float) -> Iterator[Path]:
    roots = [device.tmp, device.server.dir]
    for root in roots:
        yield from (p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    # The system temporary directory: whatever was written there during the test.
    # os.walk, not rglob: other tests (other workers) remove their directories while
    # this walks, and os.walk skips a directory that vanished.
    for dirpath, _dirs, names in os.walk(tempfile.gettempdir()):
        for name in names:
            entry = Path(dirpath, name)
            try:
                st = entry.lstat()
            except OSError:
                continue  # another process's file, gone or unreadable
            if stat.S_ISREG(st.st_mode) and st.st_mtime >= started and st.st_size < (4 << 20):
                yield entry


def _assert_nowhere(forms: dict[str, bytes], files: Iterator[Path], texts: dict[str, str]) -> None:
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for what, needle in forms.items():
            assert needle not in data, f"the plaintext key ({what}) is in {path}"
    for where, text in texts.items():
        for what, needle in forms.items():
            assert needle.decode("latin-1") not in text, f"the plaintext key ({what}) is in {where}"


def _sign_with_openssl(device: Device, key_file: Path, digest: str) -> bytes:
    msg = device.tmp / "message"
    msg.write_bytes(b"signed by a server-generated key inside the TPM")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TPM2OPENSSL_TCTI": device.swtpm.tcti}
    proc = subprocess.run(
        ["openssl", "pkeyutl", "-sign", "-provider", "tpm2", "-provider", "default",
         "-inkey", str(key_file), "-rawin", "-digest", digest, "-in", str(msg)],
        env=env, capture_output=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("device", ALGS, indirect=True, ids=str)
def test_serverkeygen_imports_the_key_into_the_tpm_and_never_writes_it_down(
    device: Device, sent_keys: list[bytes], capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest,
) -> None:
    started = time.time() - 1
    alg = request.node.callspec.params["device"]
    assert device.tpmid("-vv", "enroll", "idevid") == 0
    out0 = capsys.readouterr()
    assert device.tpmid("-vv", "enroll", "ldevid", "--serverkeygen", "--json") == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    (key_der,) = sent_keys
    server_key = serialization.load_der_private_key(key_der, None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    cert = x509.load_pem_x509_certificate(Path(data["cert_path"]).read_bytes())
    assert cert.public_key().public_bytes(*spki) == server_key.public_key().public_bytes(*spki)
    assert data["key_origin"] == "server-generated"
    assert device.server.issued()[-1]["operation"] == "serverkeygen"

    # A TSS2 key file of this TPM, for exactly the certified key, which says it was imported.
    key_file = Path(data["key_path"])
    assert key_file.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    attrs = TSSPrivKey.from_pem(key_file.read_bytes()).public.publicArea.objectAttributes
    assert not attrs & (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                        | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.DECRYPT)
    with TpmConnection(device.swtpm.tcti) as tpm, \
            load_key_file(tpm, key_file.read_bytes()) as loaded:
        assert loaded.public_key_der() == cert.public_key().public_bytes(*spki)
        assert loaded.server_generated and loaded.alg == alg

    # It signs through OpenSSL's tpm2 provider ...
    digest = ALGS[alg]
    signature = _sign_with_openssl(device, key_file, digest)
    message = (device.tmp / "message").read_bytes()
    h = hashes.SHA256() if digest == "sha256" else hashes.SHA384()
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, message, ec.ECDSA(h))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, message, padding.PKCS1v15(), h)

    # ... and through tpmid's TLS shim: the re-enrollment authenticates with it.
    assert device.tpmid("-vv", "enroll", "ldevid", "--reenroll") == 0
    out2 = capsys.readouterr()
    log = (device.server.dir / "run.log").read_text()
    assert ("POST /.well-known/est/ldevid/simplereenroll label=ldevid status=200 "
            "client=serialNumber=SKG-0001,CN=keygen-device") in log

    # status says where the key came from (the version that was server-generated).
    assert transient_handles(device.swtpm.tcti) == []
    _assert_nowhere(_forms(key_der), _files_to_search(device, started),
                    {"tpmid's output": out0.err + out.out + out.err + out2.out + out2.err,
                     "the captured log": caplog.text})


def test_status_says_the_key_was_server_generated_and_renewals_keep_doing_it(
    device: Device, sent_keys: list[bytes], capsys: pytest.CaptureFixture[str],
) -> None:
    device.ldevid_est(serverkeygen=True)  # est.serverkeygen: renewals use it too
    assert device.tpmid("enroll", "idevid") == 0
    assert device.tpmid("enroll", "ldevid") == 0
    capsys.readouterr()
    assert device.tpmid("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    ldevid = next(i for i in status["identities"] if i["name"] == "ldevid")
    assert ldevid["key"]["origin"] == "server-generated"
    assert "server-generated (made by the EST server, imported into the TPM" \
        in ldevid["key"]["description"]
    assert device.tpmid("renew", "ldevid", "--force") == 0
    operations = [r["operation"] for r in device.server.issued() if r["label"] == "ldevid"]
    assert operations == ["serverkeygen", "serverkeygen"]
    assert len(sent_keys) == 2 and sent_keys[0] != sent_keys[1]
    assert transient_handles(device.swtpm.tcti) == []


REFUSALS = {
    "a persistent IDevID": (["enroll", "idevid", "--serverkeygen"], None,
                            "cannot take a server-generated key"),
    "a hardwareModuleName": (["enroll", "ldevid", "--serverkeygen"],
                             {"hardware_module_name": True},
                             "cannot carry a hardwareModuleName"),
}


@pytest.mark.parametrize(("args", "san", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_serverkeygen_is_refused_where_it_cannot_be_honest(
    device: Device, capsys: pytest.CaptureFixture[str], args: list[str],
    san: dict[str, Any] | None, message: str,
) -> None:
    if san is not None:
        device.data["identities"]["ldevid"]["san"] = san
        device.write()
    assert device.tpmid(*args) == 2
    assert message in capsys.readouterr().err
    assert device.server.issued() == []
