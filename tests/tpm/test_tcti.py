"""tpmid's swtpm TCTI: every command answered within ``tpm.timeout``, or a clear error.

Real swtpm for the normal path and for a hung TPM (SIGSTOP); a few lines of TCP
server stand in for a TPM only where a real one cannot misbehave that way (a
response header that lies about its size, a connection closed mid-answer).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tpmid.errors import TpmError
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.tcti import SwtpmAddress, SwtpmTcti, open_tcti, parse_swtpm


@pytest.mark.parametrize(("tcti", "address"), [
    ("swtpm:host=127.0.0.1,port=2321", SwtpmAddress("127.0.0.1", 2321)),
    ("swtpm:port=4000", SwtpmAddress("localhost", 4000)),
    ("swtpm", SwtpmAddress()),
    ("swtpm:", SwtpmAddress()),
    ("swtpm:path=/run/swtpm.sock", SwtpmAddress(path="/run/swtpm.sock")),
])
def test_swtpm_strings_are_read_like_tpm2_tss_reads_them(tcti: str, address: SwtpmAddress) -> None:
    assert parse_swtpm(tcti) == address


@pytest.mark.parametrize("tcti", ["swtpm:port=99999", "swtpm:port=x", "swtpm:host",
                                  "swtpm:colour=blue", "swtpm:port=1,port=2"])
def test_unreadable_swtpm_strings_are_clear_errors(tcti: str) -> None:
    with pytest.raises(TpmError, match="swtpm"):
        parse_swtpm(tcti)


@pytest.mark.parametrize("tcti", ["device:/dev/tpmrm0", "mssim:port=2321", "tabrmd:"])
def test_other_tctis_go_to_tpm2_tss_unchanged(tcti: str) -> None:
    assert open_tcti(tcti, 5.0) == tcti
    assert parse_swtpm(tcti) is None


def test_a_swtpm_connection_uses_tpmids_tcti_and_works(swtpm: Swtpm) -> None:
    with TpmConnection(swtpm.tcti, timeout=5) as tpm:
        assert isinstance(tpm._tcti, SwtpmTcti)
        assert tpm.esapi.get_random(8)
        assert tpm.transport_error() is None


def test_a_stopped_tpm_fails_the_command_after_the_timeout_and_the_connection_stays_failed(
        swtpm: Swtpm) -> None:
    tpm = TpmConnection(swtpm.tcti, timeout=0.5)
    os.kill(swtpm.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(TpmError, match=r"did not answer within 0.5 s \(tpm.timeout\)") as e:
            tpm.properties(0x100, 2)
        assert 0.4 < time.monotonic() - start < 5
        assert "raise tpm.timeout" in (e.value.hint or "")
        # A late answer must never be taken for the next command's: it fails at once.
        start = time.monotonic()
        with pytest.raises(TpmError, match="did not answer"):
            tpm.properties(0x100, 2)
        assert time.monotonic() - start < 0.2
    finally:
        os.kill(swtpm.pid, signal.SIGCONT)
        tpm.close()
    with TpmConnection(swtpm.tcti, timeout=5) as fresh:  # a new connection works again
        assert fresh.properties(0x100, 1)


def test_a_tpm_that_is_not_running_is_reported_with_its_address(swtpm: Swtpm) -> None:
    swtpm.stop()
    with pytest.raises(TpmError, match="TPM not reachable through TCTI 'swtpm:") as e:
        TpmConnection(swtpm.tcti, timeout=2).properties(0x100, 1)
    assert f"listening at {swtpm.host}:{swtpm.port}" in (e.value.hint or "")


@pytest.fixture
def fake_tpm() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A TCP listener answering each connection with ``answer(conn)`` (fault injection)."""
    servers: list[socket.socket] = []

    def start(answer: Callable[[socket.socket], None]) -> str:
        srv = socket.create_server(("127.0.0.1", 0))
        servers.append(srv)

        def loop() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(4096)
                    answer(conn)

        threading.Thread(target=loop, daemon=True).start()
        return f"swtpm:host=127.0.0.1,port={srv.getsockname()[1]}"

    yield start
    for s in servers:
        s.close()


def _command(tcti: str) -> TpmError:
    t = SwtpmTcti(parse_swtpm(tcti) or SwtpmAddress(), 2.0, tcti)
    t.do_transmit(struct.pack(">HII", 0x8001, 12, 0x17B) + b"\x00\x08")
    with pytest.raises(TpmError) as e:
        t.do_receive(-1)
    return e.value


def test_a_response_header_claiming_a_huge_size_is_refused(fake_tpm: Callable[..., str]) -> None:
    # Fault injection: no real TPM sends this.
    tcti = fake_tpm(lambda c: c.sendall(struct.pack(">HII", 0x8001, 1 << 30, 0)))
    assert "claiming 1073741824 bytes" in _command(tcti).message


def test_a_connection_closed_mid_answer_is_reported(fake_tpm: Callable[..., str]) -> None:
    # Fault injection: an answer cut off after its header.
    tcti = fake_tpm(lambda c: c.sendall(struct.pack(">HII", 0x8001, 20, 0)))
    assert "closed the connection before answering" in _command(tcti).message
