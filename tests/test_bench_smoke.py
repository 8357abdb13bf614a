"""The benchmark (``scripts/bench``) end to end with tiny counts, and the pieces it rests on.

The smoke test runs the real benchmark (swtpm devices, the reference EST server
process, the tpmid CLI, tpm2-tools/openssl/curl for the manual path, strace,
the daemon) with ``--quick`` and checks that every row of the table was
measured and that both reports were written. It does not judge the numbers:
the targets are benchmarks, not tests.
"""

from __future__ import annotations

import json
import os
import pstats
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.flows import write_manual_kit
from tests.bench.probes import heaviest, parse_importtime
from tests.bench.report import MARKER, ROW_IDS
from tests.bench.rig import STRACE_EXECVE, parse_strace_execs
from tests.bench.stats import percentile
from tpmid.testing.swtpm import Swtpm
from tpmid.tpm.connection import TpmConnection
from tpmid.tpm.idevid import derive_idevid

REPO = Path(__file__).resolve().parent.parent
NOT_MEASURED = ("not measured", "—")


@pytest.mark.slow
def test_quick_bench_measures_every_row_for_both_flows_and_writes_both_reports(
    tmp_path: Path,
) -> None:
    md = tmp_path / "benchmarks.md"
    js = tmp_path / "benchmarks.json"
    md.write_text(f"# My header\n\nkept as written\n\n{MARKER}\n\nstale results\n")
    # What scripts/bench runs after scripts/setup (not run here: it may pip-install).
    proc = subprocess.run([sys.executable, "-m", "tests.bench", "--quick",
                           "--out-md", str(md), "--out-json", str(js)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"

    data = json.loads(js.read_text())
    rows = {r["id"]: r for r in data["rows"]}
    assert [r["id"] for r in data["rows"]] == list(ROW_IDS)
    # Every measure has a value for tpmid on plain swtpm; none fell back to "not measured".
    for rid, row in rows.items():
        assert not row["tpmid_plain"].startswith(NOT_MEASURED), (rid, row)
    for rid in ("provision_time", "enroll_time", "renew_time", "flow_time", "flow_tpm_commands",
                "provision_cpu", "enroll_cpu", "renew_cpu", "flow_tpm_wait"):
        for cell in ("manual_plain", "tpmid_delayed", "manual_delayed", "tpmid_discrete",
                     "manual_discrete"):
            assert not rows[rid][cell].startswith(NOT_MEASURED), (rid, cell, rows[rid])
    # Every target got a verdict (✔ or ✘), whatever it is; issue 15's are among them.
    assert data["targets"] and all(v in ("✔", "✘") for v in data["targets"].values())
    assert {"provision_tpm_commands", "enroll_tpm_commands", "renew_tpm_commands",
            "flow_tpm_commands", "provision_cpu", "enroll_cpu", "renew_cpu", "status_cpu",
            "cli_startup", "load_errors"} <= set(data["targets"])

    # Both flows really used the TPM behind the counting proxy, in all three columns.
    assert [(c["kind"], c["delay_ms"]) for c in data["columns"]] == [
        ("plain", 0.0), ("delayed", 20.0), ("discrete", 0.0)]
    for column in data["columns"]:
        for flow in ("tpmid", "manual"):
            for step in ("provision", "enroll", "renew"):
                low, _high = column[flow]["steps"][step]["tpm_commands"]
                assert low > 0, (column["label"], flow, step)
                assert column[flow]["steps"][step]["cpu_ms"][0] > 0, (column["label"], flow)
            waited = column[flow]["flow_tpm_wait_ms"][0]
            n = column[flow]["flow_tpm_commands"][0]
            # Plain forwards at once; 20 ms/cmd adds exactly that; the profile adds at
            # least a key generation (240 ms) and a signature (200 ms) to each flow.
            expected = {"plain": (0, 0), "delayed": (20 * n - 1, 20 * n + 1),
                        "discrete": (440, 1e9)}
            lo, hi = expected[column["kind"]]
            assert lo <= waited <= hi, (column["label"], flow, waited)
    # `tpmid status` was timed on an enrolled device and never touched the TPM.
    assert data["status"]["measured"] is True and data["status"]["tpm_commands"] == 0
    # The server under load: every request of every client was answered or counted.
    assert data["load"]["measured"] is True and data["load"]["enrollments"] > 0
    assert data["load"]["server_rss_kb_max"] > 0 and data["load"]["server_cpu_s"] is not None
    assert {r["tpmid_plain"] for r in data["rows"] if r["id"] == "handshake_tpm_commands"} \
        == {"1 (Sign)"}
    assert data["counting"]["manual"][0]["programs"]["tpm2_createprimary"] == 1
    assert len(data["manual_mtls_attempts"]) == 2
    assert data["daemon"]["measured"] is True

    text = md.read_text()
    assert text.startswith("# My header\n\nkept as written\n")
    assert "stale results" not in text
    for row in data["rows"]:
        assert row["label"].replace("|", "\\|") in text
        assert row["label"] in proc.stdout


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        (list(range(1, 21)), 0.95, 19),
        (list(range(1, 21)), 0.5, 10),
        ([5.0], 0.95, 5.0),
        ([3, 1, 2], 1.0, 3),
        ([10, 20], 0.95, 20),
    ],
    ids=["p95-of-20-is-the-19th", "median-rank", "single-sample", "max", "two-samples"],
)
def test_percentile_is_nearest_rank_and_never_interpolates(values: list[float], q: float,
                                                          expected: float) -> None:
    assert percentile(values, q) == expected


def test_strace_counting_sees_every_program_of_a_pipeline_but_not_failed_lookups(
    tmp_path: Path,
) -> None:
    prefix = tmp_path / "trace"
    subprocess.run([*STRACE_EXECVE, "-o", str(prefix), "bash", "-c",
                    "echo hi | tr a-z A-Z | cat > /dev/null; no-such-program-xyz 2>/dev/null; true"],
                   check=False, timeout=30)
    counted = parse_strace_execs(sorted(tmp_path.glob("trace.*")))
    # bash itself, tr and cat; echo and true are builtins; the missing program never ran.
    assert counted == {"bash": 1, "tr": 1, "cat": 1}


def test_importtime_parsing_finds_the_heaviest_imports_of_a_real_interpreter() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import json, email.parser"],
                          capture_output=True, text=True, check=True, timeout=30)
    costs = parse_importtime(proc.stderr)
    names = {c.module: c for c in costs}
    assert names["json"].depth == 0 and names["json.decoder"].depth == 1
    top = heaviest(costs, limit=3)
    assert len(top) == 3
    assert top[0].cumulative_us >= top[1].cumulative_us >= top[2].cumulative_us


def test_manual_kit_makes_tpm2_tools_derive_the_same_idevid_as_tpmid(swtpm: Swtpm,
                                                                     tmp_path: Path) -> None:
    """The manual path's IDevID must be the very key tpmid provisions, or the race is unfair."""
    kit = write_manual_kit(tmp_path / "kit")
    proc = subprocess.run(
        ["tpm2_createprimary", "-T", swtpm.tcti, "-C", "e", "-g", "sha256",
         "-G", "ecc256:ecdsa-sha256:null",
         "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|adminwithpolicy|sign",
         "-L", str(kit / "idevid-policy-sha256.bin"),
         "-u", str(kit / "idevid-unique-ecc-p256.bin"), "-c", str(tmp_path / "idevid.ctx")],
        capture_output=True, text=True, timeout=30, check=True)
    tools_x = next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                   if line.startswith("x:"))
    subprocess.run(["tpm2_flushcontext", "-T", swtpm.tcti, "-t"], check=True, timeout=30)
    with TpmConnection(swtpm.tcti) as tpm:
        key = derive_idevid(tpm, "H-2")
        try:
            tpmid_x = bytes(key.public.publicArea.unique.ecc.x).hex()
        finally:
            key.close()
    assert tools_x == tpmid_x


def test_server_profiler_sees_the_work_done_in_threads_not_only_the_main_thread(
    tmp_path: Path,
) -> None:
    """python -m cProfile would miss it: the EST server answers in one thread per connection."""
    (tmp_path / "threaded_job.py").write_text(
        "import threading\n"
        "def work_in_a_thread():\n"
        "    return sum(i * i for i in range(20000))\n"
        "t = threading.Thread(target=work_in_a_thread)\n"
        "t.start(); t.join()\n"
        "raise SystemExit(3)\n")
    out = tmp_path / "job.prof"
    proc = subprocess.run([sys.executable, "-m", "tests.bench.cprofile_threads", str(out),
                           "-m", "threaded_job"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 3, proc.stderr  # the module's exit status, passed through
    functions = pstats.Stats(str(out)).get_stats_profile().func_profiles
    assert "work_in_a_thread" in functions
