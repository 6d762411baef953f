"""disagg's simulator core and shared vocabulary. Light to import: no torch, no simpy until a simulation runs.

Python API: ``sim.simulate(topology, workload, profile, seed=...) -> SimResult`` (see `sim.simulator`),
``sim.plan(model=..., hardware=..., workload=..., slo=..., gpu_budget=...) -> PlanResult`` (see `sim.plan`), and the
shared types `ModelSpec`, `HardwareSpec`, `LinkSpec`, `CostProfile`, `Workload`, `RequestSpec`, `Topology`,
`PoolSpec`, `SLO`, `RequestRecord`.
"""

from __future__ import annotations

from typing import Any

from sim.cost_profile import CostProfile, constant_profile, roofline_profile
from sim.hardware import HARDWARE, LINKS, HardwareSpec, LinkSpec
from sim.metrics import SLO, summarize
from sim.model_spec import PRESETS, ModelSpec, from_hf_config, get_model
from sim.records import RequestRecord, records_to_table, table_to_records
from sim.request import RequestSpec, Workload
from sim.topology import PoolSpec, Topology

__all__ = [
    "HARDWARE",
    "LINKS",
    "PRESETS",
    "SLO",
    "CostProfile",
    "HardwareSpec",
    "LinkSpec",
    "ModelSpec",
    "PlanResult",
    "PoolSpec",
    "RequestRecord",
    "RequestSpec",
    "SimResult",
    "Topology",
    "Workload",
    "constant_profile",
    "from_hf_config",
    "get_model",
    "plan",
    "records_to_table",
    "roofline_profile",
    "simulate",
    "summarize",
    "table_to_records",
]


def __getattr__(name: str) -> Any:
    if name in ("simulate", "SimResult"):
        from sim import simulator

        return getattr(simulator, name)
    if name in ("plan", "PlanResult"):
        import importlib

        module = importlib.import_module("sim.plan")  # a callable module: sim.plan(...) runs sim.plan.plan(...)
        return module if name == "plan" else module.PlanResult
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
