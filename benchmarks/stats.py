"""Summaries of timing samples and how they are written: medians, p90, milliseconds and MB/s.

Pure functions on lists of floats, so the table and the targets can be checked on fixed inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MB", "Summary", "format_rate", "format_seconds", "percentile"]

#: One megabyte as the table counts it (10**6 bytes, as ``dd`` and network tools do).
MB = 1_000_000


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` with linear interpolation between order statistics.

    The same definition as numpy's default (``method="linear"``): the median of an even count is the mean of
    the two middle values, and p90 of ten samples lies between the 9th and the 10th.

    Raises:
        ValueError: ``values`` is empty or ``q`` is outside 0-100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """The shape of one row's samples (seconds).

    Attributes:
        n: How many samples.
        median: The median.
        p90: The 90th percentile: nine samples in ten were at least this fast.
        minimum: The fastest sample.
        maximum: The slowest sample.
    """

    n: int
    median: float
    p90: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        """Summarize ``samples``.

        Raises:
            ValueError: No samples.
        """
        return cls(n=len(samples), median=percentile(samples, 50), p90=percentile(samples, 90),
                   minimum=min(samples), maximum=max(samples))


def format_seconds(seconds: float) -> str:
    """A duration for the table: ``1.17 s``, ``193 ms``, ``14.2 ms``, ``0.38 ms``."""
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1000
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def format_rate(bytes_per_second: float) -> str:
    """A throughput for the table in MB/s (10**6 bytes): ``612 MB/s``, ``27.4 MB/s``, ``0.85 MB/s``."""
    rate = bytes_per_second / MB
    if rate >= 100:
        return f"{rate:.0f} MB/s"
    if rate >= 10:
        return f"{rate:.1f} MB/s"
    return f"{rate:.2f} MB/s"
