"""Runnable benchmarks (`moe bench NAME` or `python -m benchmarks.NAME`); shared helpers below."""
import statistics
from typing import Sequence, Tuple


def quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    """(p25, median, p75) of per-round ratios: the median is the figure, the quartiles the noise left."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    p25, p50, p75 = statistics.quantiles(values, n=4)
    return p25, statistics.median(values), p75


DISPATCH_OPS = ("permute fwd", "permute bwd", "unpermute fwd", "unpermute bwd")


def dispatch_min_bytes(tokens: int, rows: int, d: int, element_size: int) -> dict:
    """Minimum bytes each dispatch op must move (every input element read once, every output element
    written once; index and gate-weight traffic not counted), T tokens, R permuted rows of d elements:
    permute fwd reads x (T d) and writes the buffer (R d); its backward the reverse; unpermute fwd
    reads y (R d) and writes out (T d); its backward reads grad_out (T d) and y (R d, for the
    gate-weight gradients) and writes grad_y (R d)."""
    t, r = tokens * d * element_size, rows * d * element_size
    return {"permute fwd": t + r, "permute bwd": r + t, "unpermute fwd": r + t, "unpermute bwd": t + 2 * r}
