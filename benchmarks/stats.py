"""Percentiles and units the benches' figures share."""

from __future__ import annotations

import math


def pct(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``xs`` (linear between the order statistics); None for none."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds
