"""Run the whole benchmark: ``scripts/bench`` / ``python -m tests.bench``.

Order of a run (each part on factory-fresh simulated TPMs):

1. machine facts and ``tpmid --help`` start-up, on a quiet machine;
2. the rig: one manufactured TPM template, one ``tpmid est-server run``;
3. side by side (all untimed): a counting pass under ``strace`` (programs
   executed) for each flow; the manual path's attempts at mutual TLS with a
   TPM key; then ``tpmid daemon`` on the tpmid counting device (enrolled by
   then), sampled in the background while the rest runs (it is idle: its own
   CPU counters and RSS are what count);
4. mTLS handshakes, TPM key vs software key, through a plain and a delayed proxy;
5. the timed devices: for each column (plain swtpm, swtpm + delay per TPM
   command, swtpm + the discrete-TPM latency profile), ``--devices`` fresh
   devices per flow, tpmid and manual alternating; after the first complete
   tpmid device of the plain column, ``tpmid status`` on it, timed;
6. the daemon's window closes;
7. the EST server under load (``--load-clients`` for ``--load-seconds``);
8. table, Markdown and JSON.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tests.bench import flows, load, probes, report, sysinfo
from tests.bench.model import BenchOptions, BenchResult, FlowColumn
from tests.bench.rig import BASIC_LABEL, BASIC_USER, BenchFailure, Rig
from tpmid.testing.tpmproxy import PROFILES

REPO = Path(__file__).resolve().parents[2]
QUICK = BenchOptions(devices=1, handshakes=3, idle_seconds=3.0, startup_runs=3, status_runs=3,
                     load_clients=10, load_seconds=3.0, quick=True)
REQUIRED_TOOLS = ("swtpm", "swtpm_setup", "tpm2_createprimary", "tpm2_evictcontrol",
                  "tpm2_flushcontext", "tpm2_getcap", "openssl", "curl", "strace", "basenc",
                  "bash")

Progress = Callable[[str], None]
T = TypeVar("T")


def pick(value: T | None, default: T) -> T:
    """``value`` unless it is None (an option not given)."""
    return default if value is None else value


def _missing_tools() -> list[str]:
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


def run_bench(options: BenchOptions, *, workdir: Path, base_env: Mapping[str, str],
              progress: Progress, server_cprofile: Path | None = None) -> BenchResult:
    """Measure everything ``options`` asks for, with devices and server under ``workdir``."""
    t_start = time.monotonic()
    result = BenchResult(options=options, system=sysinfo.collect())
    missing = _missing_tools()
    if missing:
        raise BenchFailure(f"missing tools: {', '.join(missing)} (run scripts/setup)")
    tpmid = flows.tpmid_command()
    env = {k: v for k, v in base_env.items() if not k.startswith("TPMID_")}

    progress(f"start-up: `tpmid --help` x{options.startup_runs}")
    try:
        result.startup = probes.measure_startup(tpmid, env, runs=options.startup_runs,
                                                explain_over_ms=report.TARGET_STARTUP_MS)
    except (RuntimeError, OSError) as e:
        result.errors.append(f"start-up not measured: {e}")

    rig = Rig(workdir, base_env, server_cprofile=server_cprofile)
    daemon: probes.DaemonProbe | None = None
    try:
        progress("rig: manufacturing the template TPM, starting the EST server")
        rig.start()
        kit = flows.write_manual_kit(workdir / "manual-kit")
        renew_argv, renew_display = flows.renew_command(tpmid, env)
        result.renew_command = renew_display
        renew = (renew_argv, renew_display)

        # Untimed work runs side by side (2 cores): the counting pass of each flow; the
        # tpmid counting device, enrolled by then, goes on to host the idle daemon.
        # Everything timed below runs alone.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench-untimed") as pool:
            count_t = pool.submit(_count_tpmid_then_daemon, rig, tpmid, renew, options,
                                  result, progress)
            count_m = pool.submit(_count_manual, rig, kit, result, progress)
            progress("counting pass: programs executed per step (strace), untimed")
            try:
                count_m.result()
            finally:
                daemon = count_t.result()  # so that `finally` below can stop it
        _handshakes(rig, options, result, progress)
        columns = [FlowColumn(delay_ms=0.0), FlowColumn(delay_ms=options.delay_ms)]
        if options.profile:
            columns.append(FlowColumn(delay_ms=0.0, profile=options.profile))
        for col in columns:
            result.columns.append(col)
            latency = PROFILES[col.profile] if col.profile else None
            prefix = {"plain": "P", "delayed": "D", "discrete": "R"}[col.kind]
            for i in range(options.devices):
                serial = f"SN-{prefix}{i + 1:04d}"
                for flow in ("tpmid", "manual"):
                    dev = rig.device(f"{flow}-{serial}", delay=col.delay_ms / 1000.0,
                                     latency=latency)
                    try:
                        if flow == "tpmid":
                            steps = flows.run_tpmid_flow(rig, dev, serial, tpmid=tpmid,
                                                         renew=renew)
                            if (result.status is None and col.kind == "plain"
                                    and all(r.ok for r in steps) and len(steps) == 3):
                                progress(f"`tpmid status` x{options.status_runs} on {serial}")
                                result.status = probes.measure_status(
                                    tpmid, flows.tpmid_env(rig, dev.dir / "config.yaml"), dev,
                                    runs=options.status_runs)
                        else:
                            steps = flows.run_manual_flow(rig, dev, serial, kit=kit)
                    finally:
                        rig.release(dev)
                    col.runs[flow].append(steps)
                    total = sum(r.seconds for r in steps)
                    status = "ok" if all(r.ok for r in steps) and len(steps) == 3 else (
                        f"FAILED at {steps[-1].step}: {steps[-1].error}")
                    progress(f"[{col.label}] device {i + 1}/{options.devices} {flow}: "
                             f"{total:.2f} s, {sum(r.tpm_commands for r in steps)} TPM commands, "
                             f"{status}")
            progress(report.column_summary(col))
        if daemon is not None:
            progress("daemon: waiting for the end of its idle window")
            result.daemon = daemon.finish()
            daemon = None
        if options.load_clients > 0:
            result.load = _load(rig, options, progress)
    finally:
        if daemon is not None:
            daemon.stop()
        rig.close()
    result.duration_s = time.monotonic() - t_start
    return result


def _count_tpmid_then_daemon(rig: Rig, tpmid: list[str], renew: tuple[list[str], str],
                             options: BenchOptions, result: BenchResult,
                             progress: Progress) -> probes.DaemonProbe | None:
    """The tpmid counting pass, then ``tpmid daemon`` on that (now enrolled) device."""
    dev = rig.device("count-tpmid")
    try:
        steps = flows.run_tpmid_flow(rig, dev, "SN-C0001", tpmid=tpmid, renew=renew,
                                     count_processes=True)
        result.counting["tpmid"] = steps
        if not all(r.ok for r in steps) or len(steps) != len(flows.STEPS):
            bad = steps[-1]
            result.daemon = probes.DaemonResult(
                measured=False, reason=f"its device could not be enrolled ({bad.command}: "
                f"exit {bad.rc})", log_tail=bad.error or "")
            rig.release(dev)
            return None
        env = flows.tpmid_env(rig, dev.dir / "config.yaml")
        probe = probes.DaemonProbe(tpmid, env, dev, options.idle_seconds)
        probe.start()
    except BaseException:
        rig.release(dev)
        raise
    if not probe.sampling:  # never reached its idle state
        result.daemon = probe.finish()
        rig.release(dev)
        return None
    progress(f"daemon: idle, sampling for {options.idle_seconds:g} s in the background")
    return probe  # the device stays up until rig.close()


def _handshakes(rig: Rig, options: BenchOptions, result: BenchResult,
                progress: Progress) -> None:
    from tpmid.errors import TpmidError
    from tpmid.testing.tpmproxy import TpmProxy
    from tpmid.tpm.connection import TpmConnection
    from tpmid.tpm.idevid import create_persistent_idevid

    dev = rig.device("handshake")
    try:
        with TpmConnection(dev.direct_tcti) as conn:
            create_persistent_idevid(conn, "H-2", flows.IDEVID_HANDLE)
        for delay in (0.0, options.delay_ms):
            progress(f"handshakes: {options.handshakes} per key, proxy delay {delay:g} ms")
            proxy = dev.proxy if not delay else TpmProxy(
                dev.swtpm.host, dev.swtpm.port, dev.swtpm.ctrl_port, delay=delay / 1000.0).start()
            try:
                result.handshakes.append(probes.measure_handshake(
                    proxy.tcti, proxy, n=options.handshakes, handle=flows.IDEVID_HANDLE))
            finally:
                if proxy is not dev.proxy:
                    proxy.stop()
    except (TpmidError, OSError) as e:
        result.errors.append(f"handshakes not measured: {e}")
    finally:
        rig.release(dev)


def _load(rig: Rig, options: BenchOptions, progress: Progress) -> load.LoadResult:
    srv = rig.server
    assert srv is not None
    prefix = "/.well-known/est/"
    return load.run_load(
        server_pid=srv.process.pid, host=srv.host, port=srv.port,
        path=f"{prefix}{BASIC_LABEL}/simpleenroll", cafile=srv.tls_ca, user=BASIC_USER,
        password=rig.basic_password, clients=options.load_clients, seconds=options.load_seconds,
        workers=options.load_workers, progress=progress)


def _count_manual(rig: Rig, kit: Path, result: BenchResult, progress: Progress) -> None:
    dev = rig.device("count-manual")
    try:
        result.counting["manual"] = flows.run_manual_flow(rig, dev, "SN-C0002", kit=kit,
                                                          count_processes=True)
        if all(r.ok for r in result.counting["manual"]):
            progress("manual path: trying curl's mutual TLS with the TPM keys")
            result.mtls_attempts = flows.try_manual_mtls(rig, dev, kit, "SN-C0002")
    finally:
        rig.release(dev)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark tpmid's device flow against the manual path with standard "
        "tools, on simulated TPMs (plain, with a per-command delay, with a discrete-TPM "
        "latency profile) and the reference EST server; CPU per command, `tpmid status`, "
        "start-up, the idle daemon, the EST server under load; print a table and write "
        "docs/benchmarks.md and docs/benchmarks.json.")
    p.add_argument("--quick", action="store_true",
                   help="tiny counts (1 device, 3 handshakes, 3 s idle, 3 status runs, 10 "
                   "load clients for 3 s); writes nothing unless --out-md/--out-json are given")
    p.add_argument("--devices", type=int, help="fresh devices per flow and column (default 20)")
    p.add_argument("--handshakes", type=int, help="handshakes per key and column (default 50)")
    p.add_argument("--delay-ms", type=float, help="proxy delay per TPM command (default 20)")
    p.add_argument("--idle-seconds", type=float, help="daemon idle window (default 60)")
    p.add_argument("--profile", choices=[*sorted(PROFILES), "none"],
                   help="latency profile of the third column (default discrete: a discrete "
                   "TPM's per-command latencies, see docs/benchmarks.md); none: no third column")
    p.add_argument("--status-runs", type=int, help="`tpmid status` runs (default 10)")
    p.add_argument("--load-clients", type=int, help="concurrent clients enrolling against "
                   "the EST server in the load test (default 50; 0: no load test)")
    p.add_argument("--load-seconds", type=float, help="load test window (default 60)")
    p.add_argument("--cprofile-server", type=Path, metavar="FILE",
                   help="run the EST server under cProfile (every thread) and write its "
                   "stats to FILE when it stops (read with python -m pstats FILE)")
    p.add_argument("--out-md", type=Path, help="Markdown report (default docs/benchmarks.md)")
    p.add_argument("--out-json", type=Path, help="JSON report (default docs/benchmarks.json)")
    p.add_argument("--workdir", type=Path, help="keep devices and server here (default: a "
                   "temporary directory, removed afterwards)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every step succeeded, 1 when something failed."""
    args = _parser().parse_args(argv)
    base = QUICK if args.quick else BenchOptions()
    options = BenchOptions(
        devices=pick(args.devices, base.devices),
        handshakes=pick(args.handshakes, base.handshakes),
        delay_ms=pick(args.delay_ms, base.delay_ms),
        idle_seconds=pick(args.idle_seconds, base.idle_seconds),
        startup_runs=base.startup_runs,
        status_runs=pick(args.status_runs, base.status_runs),
        profile=base.profile if args.profile is None else (
            None if args.profile == "none" else args.profile),
        load_clients=pick(args.load_clients, base.load_clients),
        load_seconds=pick(args.load_seconds, base.load_seconds),
        quick=base.quick)
    if options.devices < 1 or options.handshakes < 1 or options.idle_seconds <= 0 \
            or options.delay_ms <= 0 or options.status_runs < 1 or options.load_clients < 0 \
            or options.load_seconds <= 0:
        print("scripts/bench: --devices, --handshakes and --status-runs must be >= 1, "
              "--load-clients >= 0, --idle-seconds, --load-seconds and --delay-ms > 0",
              file=sys.stderr)
        return 2
    out_md = args.out_md or (None if options.quick else REPO / "docs" / "benchmarks.md")
    out_json = args.out_json or (None if options.quick else REPO / "docs" / "benchmarks.json")

    t0 = time.monotonic()

    def progress(message: str) -> None:
        print(f"bench [{time.monotonic() - t0:5.1f} s] {message}", file=sys.stderr, flush=True)

    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tpmid-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_bench(options, workdir=workdir, base_env=os.environ, progress=progress,
                           server_cprofile=args.cprofile_server)
    except BenchFailure as e:
        print(f"scripts/bench: {e}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = report.build_rows(result)
    print(report.table_text(rows, result))
    print()
    print(report.targets_markdown(rows))
    if out_md is not None:
        report.write_markdown(out_md, result)
        progress(f"wrote {out_md}")
    if out_json is not None:
        report.write_json(out_json, result)
        progress(f"wrote {out_json}")
    if result.failed():
        progress("some steps failed; see the Failures section")
        return 1
    return 0
