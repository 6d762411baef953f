"""`validate(...)`: calibrate, find each topology's capacity, run the real engine at load fractions, simulate exactly
the same requests, and measure the simulator's error (`validate.compare`).

Same-run discipline: calibration, the real runs and the simulations happen in one invocation, so the machine's noise
level is shared. The simulation replays the real run's requests with the arrival times the router stamped (same ids,
lengths, arrivals), on the same `Topology` (the engine and the simulator read the same pool settings), with the
calibrated profile and its measured transport ("shm") as the link. By default the profile's step costs come from a
serving calibration (`calibrate.serving`: the engine's own steps under a calibration workload of its own, seeded
apart from the validation workload), its links from the grid calibration run just before.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from sim.cost_profile import CostProfile
from sim.model_spec import ModelSpec, get_model
from sim.request import RequestSpec, Workload
from sim.simulator import profile_for, simulate
from sim.topology import HostCPU, SpeedTrace, Topology
from sim.traces import load_trace
from validate.compare import compare

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


SIM_SEEDS = 10  # simulations per run: one seed's TTFT p50 over 240 requests was measured to spread 2-4 % (sd)


class ValidateError(ValueError):
    """Bad validate input; the message names the option."""


def parse_topology(label: str, link: str = "shm", **pool_kw: object) -> Topology:
    """``"2C"`` / ``"1P1D"`` with the KV link named after the engine's transport (see `Topology.from_label`)."""
    try:
        return Topology.from_label(label, link=link, **pool_kw)
    except ValueError as e:
        raise ValidateError(f"--topologies: {e}") from None


def scaled_workload(name_or_path: str, model: ModelSpec, num_requests: int, rate_rps: float, seed: int,
                    length_scale: float | None = None, option: str = "--num-requests") -> Workload:
    """``num_requests`` requests with the trace's (prompt, output) pairs, lengths scaled by ``length_scale`` (default:
    so the trace's p99 prompt+output fits the model's context), Poisson arrivals at ``rate_rps`` (seeded). ``option``
    names the flag that asked for ``num_requests`` in errors."""
    if not (rate_rps > 0 and math.isfinite(rate_rps)):
        raise ValidateError(f"request rate must be a positive number, got {rate_rps!r} req/s")
    if length_scale is not None and not (length_scale > 0 and math.isfinite(length_scale)):
        raise ValidateError(f"--length-scale must be a positive number, got {length_scale!r}")
    base = load_trace(name_or_path).head(num_requests)
    if len(base) < num_requests:
        raise ValidateError(f"{option} {num_requests}: the trace has only {len(base)} requests")
    totals = np.array([r.prompt_tokens + r.output_tokens for r in base])
    scale = length_scale or min(1.0, 0.9 * model.max_context_tokens / float(np.percentile(totals, 99)))
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_rps, len(base))
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    reqs = tuple(replace(r, arrival_s=float(a), prompt_tokens=max(1, round(r.prompt_tokens * scale)),
                         output_tokens=max(2, round(r.output_tokens * scale)))
                 for r, a in zip(base.requests, arrivals, strict=False))
    w = Workload(reqs, f"{base.name}-scaled{scale:.2f}@{rate_rps:.2f}rps")
    return w.clip_lengths(max_total_tokens=model.max_context_tokens - 1)


@dataclass
class RunResult:
    topology: str
    load: float
    rate_rps: float
    repeat: int
    real: pa.Table
    sim: pa.Table
    errors: dict


@dataclass
class ValidationReport:
    """Everything a validate run measured; `validate.report.write` turns it into files."""

    profile: CostProfile
    capacity_rps: dict[str, float]
    runs: list[RunResult] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    role_profiles: dict[str, CostProfile] = field(default_factory=dict)  # per pool role, when calibrated per role


def _run_real(model: str, topo: Topology, workload: Workload, transport: str, seed: int,
              trace_dir: Path | None = None, host: dict | None = None, pin_cores: bool = False) -> pa.Table:
    """One real run; with ``trace_dir`` the workers log every model step there (`engine.step_trace`). ``host``, if
    given, receives ``background_cpu``: cores' worth of host CPU used by everything but the workers during the run
    (router, load generator, host-speed sensors, other jobs) — an input to the simulator's `HostCPU` contention
    model — and ``worker_cpus`` (the CPU each worker was pinned to, with ``pin_cores``)."""
    import os

    from engine.cluster import Cluster, CpuMeter
    from engine.loadgen import run_load
    from engine.step_trace import TRACE_ENV

    old = os.environ.pop(TRACE_ENV, None)
    if trace_dir is not None:
        os.environ[TRACE_ENV] = str(trace_dir)
    try:
        with Cluster(model, topo, transport=transport, seed=seed, pin_cores=pin_cores) as c:
            meter = CpuMeter(c.worker_pids())
            table = run_load(c.url, workload, seed=seed)
            if host is not None:
                host.update(meter.read())
                host["worker_cpus"] = dict(c.worker_cpus)
            return table
    finally:
        os.environ.pop(TRACE_ENV, None)
        if old is not None:
            os.environ[TRACE_ENV] = old


def trace_profile(trace_dir: Path, base: CostProfile) -> CostProfile | None:
    """A diagnostic profile fitted to the engine's own traced steps of one run (wall time, same formulas as
    calibration; `calibrate.serving.fit_steps`) plus the measured loop between steps (`calibrate.serving.
    loop_overhead_s`) of the workers that run each kind. Simulating with it isolates the simulator's queueing /
    scheduling error from the calibration's service-time error. It is fitted in-sample on the run it then replays,
    so it is a diagnosis, never a prediction. None when the run has too few steps of a kind to fit."""
    from calibrate.serving import fit_steps, loop_overhead_s, read_steps, with_loop

    steps = read_steps(trace_dir)
    prof = fit_steps(steps, base, "wall", name=f"{base.name}:engine-trace")
    if prof is None:
        return None
    for kind, roles in (("prefill", "CP"), ("decode", "CD")):  # colocated, prefill-only, decode-only workers
        prof = with_loop(prof, loop_overhead_s([st for st in steps if st["w"][:1] in roles]), (kind,))
    return prof


def _for_worker(profile: CostProfile | Mapping[str, CostProfile], worker: str) -> CostProfile:
    """The profile ``worker`` runs with in the simulator (``P0`` prefill, ``D0`` decode, ``C0`` colocated;
    `sim.simulator.profile_for`)."""
    return profile_for(profile, {"P": "prefill", "D": "decode"}.get(worker[:1], "colocated"))


def service_error(trace_dir: Path, profile: CostProfile | Mapping[str, CostProfile],
                  speed: Mapping[str, SpeedTrace] | None = None, t_origin: float = 0.0) -> dict:
    """How the engine's own model steps compare with the profile's prediction for the same shapes, per step kind:
    median and mean of (predicted - measured) / measured, the error of their totals (``total``: what sums such as a
    TPOT see), and the steps' count. Measured is each step's model-thread CPU time (``u``; wall time in traces
    without it) and predicted the profile's step time less the worker loop it includes (`calibrate.serving.loop_in`):
    waiting for a core is the contention model's part (`HostCPU`) and the loop runs between steps, so neither is in a
    step. This separates service-time error (the profile under this load) from queueing and scheduling error (the
    simulator's model). With ``speed`` (per worker, times relative to the monotonic ``t_origin``) each prediction is
    scaled by the host-speed factor in force when the step started, as the simulator does. ``waited``: how long the
    steps waited for their core, as a fraction of their CPU time (`calibrate.serving.step_wait`); ``contended``: the
    share of their CPU time in steps that started while another worker was mid-step (`calibrate.serving.contended`)."""
    from calibrate.serving import contended_share, loop_in, read_steps, step_wait

    rows: dict[str, list[tuple[float, float]]] = {"prefill": [], "decode": []}
    steps = read_steps(trace_dir)
    for st in steps:
        measured = st.get("u", st["t1"] - st["t0"])
        prof = _for_worker(profile, st["w"])
        if st["k"] == "prefill":
            pred = prof.prefill_s(st["n"], st["c"])
        else:
            ctx = [c + 1 for c in st["c"]]
            term = sum(ctx) if prof.decode_context == "sum" else len(ctx) * max(ctx)
            pred = prof.decode_step_s(len(ctx), term)
        pred -= loop_in(prof, st["k"])
        if speed and st["w"] in speed:
            pred *= speed[st["w"]].at(st["k"], st["t0"] - t_origin)[0]
        if measured > 0:
            rows[st["k"]].append((pred, measured))
    out = {}
    for k, v in rows.items():
        p, m = np.array(v).reshape(-1, 2).T
        e = (p - m) / m
        out[k] = {"steps": len(v), "median": float(np.median(e)) if v else math.nan,
                  "mean": float(np.mean(e)) if v else math.nan, "total": float(p.sum() / m.sum() - 1) if v else math.nan,
                  "waited": step_wait(mine := [st for st in steps if st["k"] == k]),
                  "contended": contended_share(mine, steps)}
    return out


def _replay(real: pa.Table, workload: Workload) -> Workload:
    """The workload with the arrival times the router actually stamped (requests it never saw keep theirs)."""
    stamped = dict(zip(real.column("request_id").to_pylist(), real.column("arrival_s").to_pylist(), strict=False))
    reqs = tuple(replace(r, arrival_s=max(0.0, stamped.get(r.id, r.arrival_s)))
                 if not math.isnan(stamped.get(r.id, math.nan)) else r for r in workload.requests)
    return Workload(reqs, workload.name)


def capacity_burst(w: Workload, burst: int) -> Workload:
    """``burst`` requests with the lengths of ``w``'s, spread evenly over it (every ``len(w) / burst``-th; reused in turn
    when ``burst`` > ``len(w)``), all arriving at 0. The capacity ramp runs these, so capacity is measured for the mix
    the load runs serve: a trace's first requests can be lighter (azure-conv's first 32 have 41 output tokens on
    average, its first 240 have 107), and a capacity measured on them sends every "load" past the real one."""
    n = len(w.requests)
    if n == 0 or burst < 1:
        raise ValidateError(f"capacity burst: {burst} requests from a workload of {n}")
    picks = [w.requests[i] for i in (np.arange(burst) * n) // burst]
    return Workload(tuple(RequestSpec(k, 0.0, r.prompt_tokens, r.output_tokens, r.prefix_block_ids)
                          for k, r in enumerate(picks)), f"{w.name}-burst{burst}")


def measure_capacity(model: str, topo: Topology, requests: Workload, transport: str, seed: int, burst: int,
                     pin_cores: bool = False) -> float:
    """A short real ramp: ``burst`` requests at once, drawn from ``requests`` (the load runs' requests) by
    `capacity_burst`; capacity = requests finished by the time half of them are done, divided by that time (the queue
    is still full then, so every instance is busy)."""
    real = _run_real(model, topo, capacity_burst(requests, burst), transport, seed, pin_cores=pin_cores)
    ok = np.asarray(real.column("status").to_pylist()) == "ok"
    fin = np.sort(real.column("finished_s").to_numpy()[ok])
    if fin.size < 2:
        raise ValidateError(f"{topo.label}: the capacity ramp completed {fin.size} of {burst} requests")
    half = fin[fin.size // 2 - 1]
    return (fin.size // 2) / half


def validate(model: str = "tiny", topologies: tuple[str, ...] = ("2C", "1P1D"), loads: tuple[float, ...] = (0.3, 0.6, 0.9),
             workload: str = "azure-conv", num_requests: int = 100, profile: str | Path | None = None,
             calibrate_budget_s: float = 60.0, repeat: int = 1, seed: int = 0, transport: str = "shm",
             length_scale: float | None = None, burst: int = 32, capacity_rps: dict[str, float] | None = None,
             host_contention: bool = True, host_speed: bool = False, calibration: str = "serving",
             serving_s: float = 45.0, sim_seeds: int = SIM_SEEDS, progress: Progress | None = None) -> ValidationReport:
    """Run the measure -> simulate -> compare loop (module docstring). ``capacity_rps`` skips the ramp for the
    topologies it names. ``host_contention``: simulate the workers sharing this host's cores with the background CPU
    measured during each run (`HostCPU`). ``host_speed``: run a `calibrate.host_speed` sensor on every CPU for the
    whole validation and simulate each instance at its core's measured speed relative to the
    calibration's (the profile's ``meta.host_speed_reference``; a --profile without one is simulated without). The
    errors without host speed are reported next to them (``without_host_speed``). ``calibration`` (when no
    ``profile`` is given): ``"grid"`` times each shape in this process (`calibrate.run`); ``"serving"`` (default)
    then also serves a calibration workload of its own on the engine for ``serving_s`` seconds and fits the engine's
    traced steps (`calibrate.serving`), keeping the grid profile's links. The workers of every run (capacity ramps
    too) are pinned one per CPU, as in the serving calibration: unpinned, the same steps took 2-16 % more CPU time
    (prefill 7-16 %, decode 2-10 %; three pinned / unpinned pairs of 35 s 2C runs), a bias between calibration and
    runs. ``sim_seeds``: simulations of each run (seeds ``seed`` and up); each statistic's prediction is their mean
    (`validate.compare`). Raises `ValidateError` on bad input."""
    say = progress or (lambda msg: log.info(msg))
    if not loads or any(not 0 < f <= 2 for f in loads):
        raise ValidateError(f"--loads must be fractions of capacity in (0, 2], got {list(loads)}")
    if num_requests < 2 or repeat < 1:
        raise ValidateError("--num-requests must be >= 2 and --repeat >= 1")
    if sim_seeds < 1:
        raise ValidateError(f"--sim-seeds must be >= 1, got {sim_seeds}")
    if calibration not in ("serving", "grid"):
        raise ValidateError(f"--calibration must be serving or grid, got {calibration!r}")
    if not (serving_s > 0 and math.isfinite(serving_s)):
        raise ValidateError(f"--serving-s must be a positive number of seconds, got {serving_s!r}")
    if burst < 2:
        raise ValidateError(f"--burst must be >= 2 (capacity is read when half of the burst is done), got {burst}")
    if length_scale is not None and not (length_scale > 0 and math.isfinite(length_scale)):
        raise ValidateError(f"--length-scale must be a positive number, got {length_scale!r}")
    for label, cap in (capacity_rps or {}).items():
        if not (cap > 0 and math.isfinite(cap)):
            raise ValidateError(f"capacity_rps[{label!r}] must be a positive number of req/s, got {cap!r}")
    from engine.cluster import DEFAULT_KV_TOKENS, resolve_model

    # the same pool settings for the engine and the simulator (the engine's defaults, made explicit)
    topos = {label: parse_topology(label, link=transport, kv_capacity_tokens=DEFAULT_KV_TOKENS) for label in topologies}
    from sim.model_spec import from_hf_config

    folder = resolve_model(model)
    spec = get_model(model) if model.lower() in ("tiny",) else from_hf_config(folder)
    with ExitStack() as stack:
        sensors = None
        if host_speed:
            from calibrate.host_speed import Sensors

            say("starting host-speed sensors")
            sensors = stack.enter_context(Sensors(folder, sorted(os.sched_getaffinity(0))))
        prof, roles, ref = _profile(profile, folder, spec, calibrate_budget_s, transport, sensors, say,
                                    calibration, serving_s, seed)
        if sensors is not None and ref is None:  # nothing to compare their readings with: stop using the cores
            sensors.cleanup()
            sensors = None
        report = ValidationReport(prof, {}, role_profiles=roles, config={
            "model": model, "topologies": list(topologies), "loads": list(loads), "workload": workload,
            "num_requests": num_requests, "repeat": repeat, "seed": seed, "transport": transport,
            "length_scale": length_scale, "burst": burst, "host_contention": host_contention,
            "host_speed": ref is not None, "calibration": "profile" if profile is not None else calibration,
            "sim_seeds": sim_seeds})
        for label, topo in topos.items():
            if capacity_rps and label in capacity_rps:
                cap = capacity_rps[label]
            else:
                say(f"{label}: capacity ramp ({burst} requests at once)")
                cap = measure_capacity(model, topo, scaled_workload(workload, spec, num_requests, 1.0, seed, length_scale),
                                       transport, seed, burst, pin_cores=True)
            report.capacity_rps[label] = cap
            say(f"{label}: capacity {cap:.2f} req/s")
            for load in loads:
                rate = load * cap
                w = scaled_workload(workload, spec, num_requests, rate, seed, length_scale)
                for k in range(repeat):
                    say(f"{label} at {load:.0%} ({rate:.2f} req/s), run {k + 1}/{repeat}: engine")
                    report.runs.append(_measure_point(model, topo, w, transport, seed, roles or prof, spec, sensors,
                                                      ref, host_contention, label, load, rate, k, sim_seeds))
    return report


def _profile(profile: str | Path | None, folder: Path, spec: ModelSpec, budget_s: float, transport: str,
             sensors: object, say: Progress, calibration: str = "grid", serving_s: float = 45.0,
             seed: int = 0) -> tuple[CostProfile, dict[str, CostProfile], object]:
    """(the profile, per-role profiles or {}, the host-speed `Reference` or None): loaded, or calibrated now (see
    `validate`), with the sensors' reference over the calibration that produced its step costs written into its
    meta. The serving calibration runs colocated (role ``colocated``, also the returned profile) and then
    disaggregated (roles ``prefill`` and ``decode``: each role's steps measured where that role runs them)."""
    from calibrate.host_speed import Reference, reference

    if profile is not None:
        prof = CostProfile.load(profile)
        _check_model(prof, spec, f"--profile {profile}")
        say(f"profile {profile}")
        ref = None
        if sensors is not None and "host_speed_reference" in prof.meta:
            ref = Reference.from_dict(prof.meta["host_speed_reference"], where=f"{profile}: meta.host_speed_reference")
        elif sensors is not None:
            say(f"{profile} has no host-speed reference (calibrated outside validate): simulating without host speed")
    else:
        import calibrate

        say(f"calibrating {folder.name} ({budget_s:.0f} s budget)")
        t0 = time.monotonic()
        prof = calibrate.run(model=str(folder), budget_s=budget_s, transports=[transport]).profile
        t1 = time.monotonic()
        roles: dict[str, CostProfile] = {}
        if calibration == "serving":
            from calibrate.serving import calibrate_serving, describe_wait

            roles, info = calibrate_serving(folder, spec, prof, serving_s, seed, transport, progress=say)
            prof = roles["colocated"]
            split, info2 = calibrate_serving(folder, spec, prof, serving_s, seed, transport, disaggregated=True,
                                             progress=say)
            if "handoff" in info2:
                h = info2["handoff"]
                say(f"KV hand-off in the engine: {h['wait_s'] * 1e3:.2f} ms wait, pull {h['latency_s'] * 1e3:.2f} ms + "
                    f"{1e9 / h['bandwidth_bytes_per_s']:.2f} ms/MB")
            roles.update(split)
            for role, p in roles.items():
                if p.core_wait is not None:
                    say(f"{role} steps {describe_wait(p)}")
            windows = [(info["t_start"], info["t_end"]), (info2["t_start"], info2["t_end"])]  # not the gap between
        else:
            windows = [(t0, t1)]
        ref = None
        if sensors is not None:
            parts = [sensors.readings(a, b) for a, b in windows]  # type: ignore[attr-defined]
            ref = reference({cpu: np.concatenate([p[cpu] for p in parts]) for cpu in parts[0]})
        if ref is not None:
            stamp = {"host_speed_reference": ref.to_dict()}
            prof = replace(prof, meta={**prof.meta, **stamp})
            roles = {k: replace(v, meta={**v.meta, **stamp}) for k, v in roles.items()}
        return _check_links(prof, transport), roles, ref
    return _check_links(prof, transport), {}, ref


_SHAPE = ("layers", "hidden_size", "heads", "kv_heads", "head_dim", "intermediate_size", "vocab_size")


def _check_model(prof: CostProfile, spec: ModelSpec, where: str) -> None:
    """A profile of another model's shapes would be simulated without a word: refuse it."""
    if prof.dtype != "bf16":  # the engine validate starts runs bf16 (`engine.cluster.Cluster`)
        raise ValidateError(f"{where}: calibrated in {prof.dtype}; validate runs the engine in bf16")
    if prof.model is None:
        return
    diff = [f"{k} {getattr(prof.model, k)} (engine model: {getattr(spec, k)})" for k in _SHAPE
            if getattr(prof.model, k) != getattr(spec, k)]
    if diff:
        raise ValidateError(f"{where}: calibrated for {prof.model.name!r}, whose shapes differ from the engine "
                            f"model {spec.name!r}: " + ", ".join(diff))


def _check_links(prof: CostProfile, transport: str) -> CostProfile:
    if transport not in prof.links:
        raise ValidateError(f"the profile has no measured {transport!r} transport (has {sorted(prof.links)}); "
                            "recalibrate with the transport sweep")
    return prof


def _measure_point(model: str, topo: Topology, w: Workload, transport: str, seed: int,
                   prof: CostProfile | Mapping[str, CostProfile],
                   spec: ModelSpec, sensors: object, ref: object, host_contention: bool, label: str, load: float,
                   rate: float, k: int, sim_seeds: int = 1) -> RunResult:
    """One real run at one load, its simulations (with / without host speed, with the engine's own step costs;
    each ``sim_seeds`` times, seeds ``seed``, ``seed + 1``, ...) and their errors."""
    from calibrate.host_speed import speed_traces
    from engine.loadgen import T0_KEY

    host: dict = {}
    with tempfile.TemporaryDirectory(prefix="disagg-steps-") as trace_dir:
        real = _run_real(model, topo, w, transport, seed, Path(trace_dir), host, pin_cores=True)
        speed: dict[str, SpeedTrace] = {}
        t_origin = float((real.schema.metadata or {}).get(T0_KEY, b"nan"))
        if ref is not None and math.isfinite(t_origin):
            readings = sensors.readings(t_origin - 5.0, time.monotonic())  # type: ignore[attr-defined]
            speed = speed_traces(readings, host["worker_cpus"], ref, t_origin)  # type: ignore[arg-type]
        service = service_error(Path(trace_dir), prof)
        service_speed = service_error(Path(trace_dir), prof, speed, t_origin) if speed else None
        diag = trace_profile(Path(trace_dir), _for_worker(prof, "C"))
    cores = len(os.sched_getaffinity(0))  # the cores the workers and `engine.cluster.CpuMeter` share
    replay = _replay(real, w)
    # the runs' workers are pinned one per core: each waits for the background that lands on its core
    pinned = sum(p.instances for p in topo.pools) <= cores
    cpu = HostCPU(cores, host.get("background_cpu", 0.0), speed=speed, pinned=pinned) if host_contention else \
        (HostCPU(cores, speed=speed, contention=False) if speed else None)
    def sims(p: CostProfile | Mapping[str, CostProfile], h: HostCPU | None) -> list[pa.Table]:
        """``p``'s simulations of the run's requests, one per seed (`validate.compare`: the mean is the prediction)."""
        return [simulate(topo, replay, p, model=spec, seed=seed + i, host=h).records for i in range(sim_seeds)]

    predicted = sims(prof, cpu)
    plain = HostCPU(cores, host.get("background_cpu", 0.0), pinned=pinned) if host_contention else None  # no host speed
    errors = {**compare(real, predicted), "service": service, "host": host}
    if plain is not None and pinned:  # the contention model's wait per step kind, next to ``service``'s measured one
        errors["core_wait_model"] = {kind: _model_wait(plain, _for_worker(prof, worker), service[kind]["contended"])
                                     for kind, worker in (("prefill", "P" if topo.kind == "disaggregated" else "C"),
                                                          ("decode", "D" if topo.kind == "disaggregated" else "C"))}
    if speed:
        errors["without_host_speed"] = compare(real, sims(prof, plain))["errors"]
        errors["service_with_host_speed"] = service_speed
        errors["host_speed"] = {name: {kind: _factor_summary(getattr(tr, kind)) for kind in ("prefill", "decode")}
                                for name, tr in speed.items()}
    flat = _without_dispersion(prof)
    if flat is not prof:  # the same run with one deterministic time per prefill shape (`CostProfile.prefill_dispersion`)
        errors["without_prefill_dispersion"] = compare(real, sims(flat, cpu))["errors"]
    # the calibrated model at the speed this run's steps actually ran (one factor per step kind, from the trace):
    # what is left is the model's error, not the host's change of speed since the calibration
    errors["run_step_speed"] = factors = run_step_speed(service)
    errors["with_run_step_speed"] = compare(real, sims(_scaled(prof, factors), plain))["errors"]
    if diag is not None:  # the queueing model alone: the engine's own step costs, no contention stretch
        errors["with_engine_step_costs"] = compare(real, sims(diag, None))["errors"]
    return RunResult(label, load, rate, k, real, predicted[0], errors)


def _model_wait(host: HostCPU, prof: CostProfile, contended: float) -> float:
    """The contention model's wait for a run's steps of one kind (`HostCPU.pinned_wait`), given the share of their
    CPU time that started while another worker was mid-step (``service_error``'s ``contended``)."""
    return contended * host.pinned_wait(prof, True) + (1.0 - contended) * host.pinned_wait(prof, False)


def run_step_speed(service: Mapping[str, dict]) -> dict[str, float]:
    """How much longer than the profile predicts a run's model steps took, per kind: measured / predicted total
    (`service_error`'s ``total``); 1 for a kind the run had no steps of."""
    out = {}
    for kind in ("prefill", "decode"):
        e = service.get(kind) or {}
        total = e.get("total", math.nan)
        out[kind] = 1.0 / (1.0 + total) if e.get("steps") and math.isfinite(total) and total > -1 else 1.0
    return out


def _scaled(prof: CostProfile | Mapping[str, CostProfile], factors: Mapping[str, float]
            ) -> CostProfile | Mapping[str, CostProfile]:
    """``prof`` (one profile or one per role) with its steps stretched by ``factors`` (`calibrate.serving.at_speed`)."""
    from calibrate.serving import at_speed

    if isinstance(prof, CostProfile):
        return at_speed(prof, factors["prefill"], factors["decode"])
    return {role: at_speed(p, factors["prefill"], factors["decode"]) for role, p in prof.items()}


def _without_dispersion(prof: CostProfile | Mapping[str, CostProfile]) -> CostProfile | Mapping[str, CostProfile]:
    """``prof`` (one profile or one per role) without prefill dispersion; ``prof`` itself when none has one."""
    if isinstance(prof, CostProfile):
        return replace(prof, prefill_dispersion=()) if prof.prefill_dispersion else prof
    if not any(p.prefill_dispersion for p in prof.values()):
        return prof
    return {role: replace(p, prefill_dispersion=()) for role, p in prof.items()}


def _factor_summary(f: tuple[float, ...]) -> dict:
    v = np.asarray(f)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "readings": int(v.size)}
