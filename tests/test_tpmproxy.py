"""The counting TPM proxy: frame parsing, forwarding to a real swtpm, delay, CLI mode."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpmid.testing.swtpm import Swtpm
from tpmid.testing.tpmproxy import FrameCounter, TpmProxy, command_name

ROOT = Path(__file__).resolve().parent.parent


def _frame(code: int, body: bytes = b"") -> bytes:
    return struct.pack(">HII", 0x8001, 10 + len(body), code) + body


SIGN = _frame(0x15D, b"\x80\x00\x00\x00" + b"x" * 40)
GETRANDOM = _frame(0x17B, b"\x00\x08")


def _split(data: bytes, *cuts: int) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


FRAMINGS = [
    pytest.param([SIGN], ["TPM2_Sign"], id="one-frame-one-read"),
    pytest.param([SIGN + GETRANDOM], ["TPM2_Sign", "TPM2_GetRandom"], id="two-frames-one-read"),
    pytest.param(_split(SIGN, 3), ["TPM2_Sign"], id="split-inside-header"),
    pytest.param(_split(SIGN, 10, 20), ["TPM2_Sign"], id="split-after-header"),
    pytest.param(_split(SIGN + GETRANDOM, len(SIGN) + 5), ["TPM2_Sign", "TPM2_GetRandom"],
                 id="second-header-split"),
    pytest.param([bytes([b]) for b in GETRANDOM + SIGN], ["TPM2_GetRandom", "TPM2_Sign"],
                 id="byte-by-byte"),
]


@pytest.mark.parametrize(("reads", "names"), FRAMINGS)
def test_frames_are_counted_however_the_stream_is_cut(
    reads: list[bytes], names: list[str],
) -> None:
    fc = FrameCounter()
    chunks = [c for r in reads for c in fc.feed(r)]
    assert [command_name(code) for _, code in chunks if code is not None] == names
    assert b"".join(c for c, _ in chunks) == b"".join(reads)


def test_garbage_is_forwarded_unparsed_instead_of_stalling() -> None:
    fc = FrameCounter()
    out = fc.feed(struct.pack(">HII", 0x8001, 3, 0x15D) + b"zz") + fc.feed(b"more")
    assert [code for _, code in out] == [None, None]
    assert b"".join(c for c, _ in out).endswith(b"zzmore")


def test_unknown_command_codes_get_a_hex_name() -> None:
    assert command_name(0x15D) == "TPM2_Sign"
    assert command_name(0x2FF) == "TPM2_CC_0x000002FF"


def _tools(tcti: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), env={"TPM2TOOLS_TCTI": tcti, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=False, timeout=30)


def test_proxy_forwards_to_the_tpm_and_counts_what_reached_it(swtpm: Swtpm) -> None:
    with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port) as proxy:
        out = _tools(proxy.tcti, "tpm2_getrandom", "--hex", "16")
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.strip()) == 32
        assert "TPM2_GetRandom" in proxy.commands
        assert proxy.count == len(proxy.commands) >= 1
        assert proxy.unparsed_bytes == 0
        proxy.reset()
        assert proxy.count == 0 and proxy.commands == []


def test_control_channel_is_forwarded_so_power_cycles_work_through_the_proxy(
    swtpm: Swtpm,
) -> None:
    with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port) as proxy:
        via = Swtpm(swtpm.directory, host=proxy.host, port=proxy.port)
        via.power_cycle()  # CMD_INIT over the proxy's P+1
        # TPM_RC_INITIALIZE (0x100) until TPM2_Startup, as on a real power cycle
        assert "0x100" in _tools(proxy.tcti, "tpm2_getrandom", "--hex", "4").stderr
        assert _tools(proxy.tcti, "tpm2_startup", "-c").returncode == 0
        assert proxy.commands[-1] == "TPM2_Startup"


def test_delay_is_added_to_every_tpm_command(swtpm: Swtpm) -> None:
    delay = 0.15
    with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port, delay=delay) as proxy:
        t0 = time.monotonic()
        assert _tools(proxy.tcti, "tpm2_getrandom", "--hex", "4").returncode == 0
        elapsed = time.monotonic() - t0
        assert elapsed >= delay * proxy.count


def test_dead_upstream_looks_like_a_dead_tpm(swtpm: Swtpm) -> None:
    with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port) as proxy:
        swtpm.stop()
        assert _tools(proxy.tcti, "tpm2_getrandom", "--hex", "4").returncode != 0
        assert proxy.count == 0


def test_proxy_refuses_non_loopback_upstreams() -> None:
    with pytest.raises(ValueError, match="loopback"):
        TpmProxy("192.0.2.1", 2321, 2322)


def test_command_line_proxy_prints_its_tcti_and_reports_counts(swtpm: Swtpm) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpmid.testing.tpmproxy", "--upstream-port", str(swtpm.port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        tcti = proc.stdout.readline().strip()
        assert tcti.startswith("swtpm:host=127.0.0.1,port=")
        assert _tools(tcti, "tpm2_getrandom", "--hex", "4").returncode == 0
        proc.send_signal(signal.SIGUSR1)
        live = json.loads(proc.stdout.readline())
        assert live["by_name"].get("TPM2_GetRandom") == 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert json.loads(out.strip().splitlines()[-1])["count"] == live["count"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the discrete-TPM latency profile ------------------------------------------------------


def _command(code: int, handles: list[int], params: bytes) -> bytes:
    """A command frame with one password session, as ESAPI sends it (TPM_ST_SESSIONS)."""
    session = struct.pack(">IHBH", 0x40000009, 0, 0, 0)  # handle, nonce, attributes, hmac
    body = b"".join(struct.pack(">I", h) for h in handles)
    body += struct.pack(">I", len(session)) + session + params
    return struct.pack(">HII", 0x8002, 10 + len(body), code) + body


def _create(code: int, alg: str) -> bytes:
    from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

    params = TPM2B_SENSITIVE_CREATE().marshal() + TPM2B_PUBLIC.parse(alg).marshal()
    return _command(code, [0x4000000B], params + b"\0\0" + b"\0\0\0\0")


@pytest.mark.parametrize(
    ("frame", "code", "alg", "seconds"),
    [
        pytest.param(_create(0x131, "ecc256"), 0x131, "ecc", 0.240, id="createprimary-ecc"),
        pytest.param(_create(0x131, "rsa2048"), 0x131, "rsa", 3.0, id="createprimary-rsa"),
        pytest.param(_create(0x191, "rsa2048"), 0x191, "rsa", 3.0, id="createloaded-rsa"),
        pytest.param(_command(0x15D, [0x81020000], b"\0\x20" + b"d" * 32 + b"\0\x18\0\x0b"),
                     0x15D, "ecc", 0.200, id="sign-ecdsa"),
        pytest.param(_command(0x15D, [0x81020000], b"\0\x20" + b"d" * 32 + b"\0\x10"),
                     0x15D, None, 0.200, id="sign-null-scheme-uses-the-key-default"),
        pytest.param(_command(0x173, [0x81020000], b""), 0x173, None, 0.0031, id="readpublic"),
    ],
)
def test_discrete_profile_prices_key_generation_by_the_algorithm_in_the_frame(
    frame: bytes, code: int, alg: str | None, seconds: float,
) -> None:
    from tpmid.testing.tpmproxy import DISCRETE_TPM, command_algorithm

    assert command_algorithm(code, frame) == alg
    assert DISCRETE_TPM(code, frame) == pytest.approx(seconds)


def test_discrete_profile_charges_nv_reads_by_the_bytes_asked_for() -> None:
    from tpmid.testing.tpmproxy import DISCRETE_TPM, nv_read_size

    small = _command(0x14E, [0x01C00002, 0x01C00002], struct.pack(">HH", 16, 0))
    big = _command(0x14E, [0x01C00002, 0x01C00002], struct.pack(">HH", 1024, 0))
    assert (nv_read_size(0x14E, small), nv_read_size(0x14E, big)) == (16, 1024)
    assert DISCRETE_TPM(0x14E, big) - DISCRETE_TPM(0x14E, small) == pytest.approx(
        (1024 - 16) * DISCRETE_TPM.nv_read_per_byte)


def test_truncated_frames_get_the_plain_per_command_figure_not_an_exception() -> None:
    from tpmid.testing.tpmproxy import DISCRETE_TPM

    truncated = _create(0x131, "rsa2048")[:20]
    assert DISCRETE_TPM(0x131, truncated) == pytest.approx(0.240)


def test_proxy_waits_for_the_latency_function_and_reports_the_time_added(swtpm: Swtpm) -> None:
    seen: list[int] = []

    def latency(code: int, frame: bytes) -> float:
        seen.append(code)
        return 0.05

    with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port, delay=0.01,
                  latency=latency) as proxy:
        t0 = time.monotonic()
        subprocess.run(["tpm2_getrandom", "-T", proxy.tcti, "--hex", "8"], check=True,
                       capture_output=True, timeout=30)
        elapsed = time.monotonic() - t0
        stats = proxy.stats()
    assert seen and stats["count"] == len(seen)
    assert stats["waited_s"] == pytest.approx(0.06 * len(seen))
    assert elapsed >= 0.06 * len(seen)
