"""`validate_vllm(...)`: the simulator against real vLLM (2C and 1P1D over NIXL), and disagg's built-in engine
against vLLM on the same model, cores and workload — the external check.

One invocation, one machine state: calibrate vLLM from its per-iteration stats (`calibrate.vllm_iterations`), then per
topology start the vLLM servers once, measure capacity with a burst (``burst`` requests at once with the load runs' length mix, `validate.runner.capacity_burst`; capacity = requests
done by the time half are done / that time, as `validate.runner.measure_capacity`), then for each of ``loads`` run
``num_requests`` Poisson requests at load x capacity through disagg's router with `engine.loadgen`, and simulate exactly those requests
(router-stamped arrivals) on the same pool settings with the vLLM profile. Finally the built-in engine serves the
same burst on the same topology (``throughput_topology``), giving the output-token throughput ratio.

Pool settings shared by vLLM and the simulator: block 32, ``max_num_seqs`` = max_batch_size, ``max_num_batched_tokens``
= max_batch_tokens, chunked prefill on for colocated pools (vLLM V1 always mixes prefill chunks with decodes), KV
capacity = ``VLLM_CPU_KVCACHE_SPACE`` / KV bytes per token, prefix caching off (the simulator has none; the capacity
burst also uses other prompts than the measured run). The NIXL link given to the simulator is measured in the same
1P1D run from the decode instance's ``vllm:nixl_xfer_time_seconds`` / ``vllm:nixl_bytes_transferred`` histograms
(bandwidth = bytes / time over all transfers, latency 0) — measured after the fact, so it is a best case for the
simulator's transfer term.

What the simulator is told about vLLM (besides the fitted step times):
- P/D semantics: the decode instance produces every output token, the first after pulling the KV and recomputing the
  last prompt token (`Topology.first_token` "decode"), so TTFT includes the transfer and a decode step;
- the profile's step and request overheads (`calibrate.vllm_iterations.probe_overheads`): the request overhead is
  paid at the first instance and again at the decode instance;
- host contention (`HostCPU`): the ``VLLM::Worker`` processes are the instances; everything else on the host during
  the run (API servers, EngineCores, disagg's router, the load generator, other jobs) is measured as background CPU.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from sim.cost_profile import CostProfile
from sim.hardware import LinkSpec
from sim.model_spec import from_hf_config
from sim.simulator import simulate
from sim.topology import HostCPU, Topology
from validate.compare import compare
from validate.runner import (
    RunResult,
    ValidateError,
    ValidationReport,
    _replay,
    capacity_burst,
    scaled_workload,
)

log = logging.getLogger(__name__)
KV_GIB = 1
MAX_BATCH_TOKENS = 2048


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


def vllm_topology(label: str, kv_bytes_per_token: int, max_batch_size: int = 64) -> Topology:
    """The topology vLLM runs and the simulator replays (module docstring); link ``nixl`` for P/D."""
    kv_tokens = KV_GIB * 2**30 // kv_bytes_per_token
    try:
        t = Topology.from_label(label, link="nixl", block_size_tokens=32, max_batch_size=max_batch_size,
                                max_batch_tokens=MAX_BATCH_TOKENS, kv_capacity_tokens=kv_tokens)
    except ValueError as e:
        raise ValidateError(f"--topologies: {e}") from None
    if t.kind == "colocated":
        t = replace(t, pools=tuple(replace(p, chunked_prefill=True) for p in t.pools))
    else:  # vLLM's P/D: the decode instance produces every output token, the first one after the KV pull
        t = replace(t, first_token="decode")
    return t


def _throughput(table: pa.Table) -> dict:
    ok = np.asarray(table.column("status").to_pylist()) == "ok"
    out_tok = table.column("output_tokens").to_numpy()[ok]
    arr, fin = table.column("arrival_s").to_numpy()[ok], table.column("finished_s").to_numpy()[ok]
    span = float(fin.max() - arr.min()) if ok.any() else math.nan
    half = np.sort(fin)[max(0, ok.sum() // 2 - 1)] if ok.sum() >= 2 else math.nan
    return {"ok": int(ok.sum()), "requests": table.num_rows, "span_s": span,
            "output_tokens_per_s": float(out_tok.sum() / span) if span > 0 else math.nan,
            "capacity_rps": float((ok.sum() // 2) / half) if half and half > 0 else math.nan}


def validate_vllm(model: str = "tiny", topologies: tuple[str, ...] = ("2C", "1P1D"), loads: tuple[float, ...] = (0.6,),
                  workload: str = "azure-conv", num_requests: int = 30, profile: str | Path | None = None,
                  budget_s: float = 90.0, seed: int = 0, burst: int = 16, length_scale: float | None = None,
                  throughput_topology: str | None = "2C", progress: Callable[[str], None] | None = None,
                  log_dir: Path | None = None, host_contention: bool = True) -> tuple[ValidationReport, dict]:
    """Run the loop in the module docstring; returns the report (as `validate.runner.validate`'s) and the throughput
    comparison ``{"vllm": {...}, "builtin": {...}, "ratio_builtin_over_vllm": x}``. Raises ValidateError on bad input,
    `engine.cluster.ClusterError` when servers cannot start."""
    from engine.cluster import Cluster, CpuMeter, resolve_model
    from engine.loadgen import run_load
    from engine.vllm_backend.cluster import VllmCluster

    say = progress or (lambda msg: log.info(msg))
    if not loads or any(not 0 < f <= 2 for f in loads):
        raise ValidateError(f"--loads must be fractions of capacity in (0, 2], got {list(loads)}")
    if num_requests < 2 or burst < 2:
        raise ValidateError("--num-requests and --burst must be >= 2")
    folder = resolve_model(model)
    spec = from_hf_config(folder)
    if profile is not None:
        prof = CostProfile.load(profile)
        say(f"profile {profile}")
    else:
        from calibrate.vllm_iterations import calibrate_vllm

        say(f"calibrating vLLM from its iteration stats ({budget_s:.0f} s budget)")
        prof = calibrate_vllm(model, budget_s, rounds=50, seed=seed)
    report = ValidationReport(prof, {}, config={"backend": "vllm", "model": model, "topologies": list(topologies),
                                                "loads": list(loads), "workload": workload, "num_requests": num_requests,
                                                "seed": seed, "burst": burst, "kv_cache_gib": KV_GIB,
                                                "host_contention": host_contention})
    ramp = capacity_burst(scaled_workload(workload, spec, num_requests, 1.0, seed, length_scale), burst)
    thr: dict = {"workload": f"{burst} requests at once ({ramp.name})"}
    for label in topologies:
        topo = vllm_topology(label, spec.kv_bytes_per_token)
        say(f"{label}: starting vLLM")
        logs = Path(log_dir) / label if log_dir else None
        runs: list[tuple] = []  # (load, workload, real records, host CPU) per load
        with VllmCluster(folder, topo, model_name="tiny" if str(model) == "tiny" else folder.name,
                         kv_cache_gib=KV_GIB, seed=seed, log_dir=logs, prefix_caching=False) as c:
            say(f"{label}: capacity burst ({burst} requests at once)")
            ramp_real = run_load(c.url, ramp, seed=seed + 7)  # other prompts than the measured run's
            t = _throughput(ramp_real)
            if t["ok"] < 2:
                raise ValidateError(f"{label}: the capacity burst completed {t['ok']} of {burst} requests")
            report.capacity_rps[label] = cap = t["capacity_rps"]
            if label == throughput_topology:
                thr["vllm"] = t
            for load in loads:
                w = scaled_workload(workload, spec, num_requests, load * cap, seed, length_scale)
                say(f"{label}: {num_requests} requests at {load:.0%} of {cap:.2f} req/s")
                workers = list(c.model_workers().values())
                meter = CpuMeter(workers)
                real = run_load(c.url, w, seed=seed)
                host = {"model_workers": len(workers), **meter.read()}
                runs.append((load, w, real, host))
            import httpx
            metrics = {i["name"]: httpx.get(f"{i['url']}/metrics", timeout=30).text for i in c.instances}
        sim_prof = prof
        if topo.kind == "disaggregated":  # the NIXL counters cover every run on this cluster
            text = metrics["D0"]
            nbytes, secs = _metric(text, "vllm:nixl_bytes_transferred_sum"), _metric(text, "vllm:nixl_xfer_time_seconds_sum")
            if not (nbytes > 0 and secs > 0):
                raise ValidateError(f"{label}: the decode instance reports no NIXL transfers")
            sim_prof = replace(prof, links={**prof.links, "nixl": LinkSpec("nixl", nbytes / secs, 0.0)})
            report.config["nixl_bandwidth_bytes_per_s"] = nbytes / secs
        for load, w, real, host in runs:
            cpu = HostCPU(os.cpu_count() or 1, host["background_cpu"]) if host_contention else None
            sim = simulate(topo, _replay(real, w), sim_prof, model=spec, seed=seed, host=cpu).records
            report.runs.append(RunResult(label, load, load * cap, 0, real, sim, {**compare(real, sim), "host": host}))
    if throughput_topology:
        say(f"built-in engine {throughput_topology}: the same burst")
        with Cluster(folder, Topology.from_label(throughput_topology), seed=seed) as c:
            thr["builtin"] = _throughput(run_load(c.url, ramp, seed=seed))
        if "vllm" in thr:
            thr["ratio_builtin_over_vllm"] = (thr["builtin"]["output_tokens_per_s"]
                                              / thr["vllm"]["output_tokens_per_s"])
    return report, thr
