"""Simulations at chosen request rates, cached on disk by content hash: the planner's rate ladders and bisections.

A job is a plain JSON document (topology, per-role cost profiles, model, SLO, search settings) so it can be handed
to a worker process as text; the worker rebuilds the objects, runs `search`, and answers with JSON. Nothing is
pickled beyond those strings. Modes: ``curve`` walks a rate ladder for one instance (`ladder`); ``verify`` bisects
a whole cluster's goodput (`bisect_goodput`); ``rates`` just simulates the given rates.

Each simulation covers ``sim_seconds`` of arrivals (at least ``min_requests`` requests) — several request lifetimes,
so decode batches fill up and an overloaded cluster shows its growing queues — and requests arriving in the first
``warmup_frac`` of that span (an emptier cluster than in steady state) are left out of attainment and percentiles.

Rates live on a fixed geometric grid, rate_k = 2^(k/16) req/s (4.4 % apart), so different searches (another SLO,
another target rate) land on the same rates and reuse each other's simulations. A cached simulation stores the
per-request TTFT, TPOT and completion of every request, so any SLO can be re-evaluated on it without simulating.

Round-robin routing splits a cluster into g identical independent sub-clusters (`sim.plan_space.unit_factor`); the
search simulates one of them, fed every g-th request of the full-rate workload — exact, and g times cheaper.

Early stop: each rate is first simulated on the first ``prefix_frac`` of its requests. The cluster starts empty and
later requests only add load, so if that prefix already misses the attainment target the full run would too.
``metric`` says which targets count: ``both``, or ``ttft`` / ``tpot`` alone for a prefill-only / decode-only ladder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sim.cost_profile import CostProfile
from sim.metrics import SLO, per_request
from sim.model_spec import ModelSpec
from sim.request import RequestSpec, Workload
from sim.topology import PoolSpec, Topology

STEPS_PER_OCTAVE = 16
MAX_REQUESTS = 50_000  # per simulation: a safety net against runaway rates
_CODE_FILES = ("simulator.py", "decode_instance.py", "prefill_instance.py", "link.py", "running_batch.py",
               "kv_blocks.py", "router.py", "records.py", "metrics.py", "topology.py", "cost_profile.py",
               "plan_search.py")
_BASES: dict[str, dict] = {}  # base workloads this process knows, by fingerprint: arrays + name


def grid_rate(k: int) -> float:
    """The k-th rate of the search grid (req/s)."""
    return 2.0 ** (k / STEPS_PER_OCTAVE)


def grid_index(rate: float) -> int:
    return math.floor(STEPS_PER_OCTAVE * math.log2(rate))


def code_version() -> str:
    """A hash of the simulator's source: cached results from another simulator version are never reused."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def topology_to_dict(t: Topology) -> dict:
    return {"kind": t.kind, "pools": [asdict(p) for p in t.pools], "link": t.link, "router": t.router}


def topology_from_dict(d: dict) -> Topology:
    return Topology(d["kind"], tuple(PoolSpec(**p) for p in d["pools"]), link=d["link"], router=d["router"])


def profile_key(p: CostProfile) -> dict:
    """The parts of a profile that change a simulation (not its name, fit report or environment)."""
    d = p.to_dict()
    return {k: d[k] for k in ("prefill", "decode", "links", "memory_bytes", "model")}


# --- the base workload ------------------------------------------------------------------------------------------
def set_base_workload(doc: str) -> None:
    """Worker initializer: the base workload (JSON: name, arrival_s, prompt, output lists)."""
    d = json.loads(doc)
    if len(_BASES) > 8:
        _BASES.clear()
    _BASES[d["fingerprint"]] = {"name": d["name"], "arrival_s": np.asarray(d["arrival_s"], float),
                                "prompt": np.asarray(d["prompt"], np.int64), "output": np.asarray(d["output"], np.int64)}


def base_workload_doc(w: Workload) -> str:
    """The base workload (arrivals from 0, prompt and output lengths) as the JSON workers read."""
    if len(w) < 2 or w.duration_s <= 0:
        raise ValueError(f"workload {w.name!r} needs at least 2 requests over a positive span to rescale its rate")
    a = np.array([r.arrival_s for r in w.requests], float)
    p = np.array([r.prompt_tokens for r in w.requests], np.int64)
    o = np.array([r.output_tokens for r in w.requests], np.int64)
    a -= a[0]
    fp = hashlib.sha256(a.tobytes() + p.tobytes() + o.tobytes()).hexdigest()[:16]
    return json.dumps({"name": w.name, "arrival_s": a.tolist(), "prompt": p.tolist(), "output": o.tolist(),
                       "fingerprint": fp})


def _head(b: dict, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``total`` requests, the trace repeated end to end (one mean gap apart) when it is shorter."""
    a, p, o = b["arrival_s"], b["prompt"], b["output"]
    reps = -(-total // len(a))
    if reps > 1:
        span = a[-1] + a[-1] / (len(a) - 1)
        a = np.concatenate([a + i * span for i in range(reps)])
        p, o = np.tile(p, reps), np.tile(o, reps)
    return a[:total], p[:total], o[:total]


def thinned_workload(base: str, rate: float, n: int, g: int, take: int | None = None) -> Workload:
    """Every g-th of the first n*g requests of base workload ``base`` (a fingerprint), arrivals rescaled so the full
    stream has mean rate ``rate``; the first ``take`` of them (default all n)."""
    b = _BASES[base]
    total = n * g
    a, prompt, output = _head(b, total)
    span = a[-1] - a[0]
    scale = ((total - 1) / rate) / span if span > 0 else 0.0
    idx = np.arange(0, total, g)[: take or n]
    t = (a[idx] - a[0]) * scale
    reqs = tuple(RequestSpec(int(i), float(ti), int(prompt[i]), int(output[i])) for i, ti in zip(idx, t, strict=False))
    return Workload(reqs, f"{b['name']}@{rate:.3g}rps/{g}")


# --- the cache ----------------------------------------------------------------------------------------------------
class SimCache:
    """Per-request outcomes of simulations, one Parquet file per (candidate, rate, requests) under ``root``.

    ``root`` None disables caching. Writes are atomic (temp file + rename), so concurrent workers are safe.
    """

    def __init__(self, root: str | None, key: str):
        self.dir = Path(root) / key[:2] / key if root else None

    def _path(self, rate: float, n: int) -> Path:
        assert self.dir is not None
        return self.dir / f"{rate:.9g}_{n}.parquet"

    def has(self, rate: float, n: int) -> bool:
        return self.dir is not None and self._path(rate, n).is_file()

    def get(self, rate: float, n: int) -> dict | None:
        if self.dir is None:
            return None
        p = self._path(rate, n)
        if not p.is_file():
            return None
        try:
            t = pq.read_table(p)
        except (OSError, pa.ArrowInvalid):
            return None  # a damaged entry is simulated again
        return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}

    def put(self, rate: float, n: int, arrays: dict) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self._path(rate, n)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        pq.write_table(pa.table(arrays), tmp)
        os.replace(tmp, p)


# --- one rate -----------------------------------------------------------------------------------------------------
def steady(arrays: dict, warmup_frac: float) -> np.ndarray:
    """Mask of the requests that arrived after the warm-up share of the arrival span."""
    a = arrays["arrival_s"]
    return a >= a.max() * warmup_frac if len(a) else np.zeros(0, bool)


def attainment(arrays: dict, slo: SLO, metric: str = "both", warmup_frac: float = 0.0) -> float:
    """Fraction of (steady-state) requests completed within the targets ``metric`` names; rejected ones miss."""
    keep = steady(arrays, warmup_frac)
    tpot = arrays["tpot_s"]
    met = arrays["ok"].copy()
    if metric in ("both", "ttft"):
        met &= arrays["ttft_s"] <= slo.ttft_s
    if metric in ("both", "tpot"):
        met &= np.isnan(tpot) | (tpot <= slo.tpot_s)
    return float(met[keep].mean()) if keep.any() else 0.0


def _pcts(x: np.ndarray, q: float) -> dict[str, float]:
    """p50 / p90 / p99 and ``slo`` (the SLO's own percentile q) of the non-NaN values."""
    x = x[~np.isnan(x)]
    if not x.size:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "slo": math.nan}
    v = np.percentile(x, (50, 90, 99, q))
    return {"p50": float(v[0]), "p90": float(v[1]), "p99": float(v[2]), "slo": float(v[3])}


class Evaluator:
    """Simulates one topology at given rates (through the cache) and judges them against the SLO."""

    def __init__(self, job: dict):
        self.topo = topology_from_dict(job["topology"])
        self.profiles = {r: CostProfile.from_dict(d, where=f"{r} profile") for r, d in job["profiles"].items()}
        self.model = ModelSpec(**job["model"])
        self.slo = SLO(**job["slo"])
        self.metric = job.get("metric", "both")
        self.g, self.seed = int(job["unit_factor"]), int(job["seed"])
        self.sim_s, self.min_n = float(job["sim_seconds"]), int(job["min_requests"])
        self.warmup, self.prefix_frac = float(job["warmup_frac"]), float(job.get("prefix_frac", 0.0))
        self.base = job["workload"]
        key = json.dumps({"code": job["code_version"], "topology": job["topology"], "model": job["model"],
                          "profiles": {r: profile_key(p) for r, p in self.profiles.items()},
                          "workload": self.base, "g": self.g, "seed": self.seed}, sort_keys=True)
        self.cache = SimCache(job.get("cache_dir"), hashlib.sha256(key.encode()).hexdigest()[:32])
        self.unit = self._unit_topology()
        self.sims = self.hits = 0
        self.simulated_requests = 0
        self.points: dict[float, dict] = {}

    def _unit_topology(self) -> Topology:
        t = self.topo
        for p in t.pools:
            t = t.with_pool(p.role, instances=p.instances // self.g)
        return t

    def requests(self, rate: float) -> int:
        """Requests the unit simulates at cluster rate ``rate``: ``sim_seconds`` of its arrivals, >= min_requests."""
        return min(MAX_REQUESTS, max(self.min_n, math.ceil(rate / self.g * self.sim_s)))

    def run(self, rate: float, take: int | None = None) -> dict:
        """Per-request arrays of the unit simulated at ``rate`` (of the whole cluster), first ``take`` requests."""
        n = self.requests(rate)
        take = take or n
        got = self.cache.get(rate, take)
        if got is not None:
            self.hits += 1
            return got
        from sim.simulator import simulate

        w = thinned_workload(self.base, rate, n, self.g, take=take)
        res = simulate(self.unit, w, self.profiles, model=self.model, seed=self.seed, sample_every_s=math.inf)
        m = per_request(res.records)
        arrays = {"arrival_s": res.records.column("arrival_s").to_numpy(), "ttft_s": m["ttft_s"],
                  "tpot_s": m["tpot_s"], "ok": np.asarray(res.records.column("status").to_pylist()) == "ok"}
        self.sims += 1
        self.simulated_requests += len(w)
        self.cache.put(rate, take, arrays)
        return arrays

    def point(self, rate: float, arrays: dict, full: bool) -> dict:
        keep = steady(arrays, self.warmup)
        ok = arrays["ok"] & keep
        att = attainment(arrays, self.slo, self.metric, self.warmup)
        pt = {"rate_rps": rate, "requests": len(keep), "full": full, "attainment": att,
              "passes": att >= self.slo.attainment,
              "ttft": _pcts(np.where(ok, arrays["ttft_s"], np.nan), self.slo.percentile),
              "tpot": _pcts(np.where(ok, arrays["tpot_s"], np.nan), self.slo.percentile)}
        if full or rate not in self.points:
            self.points[rate] = pt
        return pt

    def _prefix(self, rate: float) -> int:
        n = self.requests(rate)
        k = int(n * self.prefix_frac)
        return k if k >= self.min_n // 2 and k < n else 0

    def passes(self, rate: float) -> bool:
        """Whether the topology meets the SLO attainment at ``rate``; prefix first, full run only when it might."""
        k = self._prefix(rate)
        if k and not self.cache.has(rate, self.requests(rate)) and \
                not self.point(rate, self.run(rate, k), full=False)["passes"]:
            return False
        return self.point(rate, self.run(rate), full=True)["passes"]

    def cached_outcomes(self) -> dict[int, bool]:
        """Grid rates already simulated for this topology (under any SLO) and whether they pass this SLO."""
        out: dict[int, bool] = {}
        if self.cache.dir is None or not self.cache.dir.is_dir():
            return out
        for f in sorted(self.cache.dir.glob("*.parquet")):
            rate_s, n_s = f.stem.rsplit("_", 1)
            k = round(STEPS_PER_OCTAVE * math.log2(float(rate_s)))
            rate = grid_rate(k)
            if f"{rate:.9g}" != rate_s:
                continue  # a target-rate run, not a grid point
            if int(n_s) == self.requests(rate):
                out[k] = self.point(rate, self.run(rate), full=True)["passes"]
            elif int(n_s) == self._prefix(rate) and k not in out and \
                    not self.point(rate, self.run(rate, int(n_s)), full=False)["passes"]:
                out[k] = False
        return out


def _remembered(passes: Callable[[int], object], known: dict[int, bool]) -> Callable[[int], bool]:
    """``passes`` as a bool, each outcome kept in ``known`` so that no grid index is run twice."""
    def ok(k: int) -> bool:
        if k not in known:
            known[k] = bool(passes(k))
        return known[k]
    return ok


def _bracket(known: Mapping[int, bool]) -> tuple[int | None, int | None]:
    """(highest known pass below the lowest known fail, lowest known fail) from outcomes at hand; None for none."""
    fails = [k for k, v in known.items() if not v]
    hi = min(fails) if fails else None
    below = [k for k, v in known.items() if v and (hi is None or k < hi)]
    return (max(below) if below else None), hi


def bisect_goodput(passes, k_start: int, k_min: int, k_max: int, known: dict[int, bool] | None = None,
                   step: int = 6) -> tuple[int | None, bool]:
    """Largest grid index k in [k_min, k_max] with ``passes(k)`` (assumed monotone: passing rates form a prefix).

    ``known`` holds outcomes already at hand (e.g. from the cache); ``step`` is the first stride (grid steps) of the
    walk away from ``k_start``, doubled at each further step. Returns (k or None when even k_min fails, capped: True
    when k_max itself passes).
    """
    known = dict(known or {})
    ok = _remembered(passes, known)
    lo, hi = _bracket(known)
    if lo is None and hi is None:
        k_start = min(max(k_start, k_min), k_max)
        if ok(k_start):
            lo = k_start
        else:
            hi = k_start
    up = step
    while hi is None:  # walk up from a passing rate until one fails
        assert lo is not None
        if lo >= k_max:
            return lo, True
        k = min(lo + up, k_max)
        if ok(k):
            lo, up = k, up * 2
        else:
            hi = k
    down = step
    while lo is None:  # walk down from a failing rate until one passes
        if hi <= k_min:
            return None, False
        k = max(hi - down, k_min)
        if ok(k):
            lo = k
        else:
            hi, down = k, down * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def ladder(passes, k_start: int, k_cap: int, k_floor: int, known: dict[int, bool], step: int = 4) -> None:
    """Walk a rate ladder for one instance: from rung ``k_start`` (or the highest cached pass) up in ``step``s until
    a rung fails (or ``k_cap``), down in octaves while the first fails (to ``k_floor``), then one rung between the
    last pass and the first fail. Outcomes land in ``known``; rates past the first failure add nothing."""
    ok = _remembered(passes, known)
    lo, hi = _bracket(known)
    if lo is None:
        k = min(k_start, hi - step) if hi is not None else k_start
        while k > k_floor and not ok(k):
            hi, k = k, k - STEPS_PER_OCTAVE
        if k <= k_floor:
            return
        lo = k
    while hi is None and lo < k_cap:
        k = lo + step
        if ok(k):
            lo = k
        else:
            hi = k
    if hi is not None and hi - lo > step // 2 > 0:
        ok(lo + (hi - lo) // 2)


def search(job_doc: str) -> str:
    """Run one job (JSON) and answer with JSON: the probed points, goodput (verify mode), counters."""
    job = json.loads(job_doc)
    ev = Evaluator(job)
    out: dict = {"goodput_rps": math.nan, "capped": False, "at_goodput": None, "at_target": None}
    mode = job.get("mode", "verify")
    if mode == "rates":
        for rate in job["rates"]:
            ev.point(rate, ev.run(rate), full=True)
    elif mode == "curve":
        k_ub = grid_index(float(job["capacity_rps"]))
        ladder(lambda k: ev.passes(grid_rate(k)), k_ub - STEPS_PER_OCTAVE, k_ub + 2 * STEPS_PER_OCTAVE,
               k_ub - 8 * STEPS_PER_OCTAVE, ev.cached_outcomes())
    else:
        start = grid_index(float(job["start_rate_rps"]))
        k_ub = grid_index(float(job["capacity_rps"]))
        k, capped = bisect_goodput(lambda k: ev.passes(grid_rate(k)), start, min(start, k_ub) - 6 * STEPS_PER_OCTAVE,
                                   max(start, k_ub) + 2 * STEPS_PER_OCTAVE, ev.cached_outcomes(), step=2)
        goodput = grid_rate(k) if k is not None else 0.0
        out.update(goodput_rps=goodput, capped=capped, at_goodput=ev.points.get(goodput) if k is not None else None)
        if job.get("target_rate_rps"):
            t = float(job["target_rate_rps"])
            out["at_target"] = ev.point(t, ev.run(t), full=True)
    out.update(points=sorted(ev.points.values(), key=lambda p: p["rate_rps"]), sims=ev.sims, hits=ev.hits,
               simulated_requests=ev.simulated_requests)
    return json.dumps(out)
