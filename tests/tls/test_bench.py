"""The handshake benchmark hook that scripts/bench calls."""

from __future__ import annotations

import pytest

from tests.bench.handshakes import measure_handshakes
from tests.tls.conftest import MakeKey
from tpmid.testing.swtpm import Swtpm
from tpmid.testing.tpmproxy import TpmProxy


@pytest.mark.parametrize("alg", ["ecc-p256", "rsa-2048"])
def test_benchmark_reports_one_tpm_command_per_handshake_and_the_hardware_like_delay(
    swtpm: Swtpm, tpm_key: MakeKey, alg: str,
) -> None:
    delay = 0.02
    with TpmProxy(swtpm.host, swtpm.port, swtpm.ctrl_port, delay=delay) as proxy:
        key = tpm_key(proxy.tcti, alg)
        result = measure_handshakes(key, n=3, proxy=proxy)
        key.close()
    assert result.alg == alg and result.n == 3
    assert result.tpm_commands_per_handshake == 1.0
    assert result.tpm_commands_by_name == {"TPM2_Sign": 3}
    # One delayed TPM command per TPM handshake; the software key pays none.
    assert result.tpm_median_ms >= delay * 1000
    assert result.software_median_ms < result.tpm_median_ms
    assert result.tls_version == ("TLSv1.2" if alg.startswith("rsa") else "TLSv1.3")
