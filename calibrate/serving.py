"""Serving calibration: fit step costs to the engine's own model steps while it serves a calibration workload.

Why: the grid calibration (`calibrate.harness`) times each shape back to back in one process, the hottest a step can
run. On the 2-core machine disagg is developed on, the engine's prefill steps under serving took 1.5-1.8x the CPU time
that profile predicts for the same shapes (four 1P1D runs: 1.52-1.57x, pinned or not), while decode steps agreed
within the machine's noise. Measured parts of it, each in one process on one core: a prefill of 64-512 tokens right after
decode steps costs 4-9 % more than one right after another prefill, one after 0.3 s idle up to 35 % more, and a
fresh process ran the same prefills back to back up to 1.23x slower than the calibration's fit at the same host
speed (`calibrate.host_speed`); the prefill worker's steps also wait for their core ~13 % of their CPU time (its KV
sender thread, the router). So the serving calibration measures steps where they run, and scales each fitted
formula so that it adds up to the measured total (steps on a shared machine have a long slow tail, which sums such
as a TPOT see; `fit_steps`). It also measures the worker's loop between steps (sampling, bookkeeping, messages to
the router: 0.38-0.54 ms mean per step in two runs, ~5 % of a decode step), which no step timer sees, and adds it
to every step (`loop_overhead_s`).

How: start the engine colocated with one worker per CPU (pinned, ``Cluster(pin_cores=True)``), replay a synthetic
workload with step tracing on (`engine.step_trace`), and fit the traced steps with the grid calibration's formulas
(`calibrate.fit`). The time fitted is each step's CPU time in the worker's model thread (``u``): waiting for the core
is left to the simulator's contention model (`sim.topology.HostCPU`), as in validation. The run measures that wait
too, per role, as a fraction of the steps' CPU time per core's worth of background work on the host, for steps
that start while another worker is mid-step and for the others (`CostProfile.core_wait` / ``core_wait_alone``,
`core_waits`): pinned workers do not share their cores evenly with the rest of the host, and the background waits
for an idle core when there is one.
The workload is its own: prompt lengths log-uniform over 16 .. the model's context less 129 tokens (at most 4,096),
outputs log-uniform over 4 .. 128, so that the formulas are fitted over the lengths the model serves rather than
extrapolated (with prompts up to half the context, as before, a 2C run of validation lengths took 1.19-1.32x the
fit's time for its 18 prefills over 768 tokens and 0.93-1.02x for shorter ones);
Poisson arrivals at ~50 % of the colocated cluster's capacity estimated from ``base`` (a grid profile), seeded
apart from any validation workload. Links, model and everything else come from ``base``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa

from calibrate import CalibrationError
from calibrate.fit import fit_decode, fit_prefill
from sim.cost_profile import CostProfile, with_links
from sim.hardware import LinkSpec
from sim.model_spec import ModelSpec
from sim.request import RequestSpec, Workload

UTILIZATION = 0.5
MAX_OUTPUT = 128  # calibration requests' output tokens: log-uniform over 4 .. this
MAX_PROMPT = 4096  # and prompts over 16 .. this or the longest the context leaves room for next to MAX_OUTPUT
MIN_REQUESTS = 40
MIN_STEPS = 8
DISPERSION_POINTS = 41  # quantiles kept of the prefill steps' measured / predicted (`dispersion`)
MIN_BACKGROUND_CPU = 0.02  # cores' worth: below this a serving run's background says nothing of where it lands
BUSY_GAP_S = 0.002  # a gap between two steps of a worker shorter than this: the worker was busy, not waiting for work
_SEED_OFFSET = 1_000_003  # calibration prompts never coincide with a validation workload's of the same seed


def read_steps(trace_dir: str | Path) -> list[dict]:
    """Every step record of an `engine.step_trace` folder."""
    return [json.loads(line) for f in sorted(Path(trace_dir).glob("*.jsonl")) for line in f.read_text().splitlines()]


def fit_steps(steps: list[dict], base: CostProfile, time_key: str = "u", name: str = "",
              kinds: tuple[str, ...] = ("prefill", "decode"), mean_scaled: bool = True) -> CostProfile | None:
    """``base`` with the formulas of ``kinds`` fitted to traced steps (``time_key``: ``"u"`` model-thread CPU seconds,
    or ``"wall"`` for ``t1 - t0``); the other kind keeps ``base``'s. None when a kind in ``kinds`` has fewer than
    `MIN_STEPS` steps. ``fit`` has the grid calibration's layout (``prefill`` / ``decode``: step counts as fit points
    and the cross-validated MAPE; there are no held-out shapes; ``links`` kept) with ``base``'s under ``base``.

    ``mean_scaled`` (default): the fit's shape (`calibrate.fit`, robust to outliers, so it follows the typical step)
    is then scaled so that its predictions add up to the measured total, per formula (the prefill formula, each
    decode piece); the factor is kept as ``mean_scale``. Steps served on a shared machine have a long slow tail (cores
    slowing down for seconds, interruptions), and the simulator needs each step's expected time: sums such as a
    TPOT or a busy period see the tail. Measured on 12 validation runs against the same real runs: TPOT p50 mean
    |error| 11.1 % unscaled, 7.6 % scaled, TTFT p50 11.6 % either way, every p90 and mean closer (README)."""

    def seconds(st: dict) -> float:
        return st["t1"] - st["t0"] if time_key == "wall" else st[time_key]

    pre = [st for st in steps if st["k"] == "prefill" and seconds(st) > 0]
    dec = [st for st in steps if st["k"] == "decode" and seconds(st) > 0]
    if ("prefill" in kinds and len(pre) < MIN_STEPS) or ("decode" in kinds and len(dec) < MIN_STEPS):
        return None
    fit: dict = {"method": f"engine steps ({time_key})", "links": base.fit.get("links", {}),
                 "base": {k: v for k, v in base.fit.items() if k != "links"}}
    prof = replace(base, name=name or f"{base.name}:engine-steps")
    if "prefill" in kinds:
        pf = fit_prefill(np.array([len(st["n"]) for st in pre]), np.array([sum(st["n"]) for st in pre], float),
                         np.array([sum((c + n) ** 2 - c * c for n, c in zip(st["n"], st["c"], strict=True))
                                   for st in pre], float),
                         np.array([seconds(st) for st in pre]))
        prof = replace(prof, prefill=pf.cost)
        fit["prefill"] = {"fit_points": len(pre), "heldout_points": 0, "cv_mape": pf.cv_mape}
        if mean_scaled:
            k = sum(map(seconds, pre)) / sum(prof.prefill_s(st["n"], st["c"]) for st in pre)
            prof = at_speed(prof, prefill=k)
            fit["prefill"]["mean_scale"] = k
        prof = replace(prof, prefill_dispersion=dispersion([seconds(st) / prof.prefill_s(st["n"], st["c"]) for st in pre]))
        fit["prefill"]["dispersion_p10_p50_p90"] = [prof.prefill_factor(u) for u in (0.1, 0.5, 0.9)]

    def term(st: dict) -> float:
        ctx = [c + 1 for c in st["c"]]
        return float(sum(ctx) if base.decode_context == "sum" else len(ctx) * max(ctx))

    if "decode" in kinds:
        df = fit_decode(np.array([len(st["c"]) for st in dec]), np.array([term(st) for st in dec]),
                        np.array([seconds(st) for st in dec]))
        prof = replace(prof, decode=df.pieces)
        fit["decode"] = {"fit_points": len(dec), "heldout_points": 0, "cv_mape": df.cv_mape, "pieces": len(df.pieces)}
        if mean_scaled:
            pieces, scales, lo = [], [], 0
            for piece in prof.decode:
                mine = [st for st in dec if lo < len(st["c"]) <= piece.max_batch]
                k = (sum(map(seconds, mine)) / sum(prof.decode_step_s(len(st["c"]), term(st)) for st in mine)
                     if mine else 1.0)
                pieces.append(replace(piece, a_s=piece.a_s * k, b_s=piece.b_s * k, c_s=piece.c_s * k))
                scales.append(k)
                lo = piece.max_batch
            prof = replace(prof, decode=tuple(pieces))
            fit["decode"]["mean_scale"] = scales
    return replace(prof, fit=fit)


def dispersion(ratios: list[float], points: int = DISPERSION_POINTS) -> tuple[float, ...]:
    """`CostProfile.prefill_dispersion` from measured / predicted step times: ``points`` quantiles at evenly spaced
    probabilities, scaled so their piecewise-linear quantile function has mean 1 (the formula keeps the mean; this
    only spreads steps around it)."""
    r = np.asarray([x for x in ratios if math.isfinite(x) and x > 0], float)
    if r.size < 2:
        return ()
    q = np.quantile(r, np.linspace(0.0, 1.0, points))
    mean = (q[1:] + q[:-1]).sum() / (2 * (points - 1))
    return tuple(float(x) for x in q / mean)


def loop_overhead_s(steps: list[dict], busy_gap_s: float = BUSY_GAP_S) -> float:
    """Mean time a busy worker spends between the end of one model step and the start of its next (sampling,
    bookkeeping, messages to the router): gaps under ``busy_gap_s`` only, so idle waits do not count. 0 without any."""
    gaps = []
    by_worker: dict[str, list[dict]] = {}
    for st in steps:
        by_worker.setdefault(st["w"], []).append(st)
    for ss in by_worker.values():
        ss.sort(key=lambda st: st["t0"])
        gaps += [b["t0"] - a["t1"] for a, b in pairwise(ss) if 0 <= b["t0"] - a["t1"] < busy_gap_s]
    return float(np.mean(gaps)) if gaps else 0.0


def with_loop(prof: CostProfile, loop_s: float, kinds: tuple[str, ...] = ("prefill", "decode")) -> CostProfile:
    """``prof`` with the worker loop's time between steps (`loop_overhead_s`) added to every step of ``kinds``
    (the fixed term of each formula), recorded per kind in ``fit["loop_overhead_s"]`` (`loop_in` reads it)."""
    if "prefill" in kinds:
        prof = replace(prof, prefill=replace(prof.prefill, a_s=prof.prefill.a_s + loop_s))
    if "decode" in kinds:
        prof = replace(prof, decode=tuple(replace(p, a_s=p.a_s + loop_s) for p in prof.decode))
    old = prof.fit.get("loop_overhead_s", {})
    loops = dict(old) if isinstance(old, dict) else {"prefill": old, "decode": old}
    loops.update({k: loop_s for k in kinds})
    return replace(prof, fit={**prof.fit, "loop_overhead_s": loops})


def at_speed(prof: CostProfile, prefill: float = 1.0, decode: float = 1.0) -> CostProfile:
    """``prof`` with its model steps ``prefill`` / ``decode`` times as long: every term of the formula, less the
    worker loop `with_loop` added to it (the loop is not a model step and keeps its measured time)."""
    if not (math.isfinite(prefill) and prefill > 0 and math.isfinite(decode) and decode > 0):
        raise ValueError(f"step speed factors must be finite and > 0, got prefill {prefill!r}, decode {decode!r}")
    if prefill == 1.0 and decode == 1.0:
        return prof
    lp, ld = loop_in(prof, "prefill"), loop_in(prof, "decode")
    c = prof.prefill
    pre = replace(c, a_s=(c.a_s - lp) * prefill + lp, b_s=c.b_s * prefill, c_s=c.c_s * prefill, d_s=c.d_s * prefill,
                  e_s=c.e_s * prefill)
    dec = tuple(replace(p, a_s=(p.a_s - ld) * decode + ld, b_s=p.b_s * decode, c_s=p.c_s * decode) for p in prof.decode)
    return replace(prof, prefill=pre, decode=dec)


def loop_in(prof: CostProfile, kind: str) -> float:
    """The loop time `with_loop` added to ``kind`` steps of ``prof`` (0 for a profile without; profiles written
    before it was kept per kind hold one number for both)."""
    loops = prof.fit.get("loop_overhead_s", 0.0)
    return float(loops.get(kind, 0.0) if isinstance(loops, dict) else loops)


def step_wait(steps: list[dict]) -> float:
    """How long ``steps`` waited for their core, as a fraction of their model-thread CPU time: total wall / total
    ``u`` - 1 over the steps that have a ``u`` (0 without any)."""
    timed = [st for st in steps if st.get("u", 0) > 0]
    u = sum(st["u"] for st in timed)
    return max(0.0, sum(st["t1"] - st["t0"] for st in timed) / u - 1.0) if u > 0 else 0.0


def contended(steps: list[dict], all_steps: list[dict] | None = None, busy_gap_s: float = BUSY_GAP_S) -> list[bool]:
    """For each of ``steps``: whether another worker of ``all_steps`` (default ``steps``) was mid-step when it
    started. A worker is mid-step from a step's ``t0`` to its ``t1``, or on to its next step's ``t0`` when the gap is
    under ``busy_gap_s`` (the worker loop between steps, which the simulator counts in the step)."""
    spans: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    by_worker: dict[str, list[dict]] = {}
    for st in steps if all_steps is None else all_steps:
        by_worker.setdefault(st["w"], []).append(st)
    for w, ss in by_worker.items():
        ss = sorted(ss, key=lambda st: st["t0"])
        ends = [b["t0"] if 0 <= b["t0"] - a["t1"] < busy_gap_s else a["t1"] for a, b in pairwise(ss)]
        spans[w] = (np.array([st["t0"] for st in ss]), np.maximum.accumulate(np.array([*ends, ss[-1]["t1"]])))
    out = []
    for st in steps:
        busy = False
        for w, (t0, t1) in spans.items():
            i = int(np.searchsorted(t0, st["t0"], side="right")) - 1
            if w != st["w"] and i >= 0 and t1[i] > st["t0"]:
                busy = True
                break
        out.append(busy)
    return out


def core_waits(steps: list[dict], background_cpu: float, all_steps: list[dict] | None = None
               ) -> tuple[float | None, float | None]:
    """(`CostProfile.core_wait`, ``core_wait_alone``) of pinned workers from their traced ``steps``: the `step_wait`
    of the steps that started while another worker of ``all_steps`` (default ``steps``) was mid-step, and of the
    others, each per core's worth of the host's ``background_cpu`` during the run (`contended`). With fewer than
    `MIN_STEPS` timed steps on either side: the wait of all of them and None. (None, None) when the background was
    under `MIN_BACKGROUND_CPU` (the wait is then mostly measurement noise) or no step has a ``u``."""
    timed = [st for st in steps if st.get("u", 0) > 0]
    if background_cpu < MIN_BACKGROUND_CPU or not timed:
        return None, None
    flags = contended(timed, all_steps if all_steps is not None else steps)
    busy = [st for st, f in zip(timed, flags, strict=True) if f]
    alone = [st for st, f in zip(timed, flags, strict=True) if not f]
    if min(len(busy), len(alone)) < MIN_STEPS:
        return step_wait(timed) / background_cpu, None
    return step_wait(busy) / background_cpu, step_wait(alone) / background_cpu


def contended_share(steps: list[dict], all_steps: list[dict] | None = None) -> float:
    """The share of ``steps``' model-thread CPU time (``u``) in steps that started while another worker of
    ``all_steps`` was mid-step (`contended`); 0 without timed steps."""
    timed = [st for st in steps if st.get("u", 0) > 0]
    u = sum(st["u"] for st in timed)
    if u <= 0:
        return 0.0
    flags = contended(timed, all_steps if all_steps is not None else steps)
    return sum(st["u"] for st, f in zip(timed, flags, strict=True) if f) / u


def describe_wait(prof: CostProfile) -> str:
    """One line on a serving-calibrated profile's measured wait for the core (``fit["core_wait"]``); "" without."""
    cw = prof.fit.get("core_wait")
    if prof.core_wait is None or not isinstance(cw, dict):
        return ""
    line = (f"waited {cw['waited']:.1%} of their CPU time with {cw['background_cpu']:.2f} cores of background: "
            f"core_wait {prof.core_wait:.2f}")
    if prof.core_wait_alone is not None:
        line += (f" when another worker is mid-step ({cw.get('contended', math.nan):.0%} of the CPU time), "
                 f"{prof.core_wait_alone:.2f} when none is")
    return line


def fit_handoff(table: pa.Table, min_requests: int = MIN_STEPS) -> dict | None:
    """The engine's KV hand-off from prefill to decode worker, from a disaggregated run's request records: the
    mean wait from the end of a prefill to the decode worker's pull (``wait_s``: messages between the workers,
    the decode worker reserving blocks) and a least-squares fit of the pull itself (gather, shared-memory write,
    import into the cache, the threads' waits) as ``latency_s + bytes / bandwidth_bytes_per_s``, over the requests
    served without error. Measured on this machine: 0.6-2.1 ms median wait and 1.4-2.3 ms + 1.0-1.9 ms/MB for the pull
    (~0.8 MB per request) in 18 validation runs, where the shared-memory link alone moves 0.8 MB in ~0.2 ms. The
    simulator pays the wait as part of the transfer (`with_handoff`), so its records put it under ``transfer``, not
    ``transfer_wait``. None with fewer than ``min_requests`` usable requests."""
    cols = ("status", "prefill_end_s", "kv_transfer_start_s", "kv_transfer_end_s", "kv_bytes")
    if any(c not in table.column_names for c in cols):
        return None
    d = {c: table.column(c).to_numpy(zero_copy_only=False) for c in cols}
    ok = (d["status"] == "ok") & (d["kv_bytes"] > 0)
    for c in cols[1:4]:
        ok &= np.isfinite(d[c].astype(float))
    wait = (d["kv_transfer_start_s"] - d["prefill_end_s"])[ok].astype(float)
    pull = (d["kv_transfer_end_s"] - d["kv_transfer_start_s"])[ok].astype(float)
    nbytes = d["kv_bytes"][ok].astype(float)
    if wait.size < min_requests or np.any(wait < 0) or np.any(pull < 0):
        return None
    per_byte, latency = (np.polyfit(nbytes, pull, 1) if np.ptp(nbytes) > 0 else (0.0, float(pull.mean())))
    if per_byte <= 0 or latency < 0:  # no size dependence to see (or a negative intercept): keep the mean
        per_byte = max(per_byte, 0.0)
        latency = max(0.0, float(pull.mean() - per_byte * nbytes.mean()))
        per_byte = per_byte or 1e-12  # a link needs a bandwidth: effectively unlimited
    pred = latency + per_byte * nbytes
    return {"requests": int(wait.size), "wait_s": float(wait.mean()), "latency_s": float(latency),
            "bandwidth_bytes_per_s": float(1.0 / per_byte), "pull_mean_s": float(pull.mean()),
            "pull_mape": float(np.mean(np.abs(pred - pull) / np.maximum(pull, 1e-9)))}


def with_handoff(prof: CostProfile, handoff: dict, transport: str) -> CostProfile:
    """``prof`` (the decode role's) with the engine's measured hand-off (`fit_handoff`) as its ``transport`` link
    and its request delay (the simulator adds the decode profile's ``request_overhead_s`` to every transfer); the
    link measured alone stays in ``fit["links"]``."""
    prof = with_links(prof, {transport: LinkSpec(transport, handoff["bandwidth_bytes_per_s"], handoff["latency_s"])})
    return replace(prof, request_overhead_s=handoff["wait_s"], fit={**prof.fit, "handoff": handoff})


def calibration_workload(spec: ModelSpec, base: CostProfile, instances: int, duration_s: float, seed: int) -> Workload:
    """The serving calibration's requests (module docstring): enough for ``duration_s`` at ~50 % of ``instances``
    colocated instances' capacity as ``base`` predicts it (a request costs its prefill plus its decode steps shared
    by a batch of 8)."""
    rng = np.random.default_rng(seed + _SEED_OFFSET)
    max_prompt = max(32, min(MAX_PROMPT, spec.max_context_tokens - MAX_OUTPUT - 1))
    prompts = np.exp(rng.uniform(math.log(16), math.log(max_prompt), 4096)).astype(int)
    outputs = np.exp(rng.uniform(math.log(4), math.log(MAX_OUTPUT), 4096)).astype(int)
    per_request = float(np.mean([base.prefill_s([int(p)]) for p in prompts[:256]]))
    ctx = float(np.mean(prompts) + np.mean(outputs) / 2)
    per_request += float(np.mean(outputs)) * base.decode_step_s(8, 8 * ctx) / 8
    rate = UTILIZATION * instances / per_request
    n = max(MIN_REQUESTS, int(rate * duration_s))
    gaps = rng.exponential(1.0 / rate, n)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    reqs = tuple(RequestSpec(i, float(arrivals[i]), int(prompts[i % 4096]), max(2, int(outputs[i % 4096])))
                 for i in range(n))
    return Workload(reqs, f"serving-calibration@{rate:.2f}rps").clip_lengths(max_total_tokens=spec.max_context_tokens - 1)


def calibrate_serving(model_dir: str | Path, spec: ModelSpec, base: CostProfile, duration_s: float = 45.0,
                      seed: int = 0, transport: str = "shm", cpus: int | None = None, dtype: str = "bf16",
                      trace_dir: str | Path | None = None, disaggregated: bool = False,
                      progress: Callable[[str], None] | None = None) -> tuple[dict[str, CostProfile], dict]:
    """({role: profile fitted to the engine's steps}, run info: monotonic ``t_start`` / ``t_end`` of the load,
    requests, rate, failed requests). Colocated (default): one worker per CPU, role ``"colocated"``, both formulas
    fitted. ``disaggregated``: half the CPUs prefill, half decode (at least one each); role ``"prefill"`` gets the
    prefill workers' prefill formula and role ``"decode"`` the decode workers' decode formula, the other formula
    from ``base``. Each role's loop overhead (`loop_overhead_s`) comes from its own workers. ``trace_dir`` keeps the
    step traces there (default: a temporary folder; its ``*.jsonl`` from an earlier run are deleted first). Raises `CalibrationError` if the run yields too few steps."""
    from engine.cluster import DEFAULT_KV_TOKENS, Cluster, CpuMeter
    from engine.loadgen import run_load
    from engine.step_trace import TRACE_ENV
    from sim.topology import Topology

    say = progress or (lambda msg: None)
    n_cpu = cpus or len(os.sched_getaffinity(0))
    if disaggregated:
        n_p = max(1, n_cpu // 2)
        topo = Topology.disaggregated(n_p, max(1, n_cpu - n_p), kv_capacity_tokens=DEFAULT_KV_TOKENS, link=transport)
        roles = {"prefill": ("P", ("prefill",)), "decode": ("D", ("decode",))}
        w = calibration_workload(spec, base, n_p, duration_s, seed)
    else:
        topo = Topology.colocated(n_cpu, kv_capacity_tokens=DEFAULT_KV_TOKENS)
        roles = {"colocated": ("C", ("prefill", "decode"))}
        w = calibration_workload(spec, base, n_cpu, duration_s, seed)
    say(f"serving calibration ({topo.label}): {len(w)} requests at {w.rate_rps:.2f} req/s")
    old = os.environ.get(TRACE_ENV)
    with tempfile.TemporaryDirectory(prefix="disagg-serving-cal-") as tmp:
        trace_dir = Path(trace_dir or tmp)
        for old_trace in trace_dir.glob("*.jsonl"):  # a kept folder from an earlier run
            old_trace.unlink()
        os.environ[TRACE_ENV] = str(trace_dir)
        try:
            with Cluster(model_dir, topo, transport=transport, seed=seed, pin_cores=True, dtype=dtype) as c:
                meter = CpuMeter(c.worker_pids())
                t_start = time.monotonic()
                table = run_load(c.url, w, seed=seed + _SEED_OFFSET)
                t_end = time.monotonic()
                cpu = meter.read()
        finally:
            os.environ.pop(TRACE_ENV, None)
            if old is not None:
                os.environ[TRACE_ENV] = old
        steps = read_steps(trace_dir)
    status = table.column("status").to_pylist()
    failed = int(sum(s != "ok" for s in status))
    if failed > len(w) // 10:  # steps of a run that mostly failed describe nothing the simulator will see
        why = next(r for s, r in zip(status, table.column("reason").to_pylist(), strict=True) if s != "ok")
        raise CalibrationError(f"serving calibration ({topo.label}): the engine failed {failed} of {len(w)} "
                               f"requests (first: {why or 'no reason given'})")
    info = {"t_start": t_start, "t_end": t_end, "topology": topo.label, "requests": len(w), "rate_rps": w.rate_rps,
            "failed": failed, "duration_s": round(t_end - t_start, 2), **cpu}
    handoff = fit_handoff(table) if disaggregated else None
    if handoff is not None:
        info["handoff"] = handoff
    out = {}
    for role, (prefix, kinds) in roles.items():
        mine = [st for st in steps if st["w"].startswith(prefix)]
        prof = fit_steps(mine, base, "u", name=f"{base.name}:serving-{role}", kinds=kinds)
        if prof is None:
            raise CalibrationError(f"serving calibration ({topo.label}): the {role} workers' {len(mine)} traced steps "
                                   f"are too few to fit ({failed} of {len(w)} requests failed); raise the duration")
        wait, alone = core_waits(mine, cpu["background_cpu"], steps)  # this run's, never ``base``'s
        prof = replace(prof, core_wait=wait, core_wait_alone=alone)
        if wait is not None:
            info.setdefault("core_wait", {})[role] = wait
            if alone is not None:
                info.setdefault("core_wait_alone", {})[role] = alone
            prof = replace(prof, fit={**prof.fit, "core_wait": {
                "waited": step_wait(mine), "contended": contended_share(mine, steps),
                "background_cpu": cpu["background_cpu"]}})
        out[role] = replace(with_loop(prof, loop_overhead_s(mine), kinds),
                            meta={**base.meta, "serving_calibration": {k: v for k, v in info.items()
                                                                       if not k.startswith("t_")}})
    if handoff is not None:
        out["decode"] = with_handoff(out["decode"], handoff, transport)
    return out, info
