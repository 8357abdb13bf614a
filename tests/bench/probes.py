"""Single measurements: CLI start-up, mTLS handshakes, the idle daemon.

* :func:`measure_startup` times ``tpmid --help`` (and a bare ``python -c pass``
  for reference) as a user starts it, and, when asked, lists the imports that
  dominate from ``python -X importtime``.
* :func:`measure_status` times ``tpmid status`` on an enrolled device (no TPM,
  no network) and reads its CPU time.
* :func:`measure_handshake` runs :func:`tests.bench.handshakes.measure_handshakes`
  with a device's persistent IDevID opened through the counting proxy.
* :class:`DaemonProbe` starts ``tpmid daemon`` for an enrolled device and
  samples ``/proc/PID/status`` (VmRSS) and ``/proc/PID/stat`` (utime + stime)
  while it is idle.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.rig import Device
from tpmid.testing.tpmproxy import TpmProxy

# ----------------------------------------------------------------------------- start-up


@dataclass(frozen=True)
class ImportCost:
    """One line of ``python -X importtime``: cumulative microseconds and nesting depth."""

    module: str
    cumulative_us: int
    self_us: int
    depth: int


@dataclass
class StartupResult:
    """Start-up of the CLI and of the bare interpreter, in milliseconds."""

    command: str
    runs: int
    help_median_ms: float
    help_min_ms: float
    python_median_ms: float
    help_cpu_median_ms: float | None = None
    # The dependencies a command cannot do without, imported and nothing else: the
    # floor under its CPU and wall time (name -> {"modules", "cpu_median_ms", "wall_median_ms"}).
    import_floors: dict[str, dict[str, object]] = field(default_factory=dict)
    heaviest_imports: list[ImportCost] = field(default_factory=list)
    all_top_level: list[ImportCost] = field(default_factory=list)  # depth 0, for the total

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        d = dict(self.__dict__)
        d["heaviest_imports"] = [i.__dict__ for i in self.heaviest_imports]
        d["all_top_level"] = [i.__dict__ for i in self.all_top_level]
        return d


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _time_runs(argv: list[str], runs: int, env: Mapping[str, str],
               cpu: list[float] | None = None) -> list[float]:
    """Wall times (ms) of ``runs`` runs; their CPU times (ms) appended to ``cpu`` if given."""
    times = []
    for _ in range(runs):
        c0 = _cpu_children()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=dict(env), timeout=60, check=False)
        times.append((time.perf_counter() - t0) * 1000.0)
        if cpu is not None:
            cpu.append((_cpu_children() - c0) * 1000.0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace')[-500:]}")
    return times


_IMPORTTIME = re.compile(r"^import time:\s+(\d+)\s*\|\s*(\d+)\s*\|(\s*)(\S+)\s*$")


def parse_importtime(text: str) -> list[ImportCost]:
    """The lines of ``-X importtime`` output (header and other lines skipped)."""
    out = []
    for line in text.splitlines():
        m = _IMPORTTIME.match(line)
        if m:
            # One leading space is depth 0; each nesting level adds two.
            out.append(ImportCost(module=m.group(4), self_us=int(m.group(1)),
                                  cumulative_us=int(m.group(2)),
                                  depth=max(0, (len(m.group(3)) - 1) // 2)))
    return out


def heaviest(costs: list[ImportCost], limit: int = 12, max_depth: int = 2) -> list[ImportCost]:
    """The ``limit`` costliest imports (cumulative) at nesting depth <= ``max_depth``."""
    shallow = [c for c in costs if c.depth <= max_depth]
    return sorted(shallow, key=lambda c: c.cumulative_us, reverse=True)[:limit]


# What each kind of command must import whatever tpmid does (the user's dependencies):
# status reads the YAML config and X.509 certificates; enroll, renew and provision also
# speak HTTPS through requests and drive the TPM through tpm2-pytss.
IMPORT_FLOORS = {
    "status": ("yaml", "cryptography.x509"),
    "enroll/renew/provision": ("yaml", "cryptography.x509", "requests", "tpm2_pytss"),
}


def measure_import_floors(env: Mapping[str, str], runs: int) -> dict[str, dict[str, object]]:
    """CPU and wall medians of a bare interpreter importing each of :data:`IMPORT_FLOORS`."""
    floors: dict[str, dict[str, object]] = {}
    for name, modules in IMPORT_FLOORS.items():
        argv = [sys.executable, "-c", "import " + ", ".join(modules)]
        _time_runs(argv, 1, env)
        cpu: list[float] = []
        wall = _time_runs(argv, runs, env, cpu)
        floors[name] = {"modules": list(modules), "cpu_median_ms": statistics.median(cpu),
                        "wall_median_ms": statistics.median(wall)}
    return floors


def measure_startup(tpmid: list[str], env: Mapping[str, str], *, runs: int = 10,
                    explain_over_ms: float | None = 150.0) -> StartupResult:
    """Median wall time of ``tpmid --help`` over ``runs`` runs (after one warm-up).

    When the median exceeds ``explain_over_ms``, the imports that dominate are
    read from one ``python -X importtime`` run of the same console script.
    """
    _time_runs([*tpmid, "--help"], 1, env)
    help_cpu: list[float] = []
    help_times = _time_runs([*tpmid, "--help"], runs, env, help_cpu)
    py_times = _time_runs([sys.executable, "-c", "pass"], runs, env)
    result = StartupResult(command=" ".join([Path(tpmid[0]).name, *tpmid[1:], "--help"]),
                           runs=runs, help_median_ms=statistics.median(help_times),
                           help_min_ms=min(help_times),
                           python_median_ms=statistics.median(py_times),
                           help_cpu_median_ms=statistics.median(help_cpu),
                           import_floors=measure_import_floors(env, runs))
    if explain_over_ms is not None and result.help_median_ms > explain_over_ms:
        script = tpmid if tpmid[0] == sys.executable else [sys.executable, *tpmid]
        proc = subprocess.run([script[0], "-X", "importtime", *script[1:], "--help"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(env),
                              timeout=60, check=False)
        costs = parse_importtime(proc.stderr.decode(errors="replace"))
        result.heaviest_imports = heaviest(costs)
        result.all_top_level = [c for c in costs if c.depth == 0]
    return result


# ----------------------------------------------------------------------------- status


@dataclass
class StatusResult:
    """``tpmid status`` on an enrolled device: wall and CPU time, TPM commands it sent."""

    measured: bool
    runs: int = 0
    wall_median_ms: float | None = None
    cpu_median_ms: float | None = None
    tpm_commands: int | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return dict(self.__dict__)


def measure_status(tpmid: list[str], env: Mapping[str, str], device: Device, *,
                   runs: int) -> StatusResult:
    """Median wall and CPU time of ``tpmid status`` over ``runs`` runs (after one warm-up).

    ``env`` holds the config of an enrolled ``device``; its proxy counts the
    TPM commands the runs sent (expected: none).
    """
    argv = [*tpmid, "status"]
    try:
        _time_runs(argv, 1, env)
        device.proxy.reset()
        cpu: list[float] = []
        wall = _time_runs(argv, runs, env, cpu)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return StatusResult(measured=False, reason=str(e)[-500:])
    return StatusResult(measured=True, runs=runs, wall_median_ms=statistics.median(wall),
                        cpu_median_ms=statistics.median(cpu), tpm_commands=device.proxy.count)


# ----------------------------------------------------------------------------- handshake


def measure_handshake(tcti: str, proxy: TpmProxy, *, n: int, handle: int,
                      template: str = "H-2") -> dict[str, object]:
    """mTLS handshakes with the persistent key at ``handle`` (via ``tcti``) vs a software key.

    ``tcti`` must point at ``proxy`` so that the TPM commands per handshake are
    counted. Returns :meth:`tests.bench.handshakes.HandshakeBench.as_dict` plus the
    proxy's delay. The key is a persistent handle (nothing is loaded), so the
    only TPM command per handshake should be TPM2_Sign.
    """
    from tests.bench.handshakes import measure_handshakes
    from tpmid.tpm.connection import TpmConnection
    from tpmid.tpm.idevid import open_persistent

    with TpmConnection(tcti) as conn:
        key = open_persistent(conn, handle, expect_template=template)
        try:
            bench = measure_handshakes(key, n=n, proxy=proxy)
        finally:
            key.close()
    data = bench.as_dict()
    data["delay_ms"] = proxy.delay * 1000.0
    return data


# ----------------------------------------------------------------------------- daemon


def read_rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB (``/proc/PID/status``), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks (``/proc/PID/stat`` fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # The command name (field 2) may hold spaces and parentheses: split after it.
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class DaemonResult:
    """The daemon while idle: memory, CPU and TPM traffic over the sampling window."""

    measured: bool
    reason: str | None = None  # why not measured
    seconds: float = 0.0
    samples: int = 0
    rss_kb_max: int | None = None
    rss_kb_median: float | None = None
    cpu_ticks: int | None = None
    cpu_percent: float | None = None
    tpm_commands: int | None = None
    exit_code: int | None = None
    log_tail: str = ""

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return dict(self.__dict__)


class DaemonProbe:
    """``tpmid daemon`` for one enrolled device, sampled in a background thread."""

    def __init__(self, tpmid: list[str], env: Mapping[str, str], device: Device,
                 seconds: float, *, settle_timeout: float = 20.0) -> None:
        """Prepare to run the daemon with ``env`` (its config) for ``seconds`` of idle time."""
        self.tpmid = tpmid
        self.env = dict(env)
        self.device = device
        self.seconds = seconds
        self.settle_timeout = settle_timeout
        self.log_path = device.dir / "daemon.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._result = DaemonResult(measured=False, reason="not started")
        self._started_at = 0.0

    def start(self) -> None:
        """Start the daemon, wait until it has planned its renewals, then sample in a thread."""
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen([*self.tpmid, "daemon"], stdout=log, stderr=log,
                                          stdin=subprocess.DEVNULL, env=self.env,
                                          start_new_session=True)
        deadline = time.monotonic() + self.settle_timeout
        # The daemon logs its decision per identity ("ldevid: next renewal ...") once it
        # has read the store and planned; from then on it should only sleep.
        while "next renewal" not in self._log() and "next retry" not in self._log():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._result = DaemonResult(
                    measured=False, exit_code=self._proc.poll(), log_tail=self._log()[-1500:],
                    reason="tpmid daemon did not reach its idle state "
                    f"(exit {self._proc.poll()}); see its log")
                self.stop()
                return
            time.sleep(0.05)
        time.sleep(0.5)  # let start-up allocations settle before the baseline
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._sample, name="bench-daemon", daemon=True)
        self._thread.start()

    @property
    def sampling(self) -> bool:
        """True once the daemon reached its idle state and sampling has begun."""
        return self._thread is not None

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _sample(self) -> None:
        assert self._proc is not None
        pid = self._proc.pid
        self.device.proxy.reset()
        ticks0 = read_cpu_ticks(pid)
        t0 = time.monotonic()
        rss: list[int] = []
        end = t0 + self.seconds
        while True:
            value = read_rss_kb(pid)
            if value is None:
                break
            rss.append(value)
            now = time.monotonic()
            if now >= end:
                break
            time.sleep(min(1.0, end - now))
        elapsed = time.monotonic() - t0
        ticks1 = read_cpu_ticks(pid)
        alive = self._proc.poll() is None
        if not alive or ticks0 is None or ticks1 is None or not rss:
            self._result = DaemonResult(measured=False, exit_code=self._proc.poll(),
                                        reason="tpmid daemon exited while it was sampled",
                                        log_tail=self._log()[-1500:])
            return
        ticks = ticks1 - ticks0
        hz = os.sysconf("SC_CLK_TCK")
        self._result = DaemonResult(
            measured=True, seconds=elapsed, samples=len(rss), rss_kb_max=max(rss),
            rss_kb_median=statistics.median(rss), cpu_ticks=ticks,
            cpu_percent=100.0 * ticks / hz / elapsed if elapsed > 0 else None,
            tpm_commands=self.device.proxy.count)

    def finish(self) -> DaemonResult:
        """Wait for the sampling window to end, stop the daemon (SIGTERM) and return the result."""
        if self._thread is not None:
            self._thread.join()
        code = self.stop()
        self._result.exit_code = code
        self._result.log_tail = self._log()[-1500:]
        return self._result

    def stop(self) -> int | None:
        """SIGTERM the daemon (graceful stop) and reap it; returns its exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode
