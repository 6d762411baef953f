"""`simulate(topology, workload, profile, seed)`: a SimPy discrete-event model of one serving cluster.

Processes: one arrival process (the router runs inline when a request arrives), one process per instance, and the KV
links' completion callbacks. The router picks a prefill and a decode instance (disaggregated) or one colocated
instance at arrival. A request the cluster can never serve (longer than the model's context, or larger than an
instance's whole KV pool) is recorded as rejected at arrival, never left waiting. Records follow `sim.records`.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import simpy

from sim.cost_profile import CostProfile
from sim.decode_instance import DecodeInstance
from sim.hardware import get_link
from sim.link import SharedLink
from sim.metrics import SLO, summarize
from sim.model_spec import ModelSpec
from sim.prefill_instance import PrefillInstance
from sim.records import RecordColumns, RequestRecord
from sim.request import Workload
from sim.router import get_policy
from sim.running_batch import SimSeq
from sim.topology import HostCPU, PoolSpec, SpeedTrace, Topology

TIMESERIES_SCHEMA = pa.schema([("t_s", pa.float64()), ("instance", pa.string()), ("queue", pa.int64()),
                               ("batch", pa.int64()), ("kv_used_blocks", pa.int64()), ("kv_capacity_blocks", pa.int64())])


@dataclass
class SimResult:
    """What one simulation produced: per-request records (pyarrow Table), a summary dict and per-instance time series."""

    records: pa.Table
    summary: dict
    timeseries: pa.Table
    instances: dict = field(default_factory=dict)
    wall_s: float = 0.0


class SimContext:
    """State shared by the processes of one run: the environment, the records, the time-series sampler."""

    def __init__(self, env: simpy.Environment, model: ModelSpec, sample_every_s: float, seed: int = 0):
        self.env = env
        self.seed = seed
        self._step_rngs: dict[str, random.Random] = {}
        self.kv_bytes_per_token = model.kv_bytes_per_token
        self.records = RecordColumns()  # finished and rejected requests
        self.finished = 0
        self.sample_every_s = sample_every_s
        self._ts: tuple[list, ...] = tuple([] for _ in TIMESERIES_SCHEMA)  # one list per column
        self.host: HostCPU | None = None
        self.speed_traces: Mapping[str, SpeedTrace] = {}
        self.busy = 0  # instances in a timed step right now

    def begin_step(self, profile: CostProfile) -> float:
        """An instance running ``profile`` starts a timed step: returns its slowdown from host CPU contention
        (`HostCPU`: processor sharing, or the pinned workers' wait for the background), 1 without one."""
        self.busy += 1
        host = self.host
        if host is None or not host.contention:
            return 1.0
        if host.pinned:  # contended: another instance is mid-step as this one starts
            return 1.0 + host.pinned_wait(profile, contended=self.busy > 1)
        return max(1.0, (self.busy + host.background_cpu) / host.cores)

    def prefill_factor(self, name: str, profile: CostProfile) -> float:
        """How much instance ``name``'s prefill step starting now is stretched: a draw from ``profile``'s
        ``prefill_dispersion`` (mean 1), from a generator seeded by the run's seed and the instance; 1 without one."""
        if not profile.prefill_dispersion:
            return 1.0
        rng = self._step_rngs.get(name)
        if rng is None:
            rng = self._step_rngs[name] = random.Random(f"{self.seed}/{name}/prefill")
        return profile.prefill_factor(rng.random())

    def speed(self, name: str, kind: str) -> tuple[float, float]:
        """(host-speed factor of instance ``name`` for a ``kind`` step starting now, time of its next change):
        from `HostCPU.speed`; (1, inf) for an instance without a trace."""
        trace = self.speed_traces.get(name)
        if trace is None:
            return 1.0, math.inf
        return trace.at(kind, self.env.now)

    def end_step(self) -> None:
        self.busy -= 1

    def finish(self, s: SimSeq, t: float) -> None:
        rec = s.rec
        rec.last_token_s = rec.finished_s = t
        rec.status = "ok"
        self.finished += 1
        self.records.add(rec)

    def sample(self, inst: object, queue: int, batch: int) -> None:
        """Record ``inst``'s queue, batch and KV use now. The instances call this only when ``sample_every_s`` has
        passed since their ``last_sample_s``."""
        now = inst.last_sample_s = self.env.now  # type: ignore[attr-defined]
        t, names, queues, batches, used, capacity = self._ts
        t.append(now)
        names.append(inst.name)  # type: ignore[attr-defined]
        queues.append(queue)
        batches.append(batch)
        used.append(inst.kv_used)  # type: ignore[attr-defined]
        capacity.append(inst.kv_capacity)  # type: ignore[attr-defined]

    def timeseries(self) -> pa.Table:
        return pa.table([pa.array(c, f.type) for f, c in zip(TIMESERIES_SCHEMA, self._ts, strict=True)],
                        schema=TIMESERIES_SCHEMA)


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector. A run allocates millions of short-lived objects, all freed by
    reference counting (it makes no reference cycles), and keeps one record per request: each collector pass would
    only walk the records and the workload again (about 6 % of a 1M-request run's CPU time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def profile_for(profile: CostProfile | Mapping[str, CostProfile], role: str) -> CostProfile:
    """The profile a pool of ``role`` (``prefill`` / ``decode`` / ``colocated``) runs with: ``profile`` itself, or its
    entry for the role; a colocated pool falls back to ``decode``, any pool to ``default``."""
    if isinstance(profile, CostProfile):
        return profile
    for key in (role, "decode" if role == "colocated" else "", "default"):
        if key in profile:
            return profile[key]
    raise ValueError(f"no cost profile for the {role} pool (have {sorted(profile)})")


def _capacity(pool: PoolSpec, model: ModelSpec, prof: CostProfile) -> int:
    mem = prof.memory_bytes if pool.hardware is None and prof.memory_bytes else None
    cap = pool.kv_capacity(model, mem)
    if cap < pool.block_size_tokens:
        raise ValueError(f"{pool.role} pool: KV capacity {cap} tokens is less than one block")
    return cap


def simulate(topology: Topology, workload: Workload, profile: CostProfile | Mapping[str, CostProfile],
             model: ModelSpec | None = None, slo: SLO | None = None, seed: int = 0,
             sample_every_s: float | None = None, host: HostCPU | None = None) -> SimResult:
    """Simulate ``workload`` on ``topology`` with step costs from ``profile`` (one, or one per pool role).

    ``model`` defaults to the profile's model. ``sample_every_s`` bounds the time-series density (default: about
    2,000 samples per instance over the workload). ``host``: instances share that many CPU cores (`HostCPU`).
    Deterministic: same inputs and seed give identical records.
    """
    started = time.perf_counter()
    profiles = {p.role: profile_for(profile, p.role) for p in topology.pools}
    model = model or next((p.model for p in profiles.values() if p.model), None)
    if model is None:
        raise ValueError("simulate needs a ModelSpec: pass model= or use a profile that names its model")
    if sample_every_s is None:
        sample_every_s = max(workload.duration_s, 1.0) / 2000
    if host is not None and host.pinned and (n := sum(p.instances for p in topology.pools)) > host.cores:
        raise ValueError(f"HostCPU(pinned=True) pins one instance per core, but topology {topology.label} has {n} "
                         f"instances for {host.cores} cores")
    env = simpy.Environment()
    ctx = SimContext(env, model, sample_every_s, seed)
    ctx.host = host
    if host is not None:
        ctx.speed_traces = host.speed
    rng = np.random.default_rng(seed)

    pools: dict[str, list] = {}
    caps: dict[str, int] = {}
    if topology.kind == "colocated":
        pool = topology.pool("colocated")
        caps["colocated"] = _capacity(pool, model, profiles["colocated"])
        pools["colocated"] = [DecodeInstance(ctx, f"C{i}", pool, profiles["colocated"], caps["colocated"])
                              for i in range(pool.instances)]
    else:
        pre, dec = topology.pool("prefill"), topology.pool("decode")
        link = get_link(topology.link, profiles["decode"].links or profiles["prefill"].links)
        ranks = min(pre.tp, dec.tp)
        for role, p in (("prefill", pre), ("decode", dec)):
            caps[role] = _capacity(p, model, profiles[role])
        pools["prefill"] = [PrefillInstance(ctx, f"P{i}", pre, profiles["prefill"], caps["prefill"],
                                            topology.first_token) for i in range(pre.instances)]
        handoff = link.latency_s + profiles["decode"].request_overhead_s  # the decode server's own request delay
        pools["decode"] = [DecodeInstance(ctx, f"D{i}", dec, profiles["decode"], caps["decode"],
                                          SharedLink(env, link.bandwidth_bytes_per_s * ranks, handoff, f"D{i}"))
                           for i in range(dec.instances)]
    policy = get_policy(topology.router)
    states: dict[str, dict] = {role: {} for role in pools}
    # the longest request any instance can hold to its end (whole blocks, plus room for the last token)
    limit_tokens = min(caps[p.role] // p.block_size_tokens * p.block_size_tokens for p in topology.pools) - 1

    def arrivals():
        colocated = topology.kind == "colocated"
        first, second = (pools["colocated"], None) if colocated else (pools["prefill"], pools["decode"])
        first_state, second_state = states["colocated" if colocated else "prefill"], states.get("decode")
        records, max_context, nan = ctx.records, model.max_context_tokens, math.nan
        delay = profiles["colocated" if colocated else "prefill"].request_overhead_s  # `CostProfile`: same for all
        for order, spec in enumerate(workload.requests):
            now = env.now
            if spec.arrival_s + delay > now:
                yield env.timeout(spec.arrival_s + delay - now)
            rec = RequestRecord(spec.id, spec.arrival_s, spec.prompt_tokens, spec.output_tokens)
            total = spec.prompt_tokens + spec.output_tokens
            if total > max_context:
                rec.status, rec.reason = "rejected", f"prompt + output = {total} tokens > model context {max_context}"
                records.add(rec)
                continue
            if total > limit_tokens:
                rec.status, rec.reason = "rejected", f"prompt + output = {total} tokens > instance KV capacity {limit_tokens}"
                records.add(rec)
                continue
            seq = SimSeq(rec, 0, spec.output_tokens, nan, order=order)
            if colocated:
                inst = first[policy(first, first_state, rng)]
                rec.prefill_instance = rec.decode_instance = inst.name
                inst.submit(seq)
            else:
                p = first[policy(first, first_state, rng)]
                d = second[policy(second, second_state, rng)]
                rec.prefill_instance, rec.decode_instance = p.name, d.name
                seq.prefill_instance, seq.decode_instance = p, d
                d.outstanding += 1
                p.submit(seq)

    env.process(arrivals())
    with _cyclic_gc_paused():
        env.run()
        records = ctx.records.to_table()
    if len(ctx.records) != len(workload):
        done = set(records.column("request_id").to_pylist())
        stuck = [r.id for r in workload if r.id not in done]
        raise AssertionError(f"simulation ended with unfinished requests {stuck[:10]}")
    insts = {i.name: i for group in pools.values() for i in group}
    makespan = env.now
    util = {name: (i.busy_s / makespan if makespan > 0 else 0.0) for name, i in insts.items()}
    summary = summarize(records, slo=slo, gpus=topology.gpus)
    summary.update({
        "topology": topology.label, "kind": topology.kind, "gpus": topology.gpus, "workload": workload.name,
        "seed": seed, "makespan_s": makespan,
        "utilisation": util,
        "kv_peak_fraction": {name: i.kv_peak / i.kv_capacity for name, i in insts.items()},
        "kv_capacity_tokens": caps,
    })
    wall = time.perf_counter() - started
    return SimResult(records, summary, ctx.timeseries(), insts, wall)
