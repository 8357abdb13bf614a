"""The benchmark suite behind ``scripts/bench`` (issue 6): tpmid vs the manual path.

Modules: :mod:`~tpmid.testing.bench.rig` (simulated devices, the EST server,
timed steps), :mod:`~tpmid.testing.bench.flows` (the tpmid CLI flow and the
manual tpm2-tools/openssl/curl flow), :mod:`~tpmid.testing.bench.probes`
(start-up, handshakes, idle daemon), :mod:`~tpmid.testing.bench.model` and
:mod:`~tpmid.testing.bench.stats` (results), :mod:`~tpmid.testing.bench.report`
(table, targets, Markdown, JSON), :mod:`~tpmid.testing.bench.run` (the order
of a run and ``main``). Method and results: ``docs/benchmarks.md``.

Not part of the device-side library: nothing under ``tpmid/`` imports it.
"""

from __future__ import annotations
