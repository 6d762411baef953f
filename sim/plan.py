"""`plan(...)`: the capacity planner. Which topology serves a workload within an SLO at the lowest cost?

Candidates (`sim.plan_space.search_space`): colocated N x TP with and without chunked prefill; disaggregated
xP(TP) yD(TP), possibly on different hardware per role, over the given links; each batch limit; router policies for
the finalists. For each it reports the goodput — the highest request rate whose SLO attainment reaches the target —
goodput per GPU, cost per million output tokens, p50/p90/p99 TTFT and TPOT at the target rate (or at the goodput
when no target is given), the Pareto frontiers, and a recommendation with its reason.

How, fast:
1. Screen. One instance of each distinct pool (role, device, TP, batch limits) is simulated up a rate ladder
   (`sim.plan_search.ladder`) from half its analytic capacity until it misses the SLO; every candidate's goodput
   is then composed from those ladders (`sim.plan_compose`) — hundreds of topologies from a few dozen simulations.
2. Verify. The best few, the best of the other kind and router variants are simulated whole, goodput by bisection
   starting at the composed value (`sim.plan_search.bisect_goodput`). Round-robin clusters are simulated as one of
   their identical sub-clusters (exact); each rate is first tried on a prefix of its requests (early stop).
Simulations run in worker processes (jobs and answers are JSON text) and are cached on disk by content hash
(``~/.cache/disagg/plan`` or ``$DISAGG_CACHE``) with every request's TTFT and TPOT, so planning again — another SLO,
budget, price or target — re-judges cached runs instead of simulating them again.

Definitions (see `sim.metrics`): goodput counts GPUs over the whole cluster; cost per million output tokens =
price of the cluster per hour / output tokens per hour at the goodput.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, cast

import numpy as np
import pyarrow as pa

from sim.cost_profile import CostProfile, roofline_profile
from sim.hardware import HARDWARE, get_hardware
from sim.metrics import SLO
from sim.model_spec import ModelSpec, get_model
from sim.plan_rank import curves_table, rank, recommend, rows_table
from sim.plan_runner import Progress, Runner
from sim.plan_space import search_space
from sim.request import Workload
from sim.topology import Topology

log = logging.getLogger(__name__)

# MLPerf Inference Llama-3.1-8B interactive targets (TTFT 500 ms, TPOT 30 ms), here at p90 with 90 % attainment.
DEFAULT_SLO = SLO(ttft_s=0.5, tpot_s=0.03, percentile=90.0, attainment=0.9)


class _RankOpts(TypedDict):
    """The keyword arguments `plan` passes to every `rank` call."""

    price: dict[str, float]
    mean_output: float
    slo: SLO
    multi_hw: bool
    multi_link: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISAGG_CACHE") or Path.home() / ".cache" / "disagg") / "plan"


@dataclass
class PlanResult:
    """What `plan` found.

    ``table``: one row per candidate, ranked (column ``rank``; see `sim.plan_rank.COLUMNS`); ``curves``: every
    simulated rate per candidate (rate_rps, attainment, passes, latency percentiles) for goodput-vs-rate charts;
    ``recommendation``: {"name", "reason", ...the row}; ``settings``: the inputs; ``stats``: timing and counters.
    """

    table: pa.Table
    curves: pa.Table
    recommendation: dict
    settings: dict
    stats: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return self.table.to_pylist()

    def top(self, n: int = 10) -> list[dict]:
        return self.table.slice(0, n).to_pylist()

    def to_dict(self) -> dict:
        """The recommendation, frontiers, settings and stats as one JSON-able document."""
        rows = self.rows()
        return {"format": "disagg.plan", "version": 1, "recommendation": self.recommendation,
                "pareto_latency": [r["name"] for r in rows if r["pareto_latency"]],
                "pareto_cost": [r["name"] for r in rows if r["pareto_cost"]],
                "settings": self.settings, "stats": self.stats}

    def write(self, out: str | Path) -> Path:
        """``out/plan.parquet`` (ranked table), ``out/curves.parquet`` and ``out/plan.json`` (creates ``out``)."""
        import pyarrow.parquet as pq

        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.table, d / "plan.parquet")
        pq.write_table(self.curves, d / "curves.parquet")
        (d / "plan.json").write_text(json.dumps(_finite(self.to_dict()), indent=2) + "\n")
        return d


def _finite(o: object) -> object:
    """JSON has no NaN: write None instead."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def _workload(w: str | Workload | Mapping) -> Workload:
    if isinstance(w, Workload):
        return w
    if isinstance(w, Mapping):
        from sim.workload_gen import workload_from_dict

        return workload_from_dict(w)
    from sim.traces import load_trace

    return load_trace(w)


def _default_tps(model: ModelSpec, hw: str, longest: int) -> list[int]:
    """TP 1, 2, 4, 8 from the smallest that holds the weights and the longest request, up to 4x that."""
    from sim.topology import PoolSpec

    for tp in (1, 2, 4, 8):
        try:
            if PoolSpec("decode", 1, tp, hw).kv_capacity(model) > longest + 16:
                return [t for t in (1, 2, 4, 8) if tp <= t <= 4 * tp]
        except ValueError:
            continue
    return [8]


def _devices(hardware: str | Sequence[str] | None,
             profiles: CostProfile | Sequence[CostProfile] | Mapping[str, CostProfile] | None, tps: Sequence[int] | None,
             model: ModelSpec, base: Workload) -> tuple[list[str], dict[tuple[str, int], CostProfile],
                                                    dict[str, str | None]]:
    """Device names, a profile for each (device, TP) the search may use, and each device's PoolSpec.hardware value.

    A supplied profile (calibrated or imported) is used for its own device and TP only; preset hardware without one
    gets datasheet roofline profiles at every TP in ``tps`` (default: `_default_tps`).
    """
    if isinstance(profiles, CostProfile):
        supplied = [profiles]
    elif isinstance(profiles, Mapping):
        supplied = list(profiles.values())
    else:
        supplied = list(profiles or [])
    table: dict[tuple[str, int], CostProfile] = {}
    for p in supplied:
        if not isinstance(p, CostProfile):
            raise ValueError(f"profiles: expected CostProfile objects, got {type(p).__name__}")
        table[(p.hardware or p.name, p.tp)] = p
    names = [hardware] if isinstance(hardware, str) else list(hardware or [])
    if not names:
        names = sorted({hw for hw, _ in table}) or ["h100-sxm"]
    key: dict[str, str | None] = {}
    for hw in names:
        has_profile = any(h == hw for h, _ in table)
        if hw.lower() in HARDWARE:
            key[hw] = hw.lower()
            if not has_profile:
                longest = max(r.prompt_tokens + r.output_tokens for r in base.requests)
                for tp in tps or _default_tps(model, hw, longest):
                    table[(hw, tp)] = roofline_profile(model, get_hardware(hw), tp)
        elif has_profile:
            key[hw] = None  # memory comes from the profile
            for (h, _tp), p in table.items():
                if h == hw and not p.memory_bytes:
                    raise ValueError(f"profile {p.name!r} for {hw!r} has no memory_bytes: the planner cannot size "
                                     "its KV cache")
        else:
            raise ValueError(f"unknown hardware {hw!r}: expected a preset ({', '.join(sorted(HARDWARE))}) or the "
                             "device of a supplied profile")
    table = {k: v for k, v in table.items() if k[0] in key and (tps is None or k[1] in tps)}
    if not table:
        raise ValueError(f"no cost profile for hardware {names} at TP {list(tps or [])}")
    return names, table, key


def plan(model: str | ModelSpec = "llama-3.1-8b", hardware: str | Sequence[str] | None = None,
         workload: str | Workload | Mapping = "azure-conv", slo: SLO | None = None, gpu_budget: int = 16,
         profiles: CostProfile | Sequence[CostProfile] | Mapping[str, CostProfile] | None = None,
         prices: Mapping[str, float] | None = None, target_rate_rps: float | None = None,
         links: Sequence[str] = ("nvlink4",), tps: Sequence[int] | None = None,
         kinds: Sequence[str] = ("colocated", "disaggregated"), chunked: Sequence[bool] = (False, True),
         heterogeneous: bool = True, max_batch_sizes: Sequence[int] = (256,), max_batch_tokens: int = 8192,
         topologies: Sequence[Topology] | None = None, verify_top: int = 3, refine_routers: Sequence[str] = (
             "least_outstanding",), sim_seconds: float = 20.0, min_requests: int = 200, warmup_frac: float = 0.2,
         prefix_frac: float = 0.4, rank_by: str = "goodput_per_gpu", workers: int | None = None,
         cache_dir: str | Path | bool | None = True, seed: int = 0, progress: Progress | None = None,
         ray_address: str | None = None) -> PlanResult:
    """Search topologies within ``gpu_budget`` GPUs for the best goodput per GPU (or cost) under ``slo``.

    Two stages. Screen: every candidate's goodput is composed from simulated one-instance rate ladders
    (`sim.plan_compose`). Verify: the ``verify_top`` best, the best of the other kind (colocated vs disaggregated)
    and the best with each of ``refine_routers`` are simulated whole (goodput by bisection); their rows say
    ``method = "simulated"``, the others ``"composed"``. With ``topologies`` given, exactly those are evaluated, all
    verified.

    ``model``: preset name, HF config path or ModelSpec. ``hardware``: device preset(s), or the devices of
    ``profiles`` (calibrated / imported CostProfiles, each used at its own TP). ``workload``: a bundled trace name,
    a trace path, a generator dict (`sim.workload_gen.workload_from_dict`) or a Workload; its arrivals are rescaled
    to each probed rate. ``prices``: USD per GPU-hour by device (defaults: the hardware presets'). ``sim_seconds``:
    seconds of arrivals per simulation; ``warmup_frac``: share of them left out of the statistics.
    ``cache_dir``: True = the default cache, None/False = no cache. ``workers``: processes (default: CPUs).
    ``progress(done, total, what)`` is called as simulation jobs finish. ``ray_address``: run the simulation jobs as
    Ray tasks on that cluster ("auto", "local" or "HOST:PORT"; `sim.ray_jobs`) instead of local processes; the
    result is the same.

    Raises ValueError for bad inputs (unknown model, hardware, link, router; budget < 1; a workload that is empty).
    """
    started = time.perf_counter()
    slo = slo or DEFAULT_SLO
    spec = model if isinstance(model, ModelSpec) else get_model(model)
    if rank_by not in ("goodput_per_gpu", "cost"):
        raise ValueError(f"rank_by must be 'goodput_per_gpu' or 'cost', got {rank_by!r}")
    if target_rate_rps is not None and not target_rate_rps > 0:
        raise ValueError(f"target rate must be > 0 req/s, got {target_rate_rps}")
    if not sim_seconds > 0 or min_requests < 20 or not 0 <= warmup_frac < 0.9:
        raise ValueError("need sim_seconds > 0, min_requests >= 20 and 0 <= warmup_frac < 0.9")
    if any(b < 1 for b in max_batch_sizes) or not max_batch_sizes:
        raise ValueError(f"max batch sizes must be >= 1, got {list(max_batch_sizes)}")
    from sim.hardware import get_link
    from sim.router import get_policy

    for link in links:
        get_link(link)
    for r in refine_routers:
        get_policy(r)
    base = _workload(workload)
    if len(base) < 2:
        raise ValueError(f"workload {base.name!r} has {len(base)} requests; the planner needs at least 2")
    if topologies:
        names = sorted({p.hardware or "" for t in topologies for p in t.pools} - {""}) or None
        tps = sorted({p.tp for t in topologies for p in t.pools})
        hardware = hardware or names
    devices, table, hw_key = _devices(hardware, profiles, tps, spec, base)
    tp_list = sorted({tp for _, tp in table})
    cands = list(topologies) if topologies else [
        t for b in max_batch_sizes for t in search_space(
            gpu_budget, devices, tp_list, kinds, links, chunked=chunked, heterogeneous=heterogeneous,
            hw_key=hw_key, max_batch_size=b, max_batch_tokens=max_batch_tokens)]
    price = {hw: float((prices or {}).get(hw, HARDWARE[hw.lower()].price_per_hour if hw.lower() in HARDWARE
                                          else math.nan)) for hw in devices}
    settings = {"model": spec.name, "hardware": devices, "workload": base.name, "gpu_budget": gpu_budget,
                "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "percentile": slo.percentile,
                        "attainment": slo.attainment},
                "target_rate_rps": target_rate_rps, "links": list(links), "tps": tp_list, "prices": price,
                "max_batch_sizes": list(max_batch_sizes), "sim_seconds": sim_seconds, "warmup_frac": warmup_frac,
                "rank_by": rank_by, "seed": seed,
                "profiles": {f"{hw}@tp{tp}": p.name for (hw, tp), p in sorted(table.items())}}
    cache = None if cache_dir in (None, False) else (
        default_cache_dir() if cache_dir is True else cast("str | Path", cache_dir))
    runner = Runner(spec, base, slo, table, sim_seconds, min_requests, warmup_frac, prefix_frac, target_rate_rps,
                    seed, cache, workers, ray_address)
    mean_output = float(np.mean([r.output_tokens for r in base.requests]))
    opts: _RankOpts = {"price": price, "mean_output": mean_output, "slo": slo, "multi_hw": len(devices) > 1,
                       "multi_link": len(links) > 1}
    try:
        results = runner.screen(cands, progress)
        screened = time.perf_counter()
        todo = _finalists(rank(results, rank_by, target_rate_rps, **opts), verify_top, bool(topologies))
        variants = [_variant(r, rt) for r in todo[:1] for rt in refine_routers
                    if rt != r["_topology"].router and max(p.instances for p in r["_topology"].pools) > 1]
        results += variants
        for _ in range(3):  # verify until the top-ranked row is a simulated one
            runner.verify([r for r in todo + variants if r["method"] != "simulated"], progress)
            variants = []
            ranked = rank(results, rank_by, target_rate_rps, **opts)
            todo = [r["_src"] for r in ranked if r["goodput_rps"] > 0][:2]
            if not todo or todo[0]["method"] == "simulated":
                break
        rows = rank(results, rank_by, target_rate_rps, **opts)
        rec = recommend(rows, slo, target_rate_rps, runner.compare_point)
    finally:
        runner.close()
    stats = {"wall_s": time.perf_counter() - started, "screen_s": screened - started, "topologies": len(results), "skipped": runner.skipped,
             "simulations": runner.sims, "cache_hits": runner.hits, "simulated_requests": runner.requests,
             "instance_ladders": len(runner.curves), "verified": sum(r["method"] == "simulated" for r in rows),
             "workers": runner.workers, "ray": ray_address}
    return PlanResult(rows_table(rows), curves_table(rows, runner), rec, settings, stats)


def _finalists(ranked: list[dict], top: int, everything: bool) -> list[dict]:
    """The results to verify: all (explicit topologies), else the ``top`` best and the best of the other kind."""
    live = [r for r in ranked if r["goodput_rps"] > 0]
    if everything:
        return [r["_src"] for r in live]
    pick = live[:top]
    for kind in ("colocated", "disaggregated"):
        best = next((r for r in live if r["kind"] == kind), None)
        if best is not None and best not in pick:
            pick.append(best)
    return [r["_src"] for r in pick]


def _variant(row: dict, router: str) -> dict:
    """A copy of a screened result with another router policy (to be verified: routers only show in whole runs)."""
    src = row
    t = src["_topology"]
    return {**src, "_topology": Topology(t.kind, t.pools, t.link, router, meta=dict(t.meta)), "method": "composed",
            "points": [], "note": ""}


class _CallableModule(types.ModuleType):
    """``sim.plan`` is both this module and the function: importing the module rebinds the package attribute to it,
    so the module itself answers calls."""

    def __call__(self, *args: object, **kwargs: object) -> PlanResult:
        return plan(*args, **kwargs)  # type: ignore[arg-type]


sys.modules[__name__].__class__ = _CallableModule
