"""validate: close the loop — the simulator's error against real engine runs of the same requests.

Python API::

    validate.validate(model="tiny", topologies=("2C", "1P1D"), loads=(0.3, 0.6, 0.9), ...) -> ValidationReport
    validate.write(report, out_dir, max_error=0.10) -> summary dict      # joined.parquet, summary.json, PNGs
    validate.load_report(out_dir) -> (summary dict, joined table)        # what the dashboard reads
    validate.compare(real_records, sim_records) -> dict                   # the error computation alone
    validate.validate_vllm(model="tiny", topologies=("2C", "1P1D"), loads=(0.6,), ...) -> (ValidationReport,
                                                                         throughput dict)  # against real vLLM

validate/ imports engine/, calibrate/ and sim/ (it is the only place all three meet); nothing imports validate/.
"""

from __future__ import annotations

from typing import Any

_API = {"validate": "validate.runner", "ValidationReport": "validate.runner", "ValidateError": "validate.runner",
        "validate_vllm": "validate.vllm_runner", "write": "validate.report", "load_report": "validate.report", "compare": "validate.compare"}


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'validate' has no attribute {name!r}")
