"""Small, pure statistics for the benchmark: medians, nearest-rank percentiles, ratios.

No I/O here; :mod:`tests.bench.report` formats what these return.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile (0 < q <= 1) of ``values``.

    Nearest rank (the smallest value with at least ``q`` of the samples at or
    below it) never interpolates, so p95 of 20 samples is the 19th smallest: a
    value that was really measured.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < q <= 1:
        raise ValueError("q must be in (0, 1]")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Summary:
    """Median, p95, min and max of a set of samples (same unit as the samples)."""

    n: int
    median: float
    p95: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        """The summary of ``values``, or None when there are none."""
        if not values:
            return None
        return cls(n=len(values), median=statistics.median(values), p95=percentile(values, 0.95),
                   minimum=min(values), maximum=max(values))

    def as_dict(self) -> dict[str, float | int]:
        """JSON-friendly form."""
        return {"n": self.n, "median": self.median, "p95": self.p95, "min": self.minimum,
                "max": self.maximum}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def span(values: Sequence[int]) -> tuple[int, int] | None:
    """``(min, max)`` of integer counts, None when there are none."""
    if not values:
        return None
    return min(values), max(values)
