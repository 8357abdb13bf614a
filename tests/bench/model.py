"""What one benchmark run measured, as plain data (no I/O).

:class:`BenchResult` is filled by :mod:`tests.bench.run` and read by
:mod:`tests.bench.report`; the helpers here select and summarise the
step results (only successful, timed runs count towards times).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.bench.flows import STEPS, MtlsAttempt
from tests.bench.load import LoadResult
from tests.bench.probes import DaemonResult, StartupResult, StatusResult
from tests.bench.rig import StepResult
from tests.bench.stats import Summary, span
from tests.bench.sysinfo import SystemInfo

FLOWS = ("tpmid", "manual")
# The columns of a run: plain swtpm, swtpm + a fixed delay per command, swtpm + the
# discrete-TPM latency profile (tpmid.testing.tpmproxy.DISCRETE_TPM).
KINDS = ("plain", "delayed", "discrete")


@dataclass(frozen=True)
class BenchOptions:
    """How much to measure."""

    devices: int = 20
    handshakes: int = 50
    delay_ms: float = 20.0
    idle_seconds: float = 60.0
    startup_runs: int = 10
    status_runs: int = 10
    profile: str | None = "discrete"  # the third column's latency profile; None: no column
    load_clients: int = 50
    load_seconds: float = 60.0
    load_workers: int = 2
    quick: bool = False

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return dict(self.__dict__)


@dataclass
class FlowColumn:
    """Every device of one column (a proxy delay or profile): both flows' steps, per device."""

    delay_ms: float
    profile: str | None = None
    runs: dict[str, list[list[StepResult]]] = field(
        default_factory=lambda: {flow: [] for flow in FLOWS})

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`."""
        return "discrete" if self.profile else "delayed" if self.delay_ms else "plain"

    @property
    def label(self) -> str:
        """``swtpm``, ``swtpm + 20 ms/cmd`` or ``swtpm + discrete-TPM profile``."""
        if self.profile:
            return f"swtpm + {self.profile}-TPM profile"
        return "swtpm" if not self.delay_ms else f"swtpm + {self.delay_ms:g} ms/cmd"

    def step_results(self, flow: str, step: str) -> list[StepResult]:
        """Successful, timed results of ``step`` for ``flow``."""
        return [r for device in self.runs[flow] for r in device
                if r.step == step and r.ok and r.timed]

    def times_ms(self, flow: str, step: str) -> list[float]:
        """Wall times of ``step`` in milliseconds."""
        return [r.seconds * 1000.0 for r in self.step_results(flow, step)]

    def cpu_ms(self, flow: str, step: str) -> list[float]:
        """CPU time (user + sys, the command and its children) of ``step`` in milliseconds."""
        return [r.cpu_seconds * 1000.0 for r in self.step_results(flow, step)
                if r.cpu_seconds is not None]

    def complete_devices(self, flow: str) -> list[list[StepResult]]:
        """Devices on which every step of ``flow`` succeeded."""
        return [d for d in self.runs[flow]
                if [r.step for r in d if r.ok] == list(STEPS)]

    def flow_times_ms(self, flow: str) -> list[float]:
        """Per device, the sum of the three steps (devices where all succeeded)."""
        return [sum(r.seconds for r in d) * 1000.0 for d in self.complete_devices(flow)]

    def flow_tpm_wait_ms(self, flow: str) -> list[float]:
        """Per device, the latency the proxy added over the three steps (delay or profile)."""
        return [sum(r.tpm_wait_seconds for r in d) * 1000.0 for d in self.complete_devices(flow)]

    def tpm_commands(self, flow: str, step: str) -> list[int]:
        """TPM commands the proxy counted for ``step``."""
        return [r.tpm_commands for r in self.step_results(flow, step)]

    def flow_tpm_commands(self, flow: str) -> list[int]:
        """Per device, the TPM commands of the three steps together."""
        return [sum(r.tpm_commands for r in d) for d in self.complete_devices(flow)]

    def leftovers(self, flow: str) -> tuple[int | None, int | None]:
        """Most transient objects and sessions left after any step of ``flow`` (None: unknown)."""
        results = [r for d in self.runs[flow] for r in d]
        objs = [r.transient_objects for r in results if r.transient_objects is not None]
        sess = [r.sessions for r in results if r.sessions is not None]
        return (max(objs) if objs else None), (max(sess) if sess else None)

    def failures(self) -> list[StepResult]:
        """Every failed step."""
        return [r for flow in FLOWS for d in self.runs[flow] for r in d if not r.ok]

    def as_dict(self) -> dict[str, Any]:
        """Summaries per flow and step, with the raw times (JSON)."""
        out: dict[str, Any] = {"delay_ms": self.delay_ms, "profile": self.profile,
                               "kind": self.kind, "label": self.label}
        for flow in FLOWS:
            steps: dict[str, Any] = {}
            for step in STEPS:
                results = self.step_results(flow, step)
                summary = Summary.of(self.times_ms(flow, step))
                steps[step] = {
                    "command": results[0].command if results else None,
                    "time_ms": summary.as_dict() if summary else None,
                    "times_ms": [round(t, 2) for t in self.times_ms(flow, step)],
                    "cpu_ms": [round(t, 2) for t in self.cpu_ms(flow, step)],
                    "tpm_wait_ms": [round(r.tpm_wait_seconds * 1000.0, 2) for r in results],
                    "tpm_commands": span(self.tpm_commands(flow, step)),
                    "tpm_commands_by_name": results[0].tpm_by_name if results else {},
                    "transient_objects_max": max((r.transient_objects or 0 for r in results),
                                                 default=None),
                    "sessions_max": max((r.sessions or 0 for r in results), default=None),
                }
            total = Summary.of(self.flow_times_ms(flow))
            objs, sess = self.leftovers(flow)
            out[flow] = {
                "devices": len(self.runs[flow]),
                "devices_complete": len(self.complete_devices(flow)),
                "steps": steps,
                "flow_time_ms": total.as_dict() if total else None,
                "flow_tpm_wait_ms": [round(t, 2) for t in self.flow_tpm_wait_ms(flow)],
                "flow_tpm_commands": span(self.flow_tpm_commands(flow)),
                "transient_objects_max": objs,
                "sessions_max": sess,
                "failures": [r.as_dict() for d in self.runs[flow] for r in d if not r.ok],
            }
        return out


@dataclass
class BenchResult:
    """Everything one run of ``scripts/bench`` measured."""

    options: BenchOptions
    system: SystemInfo
    startup: StartupResult | None = None
    renew_command: str = ""
    counting: dict[str, list[StepResult]] = field(default_factory=dict)
    columns: list[FlowColumn] = field(default_factory=list)
    handshakes: list[dict[str, object]] = field(default_factory=list)
    daemon: DaemonResult | None = None
    status: StatusResult | None = None
    load: LoadResult | None = None
    mtls_attempts: list[MtlsAttempt] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def column(self, kind: str) -> FlowColumn | None:
        """The column of ``kind`` (one of :data:`KINDS`), None if it was not run."""
        for c in self.columns:
            if c.kind == kind:
                return c
        return None

    def handshake(self, kind: str) -> dict[str, object] | None:
        """The handshake result measured in the ``plain`` or ``delayed`` column."""
        for h in self.handshakes:
            if kind in ("plain", "delayed") and bool(h.get("delay_ms")) == (kind == "delayed"):
                return h
        return None

    def processes(self, flow: str) -> int | None:
        """Programs executed by the whole flow (strace counting pass), None if not counted."""
        steps = self.counting.get(flow, [])
        if [r.step for r in steps if r.ok] != list(STEPS):
            return None
        counts = [r.processes for r in steps]
        return None if any(c is None for c in counts) else sum(c or 0 for c in counts)

    def failed(self) -> bool:
        """True when a step failed or a measurement could not be made."""
        return bool(self.errors) or any(c.failures() for c in self.columns) or any(
            not r.ok for steps in self.counting.values() for r in steps) or (
            self.status is not None and not self.status.measured)
