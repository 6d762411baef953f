"""Runs the planner's simulations: per-instance rate ladders (the screen), then whole-cluster goodput bisections
(the verification of the finalists), spread over worker processes. Jobs, answers and the base workload cross
process boundaries as JSON lines over pipes to `sim.plan_worker` subprocesses (nothing pickled, never forked from a
threaded caller, the caller's ``__main__`` never re-imported)."""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import subprocess
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from sim import plan_search
from sim.cost_profile import CostProfile, constant_profile
from sim.metrics import SLO
from sim.model_spec import ModelSpec
from sim.plan_compose import Composition, Curve
from sim.plan_space import Lengths, fits, instance_capacity_rps, unit_factor, unloaded_attainment
from sim.request import Workload
from sim.topology import PoolSpec, Topology

log = logging.getLogger(__name__)
Progress = Callable[[int, int, str], None]
_ROOT = Path(__file__).resolve().parent.parent
_HUGE = 1 << 40
_NULL = constant_profile(1e-7, 1e-7, name="null")  # the other side of a one-pool ladder: (almost) free
_K = TypeVar("_K", bound=Hashable)
# A one-instance ladder's key: (role, device, one-instance pool), plus the link for a decode ladder.
CurveKey = tuple[str, str, PoolSpec] | tuple[str, str, PoolSpec, str]
# (key, one-pool topology, profiles per role, metric, capacity) of one ladder.
CurveSpec = tuple[CurveKey, Topology, dict[str, CostProfile], str, float]


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Runner:
    """Evaluates candidates for one plan: same model, workload, SLO, profiles and cache throughout."""

    def __init__(self, model: ModelSpec, base: Workload, slo: SLO, profiles: Mapping[tuple[str, int], CostProfile],
                 sim_seconds: float, min_requests: int, warmup_frac: float, prefix_frac: float,
                 target_rate_rps: float | None, seed: int, cache_dir: str | Path | None, workers: int | None,
                 ray_address: str | None = None):
        self.model, self.slo, self.profiles = model, slo, profiles
        self.target, self.seed = target_rate_rps, seed
        self.settings = {"sim_seconds": sim_seconds, "min_requests": min_requests, "warmup_frac": warmup_frac,
                         "prefix_frac": prefix_frac, "seed": seed, "cache_dir": str(cache_dir) if cache_dir else None,
                         "code_version": plan_search.code_version(),
                         "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "percentile": slo.percentile,
                                 "attainment": slo.attainment}, "model": model.to_dict()}
        self.base_doc = plan_search.base_workload_doc(base)
        used = json.loads(self.base_doc)
        self.settings["workload"] = used["fingerprint"]
        self.lens = Lengths(np.asarray(used["prompt"]), np.asarray(used["output"]))
        self.longest = int((self.lens.prompt + self.lens.output).max())
        plan_search.set_base_workload(self.base_doc)
        self.workers = max(1, workers or _cpus())
        self.ray_address = ray_address  # set: jobs run as Ray tasks there (sim.ray_jobs), not in local processes
        self._procs: list[subprocess.Popen] = []
        self.sims = self.hits = self.requests = 0
        self.skipped: list[str] = []
        self.curves: dict[CurveKey, Curve] = {}
        self.curve_points: dict[CurveKey, list[dict]] = {}

    # --- per-topology facts -----------------------------------------------------------------------------------
    def device(self, t: Topology, role: str) -> str:
        key = "prefill_hardware" if role in ("prefill", "colocated") else "decode_hardware"
        if key in t.meta:
            return t.meta[key]
        hw = t.pool(role).hardware
        if hw is not None:
            return hw
        devices = {h for h, _ in self.profiles}
        if len(devices) == 1:
            return devices.pop()
        raise ValueError(f"topology {t.label}: its {role} pool names no hardware")

    def role_profiles(self, t: Topology) -> dict[str, CostProfile] | str:
        """{role: profile} for ``t``, or why it cannot run (no profile; weights or the longest request do not fit)."""
        out: dict[str, CostProfile] = {}
        for p in t.pools:
            hw = self.device(t, p.role)
            if (hw, p.tp) not in self.profiles:
                return f"no cost profile for {hw} at TP {p.tp}"
            out[p.role] = self.profiles[(hw, p.tp)]
            why = fits(self.model, p, out[p.role], self.longest)
            if why:
                return why
        return out

    def _kv(self, pool: PoolSpec, prof: CostProfile) -> int:
        return pool.kv_capacity(self.model, prof.memory_bytes if pool.hardware is None else None)

    def _curve_specs(self, t: Topology, profs: dict[str, CostProfile]) -> list[CurveSpec]:
        """The one-instance ladders ``t`` is composed of: (key, topology, profiles, metric, capacity), one per pool."""
        out: list[CurveSpec] = []
        if t.kind == "colocated":
            p, prof = t.pool("colocated"), profs["colocated"]
            p1 = PoolSpec(**{**p.__dict__, "instances": 1})
            cap = instance_capacity_rps("colocated", prof, p, self._kv(p, prof), self.lens)
            out.append((("colocated", self.device(t, "colocated"), p1), Topology("colocated", (p1,)),
                        {"colocated": prof}, "both", cap))
            return out
        pre, dec = t.pool("prefill"), t.pool("decode")
        free = {"kv_capacity_tokens": _HUGE, "max_batch_size": 1 << 20, "max_batch_tokens": _HUGE}
        pre1 = PoolSpec(**{**pre.__dict__, "instances": 1})
        dec1 = PoolSpec(**{**dec.__dict__, "instances": 1})
        only_pre = Topology("disaggregated", (pre1, PoolSpec(**{**dec1.__dict__, "tp": pre.tp, **free})), link=t.link)
        only_dec = Topology("disaggregated", (PoolSpec(**{**pre1.__dict__, "tp": dec.tp, **free}), dec1), link=t.link)
        out.append((("prefill", self.device(t, "prefill"), pre1), only_pre, {"prefill": profs["prefill"], "decode": _NULL},
                    "ttft", instance_capacity_rps("prefill", profs["prefill"], pre, 0, self.lens)))
        out.append((("decode", self.device(t, "decode"), dec1, t.link), only_dec,
                    {"prefill": _NULL, "decode": profs["decode"]}, "tpot",
                    instance_capacity_rps("decode", profs["decode"], dec, self._kv(dec, profs["decode"]), self.lens)))
        return out

    def _job(self, mode: str, t: Topology, profs: Mapping[str, CostProfile], g: int, **kw: object) -> dict:
        return {**self.settings, "mode": mode, "topology": plan_search.topology_to_dict(t),
                "profiles": {r: p.to_dict() for r, p in profs.items()}, "unit_factor": g, **kw}

    # --- running ----------------------------------------------------------------------------------------------
    def _workers(self, n: int) -> list[subprocess.Popen]:
        """Start (once) up to ``n`` worker processes, each told the base workload."""
        while len(self._procs) < n:
            p = subprocess.Popen([sys.executable, "-m", "sim.plan_worker"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1, cwd=str(_ROOT))
            assert p.stdin is not None
            p.stdin.write(self.base_doc + "\n")
            self._procs.append(p)
        return self._procs[:n]

    def close(self) -> None:
        for p in self._procs:
            if p.stdin:
                p.stdin.close()
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs = []

    def _run(self, jobs: Sequence[tuple[_K, dict]], progress: Progress | None, what: str) -> dict[_K, dict]:
        """Run jobs (key, job) and return {key: answer} in job order: inline when one worker or few jobs, else over
        worker processes (each fed its next job as soon as it answers) or Ray tasks."""
        out: dict[_K, dict] = {}

        def done(key: _K, answer: str) -> None:
            res = json.loads(answer)
            if "error" in res:
                raise RuntimeError(f"planner worker failed:\n{res['error']}")
            self.sims += res["sims"]
            self.hits += res["hits"]
            self.requests += res["simulated_requests"]
            out[key] = res
            if progress:
                progress(len(out), len(jobs), what)

        if self.ray_address is not None:
            from sim import ray_jobs

            ray_jobs.run_jobs(self.ray_address, self.base_doc, [json.dumps(job) for _, job in jobs],
                              lambda i, answer: done(jobs[i][0], answer))
            return {key: out[key] for key, _ in jobs}
        if self.workers == 1 or len(jobs) < 3:
            for key, job in jobs:
                done(key, plan_search.search(json.dumps(job)))
            return out
        todo = list(jobs)
        busy: dict[int, _K] = {}
        sel = selectors.DefaultSelector()
        try:
            for p in self._workers(min(self.workers, len(jobs))):
                key, job = todo.pop(0)
                p.stdin.write(json.dumps(job) + "\n")  # type: ignore[union-attr]
                busy[p.pid] = key
                sel.register(p.stdout, selectors.EVENT_READ, p)  # type: ignore[arg-type]
            while busy:
                for ev, _ in sel.select():
                    p = ev.data
                    line = p.stdout.readline()
                    if not line:
                        raise RuntimeError(f"planner worker {p.pid} exited (code {p.poll()})")
                    done(busy.pop(p.pid), line)
                    if todo:
                        key, job = todo.pop(0)
                        p.stdin.write(json.dumps(job) + "\n")
                        busy[p.pid] = key
        except BaseException:
            self.close()
            raise
        finally:
            sel.close()
        return {key: out[key] for key, _ in jobs}  # in job order, whichever finished first

    def screen(self, cands: Sequence[Topology], progress: Progress | None = None) -> list[dict]:
        """Composed goodput of every candidate from simulated one-instance ladders; skipped ones are recorded."""
        plans: list[tuple[Topology, dict[str, CostProfile], list[CurveSpec]]] = []
        jobs: dict[CurveKey, dict] = {}
        for t in cands:
            profs = self.role_profiles(t)
            if isinstance(profs, str):
                self.skipped.append(f"{t.label}: {profs}")
                continue
            specs = self._curve_specs(t, profs)
            for key, one, p, metric, cap in specs:
                if key not in self.curves and key not in jobs:
                    jobs[key] = self._job("curve", one, p, 1, metric=metric, capacity_rps=cap)
            plans.append((t, profs, specs))
        for key, res in self._run(list(jobs.items()), progress, "instance rate ladders").items():
            self.curve_points[key] = res["points"]
            self.curves[key] = Curve(res["points"], self.slo.attainment)
        out = []
        for t, profs, specs in plans:
            n = {"colocated": "colocated", "prefill": "prefill", "decode": "decode"}
            comp = Composition(t, [(self.curves[key], t.pool(n[key[0]]).instances,
                                    {"colocated": "both", "prefill": "ttft", "decode": "tpot"}[key[0]])
                                   for key, *_ in specs])
            goodput = comp.goodput(self.slo.attainment)
            alone = unloaded_attainment(t, profs, self.lens, self.slo)
            note = f"SLO out of reach even unloaded: {alone:.0%} of requests meet it alone" \
                if alone < self.slo.attainment else ""
            out.append({"_topology": t, "_profiles": profs, "method": "composed", "goodput_rps": goodput,
                        "composed_goodput_rps": goodput, "capacity_rps": comp_capacity(comp),
                        "at_goodput": comp.point(goodput) if goodput > 0 else None,
                        "at_target": comp.point(self.target) if self.target else None, "points": [],
                        "sims": 0, "note": note, "capped": False})
        return out

    def verify(self, rows: Sequence[dict], progress: Progress | None = None) -> None:
        """Whole-cluster bisection for ``rows`` (in place): goodput, latencies and points become simulated ones."""
        jobs = []
        for r in rows:
            t, start = r["_topology"], r["composed_goodput_rps"] or r.get("start_rps") or 0.0
            if start <= 0:
                continue
            g = unit_factor(t)
            jobs.append((id(r), self._job("verify", t, r["_profiles"], g, metric="both", start_rate_rps=start,
                                          capacity_rps=r["capacity_rps"] or start, target_rate_rps=self.target)))
        answers = self._run(jobs, progress, "whole-cluster bisections")
        for r in rows:
            res = answers.get(id(r))
            if res is None:
                continue
            r.update(method="simulated", goodput_rps=res["goodput_rps"], capped=res["capped"],
                     at_goodput=res["at_goodput"], at_target=res["at_target"] or r.get("at_target"),
                     points=res["points"], sims=res["sims"] + res["hits"])

    def compare_point(self, t: Topology, rate: float) -> dict | None:
        """``t`` simulated whole at ``rate`` (for the recommendation's reason); None if it cannot run."""
        profs = self.role_profiles(t)
        if isinstance(profs, str):
            return None
        res = self._run([(0, self._job("rates", t, profs, unit_factor(t), metric="both", rates=[rate]))], None, "")
        return next((p for p in res[0]["points"] if math.isclose(p["rate_rps"], rate)), None)


def comp_capacity(comp: Composition) -> float:
    """The highest cluster rate the instance ladders reached (the composition knows nothing beyond)."""
    return min((c.points[-1]["rate_rps"] * n for c, n, _ in comp.parts if c.points), default=0.0)
