"""A field device whose LDevID and Edge CA keys are also PKCS#11 objects (tpm2-pkcs11).

:class:`P11Field` is the :class:`tests.faults.conftest.Field` device (real swtpm,
reference EST server, idevid/ldevid/edge-ca) with a top-level ``pkcs11`` section:
a tpm2-pkcs11 store in the test's directory, token ``tpmid``, PINs from the
environment. Everything the consumers here use is real and nobody here wrote
it: tpm2-pkcs11's library, OpenSC's ``pkcs11-tool``, OpenSSL with its pkcs11
engine (libp11), curl, p11-kit. They reach the same swtpm through
``TPM2_PKCS11_TCTI`` and find the store through ``TPM2_PKCS11_STORE``.

Two things about the consumers, both outside tpmid:

* OpenSSL's ``-engine``/curl's ``--engine`` make libp11 the default for every
  EVP operation of their process. tpm2-pkcs11 loaded into that same process
  then fails to open its salted session with the (ECC) token primary: tss2-esys
  generates its ephemeral ECDH key through OpenSSL, which hands it to libp11
  ("iesys_cryptossl_get_ecdh_point: Get ephemeral key"). So engine-based
  consumers here reach the module through ``p11-kit server`` (the module in its
  own process, as a real deployment may well run it) and p11-kit's client
  module (:meth:`P11Field.p11kit`);
* libp11 never calls C_Finalize, so the objects and sessions tpm2-pkcs11 made
  stay in the TPM when the consumer exits. ``/dev/tpmrm0`` would flush them with
  the closed file; swtpm has no resource manager, so the tests flush them after
  each such consumer (:meth:`P11Field.flush_tpm`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from tests.faults.conftest import Field, field, field_device  # noqa: F401  (fixtures)

MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so")
CLIENT_MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")
USER_PIN_ENV = "TPMID_TEST_P11_PIN"
SO_PIN_ENV = "TPMID_TEST_P11_SO_PIN"
USER_PIN = "user-1234"
SO_PIN = "so-5678"

needs_tools = pytest.mark.skipif(
    not (MODULE.exists() and ENGINE.exists() and CLIENT_MODULE.exists()
         and shutil.which("pkcs11-tool") and shutil.which("tpm2_ptool")
         and shutil.which("p11-kit") and shutil.which("tpm2_flushcontext")),
    reason="needs libtpm2-pkcs11-1, libtpm2-pkcs11-tools, opensc and libengine-pkcs11-openssl "
    "(scripts/setup installs them)")


@dataclass
class P11Field(Field):
    """A :class:`Field` with its keys linked into a tpm2-pkcs11 token."""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, USER_PIN_ENV: USER_PIN, SO_PIN_ENV: SO_PIN}

    @property
    def p11_store(self) -> Path:
        return self.dir / "pkcs11"

    def consumer_env(self, **extra: str) -> dict[str, str]:
        """What a PKCS#11 consumer needs to find the token (and nothing of tpmid's)."""
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "TPM2_PKCS11_STORE": str(self.p11_store),
                "TPM2_PKCS11_TCTI": self.sim.tcti,
                "TPM2_PKCS11_LOG_LEVEL": "0", "TSS2_LOG": "all+none", **extra}

    def listing(self) -> list[dict[str, Any]]:
        rc, out, err = self.cli("pkcs11", "list", "--json")
        assert rc in (0, 1), err
        return list(json.loads(out))

    def entry(self, name: str) -> dict[str, Any]:
        return next(e for e in self.listing() if e["identity"] == name)

    def pkcs11_tool(self, *args: str, pin: bool = False) -> subprocess.CompletedProcess[str]:
        """OpenSC's pkcs11-tool on the token (the PIN from the environment, not argv)."""
        extra = ["--login", "--pin", f"env:{USER_PIN_ENV}"] if pin else []
        return subprocess.run(
            ["pkcs11-tool", "--module", str(MODULE), "--token-label", "tpmid", *extra, *args],
            env=self.consumer_env(**{USER_PIN_ENV: USER_PIN}), capture_output=True, text=True,
            timeout=60, check=False)

    def flush_tpm(self) -> None:
        """Flush what a consumer that never called C_Finalize left in the TPM (no RM here)."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TPM2TOOLS_TCTI": self.sim.tcti,
               "TSS2_LOG": "all+none"}
        for what in ("-t", "-l", "-s"):
            subprocess.run(["tpm2_flushcontext", what], env=env, capture_output=True,
                           timeout=30, check=False)

    @contextlib.contextmanager
    def p11kit(self) -> Iterator[dict[str, str]]:
        """tpm2-pkcs11 in a ``p11-kit server``; yields the environment of an engine consumer.

        The consumer's OpenSSL loads libp11's engine with p11-kit's client module,
        which forwards every PKCS#11 call to the server's tpm2-pkcs11.
        """
        sock = self.dir / "p11kit.sock"
        conf = self.dir / "openssl-pkcs11.cnf"
        conf.write_text(
            "openssl_conf = openssl_init\n[openssl_init]\nengines = engine_section\n"
            "[engine_section]\npkcs11 = pkcs11_section\n[pkcs11_section]\n"
            f"engine_id = pkcs11\ndynamic_path = {ENGINE}\nMODULE_PATH = {CLIENT_MODULE}\n"
            "init = 0\n")
        server = subprocess.Popen(
            ["p11-kit", "server", "-f", "--provider", str(MODULE), "-n", str(sock),
             "pkcs11:token=tpmid"], env=self.consumer_env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "p11-kit server did not start"
                time.sleep(0.05)
            yield {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                   "P11_KIT_SERVER_ADDRESS": f"unix:path={sock}", "OPENSSL_CONF": str(conf)}
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            self.flush_tpm()


def enable_pkcs11(f: Field) -> None:
    """Add the top-level pkcs11 section to ``f``'s config."""
    f.edit(lambda d: d.update(pkcs11={
        "store": str(f.dir / "pkcs11"), "token": "tpmid",
        "user_pin": {"env": USER_PIN_ENV}, "so_pin": {"env": SO_PIN_ENV}}))


@pytest.fixture
def p11_device(field_device: Field) -> Iterator[P11Field]:  # noqa: F811
    """The field device with the pkcs11 section; nothing enrolled yet."""
    f = P11Field(field_device.sim, field_device.server, field_device.dir, field_device.data,
                 field_device.capsys)
    enable_pkcs11(f)
    yield f


@pytest.fixture
def p11(p11_device: P11Field) -> P11Field:
    """idevid, ldevid and edge-ca enrolled with ``tpmid enroll``: the keys are in the token."""
    for name in ("idevid", "ldevid", "edge-ca"):
        rc, out, err = p11_device.cli("enroll", name)
        assert rc == 0, err
    p11_device.remember()
    return p11_device


def verify_ecdsa(cert: x509.Certificate, signature: bytes, digest: bytes) -> None:
    """The raw (r||s) or DER ECDSA ``signature`` over ``digest`` verifies with ``cert``'s key."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    if len(signature) in (64, 96):  # PKCS#11 CKM_ECDSA: r || s
        half = len(signature) // 2
        signature = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                         int.from_bytes(signature[half:], "big"))
    h = hashes.SHA256() if public.curve.key_size == 256 else hashes.SHA384()
    public.verify(signature, digest, ec.ECDSA(Prehashed(h)))
