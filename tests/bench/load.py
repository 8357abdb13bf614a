"""The reference EST server under load: many devices enrolling at once (``scripts/bench``).

:func:`run_load` drives the rig's ``tpmid est-server run`` process with
``clients`` concurrent clients for ``seconds``, spread over ``workers`` worker
processes (``python -m tests.bench.load``, threads inside), and samples the
server process meanwhile: VmRSS from ``/proc/PID/status`` and utime + stime
from ``/proc/PID/stat`` at both ends of the window.

Each client is like a device: a software P-256 key and one CSR made up front
(before the window opens), then ``simpleenroll`` on the ``ldevid-basic`` label
with HTTP Basic, over a new TLS connection every time (``http.client`` +
``ssl``, trusting the server's ``tls-ca.pem``), until the window closes. Every
request has a timeout and the whole run a deadline, so the load stops by itself.
The load generator is not tpmid: it measures the server, not the client.

The Basic password reaches the workers on their standard input, never argv or
the environment. A worker's protocol: one JSON line in (its job), ``ready``
out once its CSRs are made, ``go`` in, one JSON line out (its results).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.stats import percentile

REPO = Path(__file__).resolve().parents[2]
REQUEST_TIMEOUT = 15.0  # one enrollment, connect to last byte
READY_TIMEOUT = 60.0  # workers making their keys and CSRs
STOP_GRACE = REQUEST_TIMEOUT + 15.0  # after the window: in-flight requests finish or time out


@dataclass
class LoadResult:
    """What the server did under ``clients`` concurrent enrolling clients."""

    measured: bool
    reason: str | None = None
    clients: int = 0
    workers: int = 0
    seconds: float = 0.0  # the window, as measured
    enrollments: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    rate_per_s: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    server_rss_kb_start: int | None = None
    server_rss_kb_max: int | None = None
    server_cpu_s: float | None = None
    server_cpu_ms_per_enrollment: float | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- the worker


def _make_csrs(n: int) -> list[bytes]:
    """``n`` CSRs (base64 DER, as EST sends them), each for its own new P-256 key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"load-{os.getpid()}-{i}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        out.append(base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)))
    return out


def _client(job: dict[str, Any], csr: bytes, ctx: ssl.SSLContext, deadline: float,
            latencies: list[float], errors: Counter[str], lock: threading.Lock) -> None:
    auth = base64.b64encode(f"{job['user']}:{job['password']}".encode()).decode()
    headers = {"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64",
               "Authorization": f"Basic {auth}"}
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        conn = http.client.HTTPSConnection(job["host"], job["port"], context=ctx,
                                           timeout=job["timeout"])
        kind = None
        try:
            conn.request("POST", job["path"], body=csr, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or not body:
                kind = f"HTTP {resp.status}"
        except (OSError, http.client.HTTPException) as e:
            kind = type(e).__name__
        finally:
            conn.close()
        elapsed = (time.perf_counter() - t0) * 1000.0
        with lock:
            if kind is None:
                latencies.append(elapsed)
            else:
                errors[kind] += 1


def worker_main() -> int:
    """One worker process: read the job, make CSRs, say ready, wait for go, load, report."""
    job = json.loads(sys.stdin.readline())
    csrs = _make_csrs(job["clients"])
    ctx = ssl.create_default_context(cafile=job["cafile"])
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + job["seconds"]
    threads = [threading.Thread(target=_client, args=(job, csr, ctx, deadline, latencies, errors,
                                                      lock), daemon=True) for csr in csrs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + job["timeout"] + 5.0)
    with lock:
        print(json.dumps({"latencies_ms": latencies, "errors": dict(errors),
                          "stuck_threads": sum(t.is_alive() for t in threads)}), flush=True)
    return 0


# ----------------------------------------------------------------------------- the driver


def _read_rss_kb(pid: int) -> int | None:
    from tests.bench.probes import read_rss_kb

    return read_rss_kb(pid)


def _read_cpu_ticks(pid: int) -> int | None:
    from tests.bench.probes import read_cpu_ticks

    return read_cpu_ticks(pid)


def run_load(*, server_pid: int, host: str, port: int, path: str, cafile: Path, user: str,
             password: str, clients: int, seconds: float, workers: int = 2,
             progress: Callable[[str], None] = lambda _m: None) -> LoadResult:
    """Enroll from ``clients`` clients for ``seconds`` against the server process ``server_pid``."""
    workers = max(1, min(workers, clients))
    shares = [clients // workers + (1 if i < clients % workers else 0) for i in range(workers)]
    procs: list[subprocess.Popen[str]] = []
    result = LoadResult(measured=False, clients=clients, workers=workers)
    try:
        for share in shares:
            p = subprocess.Popen([sys.executable, "-m", "tests.bench.load"], cwd=REPO,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdin is not None
            p.stdin.write(json.dumps({"host": host, "port": port, "path": path,
                                      "cafile": str(cafile), "user": user, "password": password,
                                      "clients": share, "seconds": seconds,
                                      "timeout": REQUEST_TIMEOUT}) + "\n")
            p.stdin.flush()
        if not all(_wait_line(p, "ready", READY_TIMEOUT) for p in procs):
            result.reason = "a load worker did not get ready: " + _stderr_tail(procs)
            return result

        rss: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                v = _read_rss_kb(server_pid)
                if v is not None:
                    rss.append(v)
                stop.wait(0.25)

        result.server_rss_kb_start = _read_rss_kb(server_pid)
        sampler = threading.Thread(target=sample, name="bench-load-rss", daemon=True)
        ticks0 = _read_cpu_ticks(server_pid)
        t0 = time.monotonic()
        sampler.start()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        progress(f"load: {clients} clients in {workers} workers for {seconds:g} s")
        outputs = []
        for p in procs:
            try:
                out, _err = p.communicate(timeout=max(0.0, t0 + seconds + STOP_GRACE
                                                      - time.monotonic()))
            except subprocess.TimeoutExpired:
                result.reason = "a load worker missed the run's deadline"
                return result
            outputs.append(out)
        elapsed = time.monotonic() - t0
        ticks1 = _read_cpu_ticks(server_pid)
        stop.set()
        sampler.join()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    for p, out in zip(procs, outputs, strict=True):
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            result.reason = f"a load worker failed (exit {p.returncode})"
            return result
        data = json.loads(lines[-1])
        latencies += data["latencies_ms"]
        errors.update(data["errors"])
        if data["stuck_threads"]:
            errors["client still running at the deadline"] += data["stuck_threads"]
    result.measured = True
    result.seconds = elapsed
    result.enrollments = len(latencies)
    result.errors = sum(errors.values())
    result.error_kinds = dict(errors)
    result.rate_per_s = len(latencies) / elapsed if elapsed > 0 else None
    if latencies:
        result.latency_p50_ms = percentile(latencies, 0.5)
        result.latency_p99_ms = percentile(latencies, 0.99)
        result.latency_max_ms = max(latencies)
    result.server_rss_kb_max = max(rss) if rss else None
    if ticks0 is not None and ticks1 is not None:
        result.server_cpu_s = (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK")
        if latencies:
            result.server_cpu_ms_per_enrollment = result.server_cpu_s * 1000.0 / len(latencies)
    return result


def _wait_line(p: subprocess.Popen[str], expected: str, timeout: float) -> bool:
    """True when ``p`` prints ``expected`` within ``timeout`` seconds (a reader thread)."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(p.stdout.readline() if p.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    return bool(got) and got[0].strip() == expected


def _stderr_tail(procs: list[subprocess.Popen[str]]) -> str:
    for p in procs:
        if p.poll() is not None and p.stderr is not None:
            return p.stderr.read()[-500:]
    return "(no output)"


if __name__ == "__main__":
    raise SystemExit(worker_main())
