"""moe/metrics/speed.py: the measured matmul rate is a positive, finite number of FLOP/s."""
import math

import torch

from moe.metrics.speed import measure_peak_flops


def test_peak_flops_is_measured():
    rate = measure_peak_flops(torch.device("cpu"), torch.float32)
    assert math.isfinite(rate) and 1e6 < rate < 1e15
