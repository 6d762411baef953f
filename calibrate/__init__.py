"""calibrate: measure step times and KV-transfer bandwidth, fit `sim.CostProfile`s, or build them without measuring.

Python API (mirrors ``disagg calibrate``; light to import, torch loads only when a measurement starts)::

    calibrate.run(model="tiny", device="cpu", dtype="bf16", budget_s=120, out="profiles/tiny-cpu.json")
        -> CalibrationResult(profile, profile_path, samples_path, wall_s)        # measure + fit (calibrate.harness)
    calibrate.show(path) -> list[dict]                                            # fit-quality rows of a profile
    calibrate.import_aic(gpu="h200_sxm", model="llama-3.1-8b", tp=1) -> CostProfile  # aiconfigurator-core tables
    calibrate.roofline(model="llama-3.1-8b", hardware="h200-sxm", tp=1) -> CostProfile

Bad user input (missing model files, unknown device or dtype, CUDA asked for without one, a budget too small for
one sample, a GPU or model the kernel database lacks) raises `CalibrationError` with a message meant for the user.
calibrate/ may import engine/ (model runner, transports) and sim/; it never simulates.
"""

from __future__ import annotations

from typing import Any


class CalibrationError(ValueError):
    """A calibration request that cannot be carried out as asked; the message says why and what to change."""


_API = {"run": "calibrate.harness", "CalibrationResult": "calibrate.harness", "show": "calibrate.report",
        "import_aic": "calibrate.aic_import", "roofline": "calibrate.report"}

__all__ = ["CalibrationError", "CalibrationResult", "import_aic", "roofline", "run", "show"]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'calibrate' has no attribute {name!r}")
