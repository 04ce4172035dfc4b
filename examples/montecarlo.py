"""Helper module for examples/pi.py: it travels in the archive because pi.py imports it."""

from __future__ import annotations

import random


def estimate_pi(samples: int, seed: int) -> float:
    """Monte Carlo estimate of pi from ``samples`` random points."""
    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples
