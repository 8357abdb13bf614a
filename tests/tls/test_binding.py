"""TLS channel bindings (tpmid.tls.binding) checked against OpenSSL's command line.

`openssl s_server -keymatexport` prints the RFC 5705 exporter of its session; with the
RFC 9266 label and length it is the tls-exporter value the client must find.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tpmid.tls.binding import EXPORTER_LABEL, EXPORTER_LENGTH, channel_binding


def _server_files(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect(port: int, version: ssl.TLSVersion) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    deadline = time.monotonic() + 10
    while True:
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return ctx.wrap_socket(raw)


def test_tls_exporter_equals_what_openssl_s_server_exports_for_the_rfc9266_label(
    tmp_path: Path,
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command line is part of the test environment")
    cert, key = _server_files(tmp_path)
    port = _free_port()
    server = subprocess.Popen(
        [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert),
         "-key", str(key), "-tls1_3", "-naccept", "1", "-keymatexport",
         EXPORTER_LABEL.decode(), "-keymatexportlen", str(EXPORTER_LENGTH)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        sock = _connect(port, ssl.TLSVersion.TLSv1_3)
        with sock:
            binding = channel_binding(sock)
        out, _ = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    exported = re.search(rb"Keying material: ([0-9A-Fa-f]+)", out)
    assert exported is not None, out.decode(errors="replace")
    assert binding.kind == "tls-exporter"
    assert binding.value.hex().upper() == exported.group(1).decode().upper()


def test_tls_1_2_uses_tls_unique_and_each_connection_has_its_own(tmp_path: Path) -> None:
    cert, key = _server_files(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)
        port = listener.getsockname()[1]


        seen: list[bytes] = []

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    seen.append(channel_binding(tls).value)
                    tls.recv(1)

        t = threading.Thread(target=serve)
        t.start()
        values = []
        for _ in range(2):
            with _connect(port, ssl.TLSVersion.TLSv1_2) as sock:
                b = channel_binding(sock)
                assert b.kind == "tls-unique"
                values.append(b.value)
                sock.send(b"x")
        t.join(10)
    assert values == seen  # both ends agree, connection by connection
    assert values[0] != values[1]
