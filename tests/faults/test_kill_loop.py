"""A short run of the random-SIGKILL loop (``scripts/kill-loop`` runs 200 iterations)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.bench.kill_loop import run


@pytest.mark.slow
def test_renewals_killed_at_random_moments_leave_every_identity_intact(tmp_path: Path) -> None:
    outcomes = run(8, random.randrange(1 << 30), tmp_path, quiet=True)
    assert sum(outcomes.values()) == 8
