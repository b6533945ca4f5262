"""The device's measured matmul rate: the denominator of MFU."""
from __future__ import annotations

import time

import torch


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The dense matmul rate this device reaches, measured once, as MFU's denominator.

    Measuring (rather than a datasheet figure) keeps MFU meaningful on any CPU; on GPUs the measured
    rate is what a well-tuned GEMM reaches, so MFU reads as a fraction of achievable throughput.
    """
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 3 if device.type == "cpu" else 20
    torch.matmul(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)
