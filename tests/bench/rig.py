"""The benchmark rig: simulated devices, the reference EST server, and timed steps.

* One TPM is manufactured per run (:func:`tpmid.testing.swtpm.manufacture`);
  every *device* is a fresh copy of it, started on its own loopback ports, with
  a counting :class:`~tpmid.testing.tpmproxy.TpmProxy` in front (optionally
  adding a fixed delay per TPM command). Both flows talk to the proxy; the
  check for transient objects left behind talks to the real swtpm, so it is
  not counted.
* One reference EST server *process* (``tpmid est-server run``) serves every
  device of both flows. Its directory gets one extra label, ``ldevid-basic``
  (same operator CA and profile as ``ldevid``, HTTP Basic instead of a client
  certificate), because the manual path cannot do mutual TLS with a TPM key.
* :meth:`Rig.run_step` runs one command as a user would (a subprocess), and
  records wall time, CPU time (user + sys of the command and every process it
  waited for, from ``getrusage(RUSAGE_CHILDREN)`` deltas), exit code, the TPM
  commands the proxy saw (and the latency it added), and the transient
  objects and sessions left in the TPM afterwards. With
  ``count_processes`` it runs under ``strace -f`` to count the programs
  executed; such runs are never timed.

Secrets (the IDevID Secret-Value, the Basic password) exist only in memory and
in the environment of the child processes; nothing here writes them to a file.
"""

from __future__ import annotations

import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tpmid.testing.swtpm import Swtpm, copy_state, manufacture
from tpmid.testing.tpmproxy import LatencyFunction, TpmProxy

REPO = Path(__file__).resolve().parents[2]  # the checkout (for python -m tests.bench...)
SERVER_START_TIMEOUT = 30.0
STEP_TIMEOUT = 180.0
# Follow forks, one output file per process, report successful and failed execve only.
STRACE_EXECVE = ("strace", "--seccomp-bpf", "-f", "-ff", "-qq", "-e", "trace=execve",
                 "-e", "signal=none")
_LISTENING = re.compile(r"^listening on https://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)/",
                        re.MULTILINE)

# Environment variables the bench passes secrets in (never written anywhere).
ENV_IDEVID_SECRET = "TPMID_BENCH_IDEVID_SECRET"
ENV_BASIC_USER = "TPMID_BENCH_BASIC_USER"
ENV_BASIC_PASSWORD = "TPMID_BENCH_BASIC_PASSWORD"
BASIC_USER = "bench-device"
BASIC_LABEL = "ldevid-basic"


class BenchFailure(RuntimeError):
    """The benchmark rig itself failed (swtpm, server, a missing tool); not a measurement."""


@dataclass
class StepResult:
    """One command run as a user runs it, and what it did to the TPM."""

    flow: str  # "tpmid" | "manual"
    step: str  # "provision" | "enroll" | "renew" | ...
    command: str  # shown in the report
    rc: int
    seconds: float
    timed: bool
    tpm_commands: int
    tpm_by_name: dict[str, int]
    transient_objects: int | None
    sessions: int | None  # loaded + context-saved sessions (both hold a session slot)
    processes: int | None = None  # programs executed (strace execve), counting runs only
    programs: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # tail of stderr when rc != 0
    cpu_seconds: float | None = None  # user + sys of the command and its children (timed runs)
    tpm_wait_seconds: float = 0.0  # latency the proxy added (delay or profile)

    @property
    def ok(self) -> bool:
        """The command exited 0."""
        return self.rc == 0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return dict(self.__dict__)


@dataclass
class Device:
    """A factory-fresh simulated TPM behind a counting proxy, with a working directory."""

    name: str
    dir: Path
    swtpm: Swtpm
    proxy: TpmProxy

    @property
    def tcti(self) -> str:
        """The TCTI the flows use (the proxy's)."""
        return self.proxy.tcti

    @property
    def direct_tcti(self) -> str:
        """The real swtpm's TCTI (for checks that must not be counted)."""
        return self.swtpm.tcti

    def close(self) -> None:
        """Stop the proxy and the swtpm."""
        try:
            self.proxy.stop()
        finally:
            self.swtpm.stop()


@dataclass
class EstServerProcess:
    """A running ``tpmid est-server run`` and what clients need to talk to it."""

    dir: Path
    host: str
    port: int
    process: subprocess.Popen[bytes]

    def url(self, label: str) -> str:
        """``https://HOST:PORT/.well-known/est/<label>``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}/.well-known/est/{label}"

    @property
    def base(self) -> str:
        """``https://HOST:PORT/.well-known/est`` (the manual scripts append label/op)."""
        return self.url("").rstrip("/")

    @property
    def tls_ca(self) -> Path:
        return self.dir / "tls-ca.pem"

    @property
    def manufacturer_ca(self) -> Path:
        return self.dir / "manufacturer-ca.pem"

    @property
    def operator_ca(self) -> Path:
        return self.dir / "operator-ca.pem"

    def stop(self) -> int | None:
        """SIGTERM (graceful) and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        return self.process.returncode


def parse_strace_execs(paths: Sequence[Path]) -> Counter[str]:
    """Programs successfully executed, from ``strace -ff -e trace=execve`` output files.

    Counts ``execve`` calls that returned 0 (a failed PATH lookup returns -1 and
    is not a process), by program base name. An execve split by strace into
    ``<unfinished ...>`` and ``<... execve resumed>`` is counted once.
    """
    programs: Counter[str] = Counter()
    call = re.compile(r'execve\("([^"]*)"')
    for path in paths:
        last: str | None = None
        for line in path.read_text(errors="replace").splitlines():
            m = call.search(line)
            if m:
                last = m.group(1)
            if "execve" in line and re.search(r"\)\s*=\s*0\s*$", line) and last is not None:
                programs[os.path.basename(last)] += 1
                last = None
    return programs


def _count_handles(tcti: str, kind: str) -> int | None:
    """Handles of ``kind`` (``handles-transient``...) via tpm2-tools, None if it failed."""
    proc = subprocess.run(["tpm2_getcap", "-T", tcti, kind], capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        return None
    return sum(1 for line in proc.stdout.splitlines() if line.strip().startswith("- 0x"))


def _sessions(tcti: str) -> int | None:
    loaded = _count_handles(tcti, "handles-loaded-session")
    saved = _count_handles(tcti, "handles-saved-session")
    return None if loaded is None or saved is None else loaded + saved


class Rig:
    """The manufactured TPM template, the EST server, and the devices of one run."""

    def __init__(self, workdir: Path, base_env: Mapping[str, str], *,
                 server_cprofile: Path | None = None) -> None:
        """Prepare a rig in ``workdir``; ``base_env`` is the environment children start from.

        With ``server_cprofile``, the EST server runs under
        :mod:`tests.bench.cprofile_threads` (every thread profiled) and writes its
        profile there when it stops.
        """
        self.workdir = workdir
        self.server_cprofile = server_cprofile
        # Nothing from the caller's shell may steer a flow to another TPM, config or
        # OpenSSL set-up: each flow gets exactly what the bench gives it.
        self.base_env = {k: v for k, v in base_env.items()
                         if not k.startswith(("TPMID_", "TPM2TOOLS_", "TPM2OPENSSL_", "TSS2_"))
                         and k != "OPENSSL_CONF"}
        self.template: Path | None = None
        self.server: EstServerProcess | None = None
        self.idevid_secret = ""
        self.basic_password = secrets.token_urlsafe(24)
        self._devices: list[Device] = []
        self._count = 0
        self._lock = threading.Lock()  # devices are made from several threads

    # -- set-up --------------------------------------------------------------------------

    def start(self) -> Rig:
        """Manufacture the template TPM and start the EST server."""
        self.template = manufacture(self.workdir / "tpm-template")
        self.server = self._start_server()
        return self

    def _start_server(self) -> EstServerProcess:
        import yaml

        from tpmid.server import init_server_dir
        from tpmid.server.auth import hash_secret

        res = init_server_dir(self.workdir / "est-server", alg="ecc-p256")
        self.idevid_secret = res.secret
        data = yaml.safe_load(res.config_path.read_text())
        # The manual path's LDevID label: the ldevid label's CA and profile, Basic auth
        # (a server label has exactly one auth policy). Only the salted hash is stored.
        ldevid = data["labels"]["ldevid"]
        data["labels"][BASIC_LABEL] = {
            "ca": ldevid["ca"], "profile": ldevid["profile"], "lifetime": ldevid["lifetime"],
            "auth": {"basic": {"username": BASIC_USER, "hash": hash_secret(self.basic_password)}},
        }
        res.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        out = open(res.dir / "run.stdout", "wb")  # noqa: SIM115 - owned by the child
        err = open(res.dir / "run.log", "wb")  # noqa: SIM115
        try:
            # python -m cProfile would see only the main thread; the server answers
            # each connection in a thread of its own.
            profile = ([] if self.server_cprofile is None else
                       ["-m", "tests.bench.cprofile_threads", str(self.server_cprofile.resolve())])
            proc = subprocess.Popen(
                [sys.executable, *profile, "-m", "tpmid.cli", "est-server", "run",
                 "--dir", str(res.dir), "--port", "0"], cwd=REPO,
                stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env={**self.base_env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        finally:
            out.close()
            err.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            m = _LISTENING.search((res.dir / "run.stdout").read_text(errors="replace"))
            if m:
                return EstServerProcess(dir=res.dir, host=m.group("host").strip("[]"),
                                        port=int(m.group("port")), process=proc)
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                tail = (res.dir / "run.log").read_text(errors="replace")[-2000:]
                raise BenchFailure(f"tpmid est-server run did not start (exit {proc.returncode})"
                                   f":\n{tail}")
            time.sleep(0.02)

    def device(self, label: str, delay: float = 0.0,
               latency: LatencyFunction | None = None) -> Device:
        """A factory-fresh device (a copy of the template TPM) behind a proxy.

        The proxy waits ``delay`` seconds plus ``latency(code, frame)`` per command.
        """
        if self.template is None:
            raise BenchFailure("the rig is not started")
        with self._lock:
            self._count += 1
            name = f"{self._count:03d}-{label}"
        d = self.workdir / "devices" / name
        copy_state(self.template, d / "tpm")
        sim = Swtpm(d / "tpm").start()
        try:
            proxy = TpmProxy(sim.host, sim.port, sim.ctrl_port, delay=delay,
                             latency=latency).start()
        except BaseException:
            sim.stop()
            raise
        dev = Device(name=name, dir=d, swtpm=sim, proxy=proxy)
        with self._lock:
            self._devices.append(dev)
        return dev

    def release(self, device: Device) -> None:
        """Stop a device that is no longer needed (its files stay for inspection)."""
        device.close()
        with self._lock:
            if device in self._devices:
                self._devices.remove(device)

    def close(self) -> None:
        """Stop every device and the server."""
        with self._lock:
            devices = list(self._devices)
        for dev in devices:
            try:
                dev.close()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                pass
        self._devices.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None

    # -- running steps -------------------------------------------------------------------

    def run_step(self, device: Device, *, flow: str, step: str, argv: Sequence[str],
                 env: Mapping[str, str], cwd: Path, display: str,
                 count_processes: bool = False) -> StepResult:
        """Run ``argv`` once for ``device`` and record time, TPM commands and leftovers."""
        trace_prefix = device.dir / "strace" / f"{flow}-{step}"
        cmd = list(argv)
        if count_processes:
            trace_prefix.parent.mkdir(parents=True, exist_ok=True)
            # -ff: one file per process, so no interleaved "unfinished" lines to stitch.
            # --seccomp-bpf: only execve stops the tracee, the rest runs at full speed.
            cmd = [*STRACE_EXECVE, "-o", str(trace_prefix), *cmd]
        device.proxy.reset()
        # RUSAGE_CHILDREN grows when a child is reaped: the delta is this command plus
        # every descendant it waited for. Only meaningful when no other thread reaps a
        # child meanwhile, which holds for the timed steps (they run alone).
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True,
                                  timeout=STEP_TIMEOUT, check=False)
            rc, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stderr = -1, (e.stderr or b"") + f"\n(timed out after {STEP_TIMEOUT:.0f} s)".encode()
        seconds = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        stats = device.proxy.stats()
        by_name = dict(stats["by_name"])  # type: ignore[call-overload]
        processes: int | None = None
        programs: dict[str, int] = {}
        if count_processes:
            files = sorted(trace_prefix.parent.glob(trace_prefix.name + ".*"))
            counted = parse_strace_execs(files)
            processes, programs = sum(counted.values()), dict(sorted(counted.items()))
        error = None
        if rc != 0:
            text = stderr.decode(errors="replace").strip().splitlines()
            error = " / ".join(text[-4:]) or f"exit {rc}"
        return StepResult(
            flow=flow, step=step, command=display, rc=rc, seconds=seconds,
            timed=not count_processes, tpm_commands=int(stats["count"]),  # type: ignore[call-overload]
            tpm_by_name=by_name,
            transient_objects=_count_handles(device.direct_tcti, "handles-transient"),
            sessions=_sessions(device.direct_tcti),
            processes=processes, programs=programs, error=error,
            cpu_seconds=None if count_processes else cpu,
            tpm_wait_seconds=float(stats["waited_s"]),  # type: ignore[arg-type]
        )
