"""The benchmark suite behind ``scripts/bench`` (issue 6): tpmid vs the manual path.

Modules: :mod:`~tests.bench.rig` (simulated devices, the EST server,
timed steps), :mod:`~tests.bench.flows` (the tpmid CLI flow and the
manual tpm2-tools/openssl/curl flow), :mod:`~tests.bench.probes`
(start-up, handshakes, idle daemon), :mod:`~tests.bench.model` and
:mod:`~tests.bench.stats` (results), :mod:`~tests.bench.report`
(table, targets, Markdown, JSON), :mod:`~tests.bench.run` (the order
of a run and ``main``). Method and results: ``docs/benchmarks.md``.

Not installed: it lives in the test tree (``python -m tests.bench`` from the checkout,
which is what ``scripts/bench`` runs), and nothing under ``tpmid/`` imports it.
"""

from __future__ import annotations
