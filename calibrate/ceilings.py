"""The machine's measured ceilings, taken in the same run as the sweeps so the figures are comparable.

- copy bandwidth: ``dst.copy_(src)`` of a ``nbytes`` tensor on the device; reported as bytes copied per second
  (each byte is read once and written once). The decode step's effective KV read rate is compared with it.
- GEMM throughput: a square ``n x n x n`` matmul in the calibration dtype; reported as FLOP/s (2 n^3 per matmul).
  The prefill per-token cost is compared with it.

Both time ``repeats`` calls after one untimed warm-up call. A ceiling is the best the machine did: it is computed
from the fastest call (``bytes_per_s`` / ``flops_per_s``); the median is reported next to it. On a shared machine
the median ceiling can fall below a transfer measured a minute later, which the best-of-N does not.
"""

from __future__ import annotations

import numpy as np
import torch

from calibrate.device import StepTimer
from engine.model.loader import resolve_dtype


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 7) -> dict:
    """{"nbytes", "best_s", "median_s", "bytes_per_s" (best), "median_bytes_per_s", "spread"} of copying ``nbytes``
    on ``device`` (torch, current threads). ``nbytes`` defaults to 64 MiB on CPU, 1 GiB on CUDA."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else 64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    timer = StepTimer(device)
    dst.copy_(src)
    times = np.array([timer(lambda: dst.copy_(src)) for _ in range(repeats)])
    med = float(np.median(times))
    best = float(times.min())
    return {"nbytes": nbytes, "best_s": best, "median_s": med, "bytes_per_s": nbytes / best,
            "median_bytes_per_s": nbytes / med, "spread": float(np.median(np.abs(times - med)) / med)}


def gemm_flops(device: torch.device, dtype: str, n: int | None = None, repeats: int = 5) -> dict:
    """{"n", "dtype", "best_s", "median_s", "flops_per_s" (best), "median_flops_per_s"} of an n x n x n matmul
    (n: 1024 on CPU, 8192 on CUDA by default)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    dt = resolve_dtype(dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    timer = StepTimer(device)
    torch.matmul(a, b)
    times = np.array([timer(lambda: torch.matmul(a, b)) for _ in range(repeats)])
    med = float(np.median(times))
    best = float(times.min())
    return {"n": n, "dtype": dtype, "best_s": best, "median_s": med, "flops_per_s": 2 * n**3 / best,
            "median_flops_per_s": 2 * n**3 / med}
