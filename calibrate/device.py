"""Where a calibration runs and how it times things: device checks, step timers, the environment record.

Timing: on CPU a step is timed with ``time.perf_counter`` around the call (the runner returns only after the work is
done). On CUDA a pair of ``torch.cuda.Event(enable_timing=True)`` brackets the call on the current stream, then
``torch.cuda.synchronize()`` waits for the GPU and ``elapsed_time`` gives the device-side duration (host launch gaps
inside the step included, queueing before it excluded). Python's garbage collector is paused while timing.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from calibrate import CalibrationError

DTYPES = ("bf16", "fp32", "fp16")


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> torch device.

    Raises `CalibrationError` for an unknown device kind or when CUDA is asked for and this torch / machine has none.
    """
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise CalibrationError(f"unknown device {device!r}: expected 'cpu' or 'cuda' (or 'cuda:N')")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise CalibrationError(f"device {device!r} asked for, but {why} (torch {torch.__version__}); "
                                   "use --device cpu")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CalibrationError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    return torch.device("cpu")


def check_dtype(dtype: str, device: torch.device) -> str:
    """Validate ``dtype`` (bf16 / fp32 / fp16). Raises `CalibrationError` for others, and for fp16 on CPU."""
    if dtype not in DTYPES:
        raise CalibrationError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "fp16" and device.type == "cpu":
        raise CalibrationError("fp16 is not supported on CPU here; use bf16 or fp32")
    return dtype


class StepTimer:
    """Times one call on ``device``: ``seconds = timer(fn)``. CUDA uses events + synchronize (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                self._start.record()
                fn()
                self._end.record()
                torch.cuda.synchronize(self.device)
                return self._start.elapsed_time(self._end) / 1e3  # ms -> s
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        finally:
            if gc_was_on:
                gc.enable()


def device_name(device: torch.device) -> str:
    """GPU name from torch, or the CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision(cwd: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the checkout this code runs from (+ ``-dirty`` with local changes), or ``unknown``."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=where, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=where,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, dtype: str) -> dict:
    """What a measurement depends on: device, cores, versions, dtype, threads, git revision, UTC date."""
    env = {
        "device": device.type, "device_name": device_name(device), "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_version": torch.__version__, "python_version": platform.python_version(), "dtype": dtype,
        "torch_threads": torch.get_num_threads(), "git_revision": git_revision(),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda_version=torch.version.cuda, gpu_memory_bytes=int(props.total_memory),
                   gpu_count=torch.cuda.device_count())
    return env
