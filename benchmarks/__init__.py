"""Runnable benchmarks (`moe bench NAME` or `python -m benchmarks.NAME`); shared helpers below."""
import statistics
from typing import Sequence, Tuple


def quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    """(p25, median, p75) of per-round ratios: the median is the figure, the quartiles the noise left."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    p25, p50, p75 = statistics.quantiles(values, n=4)
    return p25, statistics.median(values), p75
