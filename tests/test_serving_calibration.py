"""Serving calibration (`calibrate.serving`): fitting traced engine steps, its workload, and one short real run."""

import numpy as np
import pytest

pytest.importorskip("torch")

from calibrate.serving import MIN_STEPS, calibration_workload, dispersion, fit_steps
from sim import PRESETS
from sim.cost_profile import CostProfile, DecodePiece, PrefillCost

TRUE = CostProfile("true", "constant", PrefillCost(0.004, 5e-5, 1e-8), (DecodePiece(1 << 30, 0.006, 2e-4, 1e-6),),
                   decode_context="sum")


def _steps(rng, n_pre=40, n_dec=60, noise=0.0):
    steps, t = [], 100.0
    for _ in range(n_pre):
        n = [int(x) for x in rng.integers(16, 1500, rng.integers(1, 4))]
        c = [0] * len(n)
        dur = TRUE.prefill_s(n, c) * (1 + noise * rng.standard_normal())
        steps.append({"w": "C0", "k": "prefill", "t0": t, "t1": t + dur * 1.1, "n": n, "c": c, "u": dur})
        t += dur * 1.2
    for _ in range(n_dec):
        c = [int(x) for x in rng.integers(10, 1500, rng.integers(1, 24))]
        dur = TRUE.decode_step_s(len(c), sum(x + 1 for x in c)) * (1 + noise * rng.standard_normal())
        steps.append({"w": "C1", "k": "decode", "t0": t, "t1": t + dur * 1.1, "n": [1] * len(c), "c": c, "u": dur})
        t += dur * 1.2
    return steps


def test_fit_steps_recovers_the_step_costs_from_cpu_or_wall_time():
    steps = _steps(np.random.default_rng(0))
    base = CostProfile("grid", "calibrated", PrefillCost(1.0), (DecodePiece(1 << 30, 1.0),), links={})
    prof = fit_steps(steps, base, "u")
    assert prof.fit["prefill"]["fit_points"] == 40 and prof.fit["decode"]["fit_points"] == 60
    assert prof.name == "grid:engine-steps" and prof.fit["method"] == "engine steps (u)"
    for n in ([100], [700, 300], [1400]):
        assert prof.prefill_s(n) == pytest.approx(TRUE.prefill_s(n), rel=0.02)
    for b, ctx in ((1, 200), (8, 4000), (20, 20000)):
        assert prof.decode_step_s(b, ctx) == pytest.approx(TRUE.decode_step_s(b, ctx), rel=0.02)
    wall = fit_steps(steps, base, "wall")  # the traces' t1 - t0 are 1.1x the CPU time
    assert wall.prefill_s([500]) == pytest.approx(1.1 * TRUE.prefill_s([500]), rel=0.02)


def test_fit_steps_scales_the_robust_fit_to_the_measured_total():
    """A slow tail (one step in eight 3x slower): the robust fit follows the typical step; scaled, the predictions
    add up to the measured time, per formula."""
    rng = np.random.default_rng(3)
    steps = [st for st in _steps(rng, n_pre=48, n_dec=240) if len(st["c"]) <= 6]  # few batch sizes: a quick fit
    for i, st in enumerate(steps):
        if i % 8 == 0:
            st["u"] *= 3.0
    base = CostProfile("grid", "calibrated", PrefillCost(1.0), (DecodePiece(1 << 30, 1.0),), links={})
    typical = fit_steps(steps, base, "u", mean_scaled=False)
    scaled = fit_steps(steps, base, "u")
    for kind, pred in (("prefill", lambda p, st: p.prefill_s(st["n"], st["c"])),
                       ("decode", lambda p, st: p.decode_step_s(len(st["c"]), sum(c + 1 for c in st["c"])))):
        mine = [st for st in steps if st["k"] == kind]
        total = sum(st["u"] for st in mine)
        assert sum(pred(typical, st) for st in mine) < 0.85 * total
        assert sum(pred(scaled, st) for st in mine) == pytest.approx(total, rel=1e-9)
    assert 1.15 < scaled.fit["prefill"]["mean_scale"] < 1.3 and len(scaled.fit["decode"]["mean_scale"]) == len(scaled.decode)


def test_fit_steps_keeps_how_prefill_steps_spread_around_the_formula():
    """Prefill steps a quarter at 0.7x, half at 1x, a quarter at 1.3x the true time: the profile keeps that spread
    (mean 1, 0.7 .. 1.3), decode steps none of it."""
    rng = np.random.default_rng(5)
    steps = _steps(rng, n_pre=80, n_dec=60)
    for i, st in enumerate(st for st in steps if st["k"] == "prefill"):
        st["u"] *= (0.7, 1.0, 1.0, 1.3)[i % 4]
    base = CostProfile("grid", "calibrated", PrefillCost(1.0), (DecodePiece(1 << 30, 1.0),), links={})
    prof = fit_steps(steps, base, "u")
    q = prof.prefill_dispersion
    assert len(q) == 41 and list(q) == sorted(q)
    assert q[0] == pytest.approx(0.7, rel=0.06) and q[-1] == pytest.approx(1.3, rel=0.06)
    assert q[20] == pytest.approx(1.0, rel=0.06)
    u = np.linspace(0, 1, 100_001)
    assert np.mean([prof.prefill_factor(x) for x in u]) == pytest.approx(1.0, abs=1e-3)
    lo, mid, hi = prof.fit["prefill"]["dispersion_p10_p50_p90"]
    assert lo < 0.8 and hi > 1.2 and mid == pytest.approx(1.0, rel=0.06)
    exact = fit_steps(_steps(np.random.default_rng(5), n_pre=80, n_dec=60), base, "u")  # steps right on the formula
    assert max(exact.prefill_dispersion) / min(exact.prefill_dispersion) < 1.05
    assert dispersion([1.0]) == () and dispersion([0.0, float("nan"), 2.0]) == ()


def test_fit_steps_needs_enough_steps_of_each_kind():
    steps = _steps(np.random.default_rng(1), n_pre=MIN_STEPS - 1)
    assert fit_steps(steps, TRUE) is None


def test_calibration_workload_is_seeded_and_spans_the_context():
    spec = PRESETS["tiny"]
    a = calibration_workload(spec, TRUE, instances=2, duration_s=30, seed=3)
    assert a.requests == calibration_workload(spec, TRUE, instances=2, duration_s=30, seed=3).requests
    assert a.requests != calibration_workload(spec, TRUE, instances=2, duration_s=30, seed=4).requests
    prompts = np.array([r.prompt_tokens for r in a])
    assert prompts.min() >= 16 and prompts.max() <= spec.max_context_tokens - 129
    assert prompts.max() > spec.max_context_tokens // 2  # the long prompts the model serves are fitted too
    assert prompts.max() > 8 * prompts.min()  # log-uniform: short and long prompts both
    assert a.duration_s == pytest.approx(30, rel=0.3)
    # twice the instances: twice the rate
    assert calibration_workload(spec, TRUE, instances=4, duration_s=30, seed=3).rate_rps == \
        pytest.approx(2 * a.rate_rps, rel=0.3)
    # a model with a short context: every request fits it (the engine would reject the rest)
    from dataclasses import replace

    short = calibration_workload(replace(spec, max_context_tokens=128), TRUE, instances=2, duration_s=30, seed=3)
    assert max(r.prompt_tokens + r.output_tokens for r in short) <= 127


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_real_serving_calibration(tiny_model_dir):
    from calibrate.serving import calibrate_serving

    base = CostProfile("grid", "calibrated", PrefillCost(0.01, 8e-5), (DecodePiece(1 << 30, 0.008, 1e-4, 1e-6),))
    profs, info = calibrate_serving(tiny_model_dir, PRESETS["tiny"], base, duration_s=6.0, seed=0)
    prof = profs["colocated"]
    assert info["failed"] == 0 and info["requests"] >= 40 and info["t_end"] > info["t_start"]
    assert prof.fit["method"] == "engine steps (u)" and prof.fit["prefill"]["fit_points"] >= MIN_STEPS
    from calibrate.report import show

    rows = show(prof)  # `disagg calibrate show` and the dashboard read it like a grid profile
    assert rows[0]["points"] == f"{prof.fit['prefill']['fit_points']}/0" and rows[0]["cv_mape"] > 0
    assert prof.meta["serving_calibration"]["requests"] == info["requests"]
    # the tiny model on any CPU: a prefill of 500 tokens costs more than one of 50, and more than a decode step
    assert prof.prefill_s([500]) > prof.prefill_s([50]) > 0
    assert 0 < prof.decode_step_s(1, 100) < prof.prefill_s([500])
    # the workers' wait for their cores, per core's worth of the host's other work, measured on the same run
    assert info["background_cpu"] >= 0 and info["workers_cpu"] > 0
    _assert_core_wait(prof, info, "colocated")


def test_steps_started_while_another_worker_is_mid_step():
    """`contended`: a step is contended when another worker was mid-step at its start, a worker's loop gap under
    ``BUSY_GAP_S`` counting as mid-step; `core_waits` splits the wait accordingly and `contended_share` weighs by CPU
    time."""
    from calibrate.serving import BUSY_GAP_S, contended, contended_share, core_waits

    def st(w, t0, t1, wait):  # a step of worker w from t0 to t1 that waited ``wait`` of its CPU time
        return {"w": w, "k": "decode", "t0": t0, "t1": t1, "u": (t1 - t0) / (1 + wait), "n": [1], "c": [10]}

    other = [st("C1", 0.0, 1.0, 0.0), st("C1", 1.0 + BUSY_GAP_S / 2, 2.0, 0.0)]  # busy 0-2 s (a loop gap inside)
    mine = [st("C0", 0.5, 0.6, 0.2), st("C0", 1.0 + BUSY_GAP_S / 4, 1.1, 0.2),  # contended: in C1's span or its gap
            st("C0", 3.0, 3.1, 0.02), st("C0", -1.0, -0.9, 0.02)]              # alone: after / before C1's steps
    assert contended(mine, mine + other) == [True, True, False, False]
    assert contended(mine) == [False] * 4  # only its own worker's steps
    u = [s["u"] for s in mine]
    assert contended_share(mine, mine + other) == pytest.approx(sum(u[:2]) / sum(u))
    many = [dict(s, t0=s["t0"] + 10 * i, t1=s["t1"] + 10 * i) for i in range(8) for s in mine + other]
    wait, alone = core_waits([s for s in many if s["w"] == "C0"], 0.5, many)
    assert wait == pytest.approx(0.2 / 0.5) and alone == pytest.approx(0.02 / 0.5)


def _assert_core_wait(prof, info, role):
    from calibrate.serving import MIN_BACKGROUND_CPU

    if info["background_cpu"] < MIN_BACKGROUND_CPU:  # too quiet a host to say where its background lands
        assert prof.core_wait is None and role not in info.get("core_wait", {})
        return
    cw = prof.fit["core_wait"]
    assert prof.core_wait == info["core_wait"][role] >= 0 and cw["background_cpu"] == info["background_cpu"]
    assert 0 <= cw["contended"] <= 1
    bg = info["background_cpu"]
    if prof.core_wait_alone is None:  # too few steps on one side: one figure for all of them
        assert prof.core_wait * bg == pytest.approx(cw["waited"])
    else:  # the two classes' waits, weighted by their CPU time, make up the steps' measured wait (to rounding)
        assert prof.core_wait_alone == info["core_wait_alone"][role] >= 0
        mix = cw["contended"] * prof.core_wait * bg + (1 - cw["contended"]) * prof.core_wait_alone * bg
        assert mix == pytest.approx(cw["waited"], abs=0.002)
    back = CostProfile.from_dict(prof.to_dict())
    assert (back.core_wait, back.core_wait_alone) == (prof.core_wait, prof.core_wait_alone)


def test_step_wait_and_core_wait_from_traced_steps():
    from calibrate.serving import MIN_BACKGROUND_CPU, core_waits, step_wait

    steps = _steps(np.random.default_rng(0))  # every step's wall time is 1.1x its CPU time
    assert step_wait(steps) == pytest.approx(0.1)
    # one worker: no step ever starts while another is mid-step, so one figure for all
    assert core_waits(steps, 0.25) == (pytest.approx(0.4), None)
    assert core_waits(steps, MIN_BACKGROUND_CPU / 2) == (None, None)  # too little background to attribute the wait to
    no_u = [{k: v for k, v in st.items() if k != "u"} for st in steps]
    assert step_wait(no_u) == 0.0 and core_waits(no_u, 0.25) == (None, None)
    fast = [{**st, "t1": st["t0"] + 0.9 * st["u"]} for st in steps]  # clock granularity: never a negative wait
    assert step_wait(fast) == 0.0


def test_loop_overhead_is_the_mean_busy_gap_between_steps():
    from calibrate.serving import loop_overhead_s

    def st(w, t0, t1):
        return {"w": w, "k": "decode", "t0": t0, "t1": t1, "n": [1], "c": [10], "u": t1 - t0}

    steps = [st("C0", 0.0, 0.010), st("C0", 0.0104, 0.020), st("C0", 0.0206, 0.030),  # gaps 0.4 and 0.6 ms
             st("C0", 0.5, 0.51),  # after 470 ms idle: not loop overhead
             st("C1", 0.0, 0.01), st("C1", 0.0105, 0.02)]  # 0.5 ms; workers are not mixed up
    assert loop_overhead_s(steps) == pytest.approx(0.0005)
    assert loop_overhead_s(steps[:1]) == 0.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_real_disaggregated_serving_calibration_fits_each_role(tiny_model_dir):
    from calibrate.serving import calibrate_serving

    base = CostProfile("grid", "calibrated", PrefillCost(0.01, 8e-5), (DecodePiece(1 << 30, 0.008, 1e-4, 1e-6),))
    profs, info = calibrate_serving(tiny_model_dir, PRESETS["tiny"], base, duration_s=6.0, seed=0, disaggregated=True)
    assert set(profs) == {"prefill", "decode"} and info["topology"] == "1P1D" and info["failed"] == 0
    pre, dec = profs["prefill"], profs["decode"]
    assert "prefill" in pre.fit and "decode" not in pre.fit and pre.decode == base.decode  # P0 runs no decode steps
    assert "decode" in dec.fit and "prefill" not in dec.fit and dec.prefill == base.prefill
    assert pre.prefill != base.prefill and dec.decode != base.decode
    # the engine's KV hand-off, measured on the same requests: the decode role's link and request delay
    h = info["handoff"]
    assert h["requests"] >= 8 and 0 < h["wait_s"] < 1 and 0 < h["pull_mean_s"] < 1
    assert dec.fit["handoff"] == h and dec.request_overhead_s == h["wait_s"] and pre.request_overhead_s == 0
    assert dec.links["shm"].latency_s == h["latency_s"] and dec.links["shm"].bandwidth_bytes_per_s == h["bandwidth_bytes_per_s"]
    for role, prof in profs.items():  # each role's own wait for its core
        _assert_core_wait(prof, info, role)


def test_fit_handoff_recovers_the_wait_and_the_pulls_latency_and_bandwidth():
    """Requests whose pull takes 1.5 ms + bytes at 1 GB/s after a wait of 2 ms on average; failed requests, ones
    without KV (colocated) and ones missing a time are left out."""
    import pyarrow as pa

    from calibrate.serving import fit_handoff, with_handoff

    rng = np.random.default_rng(0)
    n = 60
    nbytes = rng.uniform(1e5, 2e6, n)
    end = np.cumsum(rng.uniform(0.05, 0.2, n))
    wait = rng.uniform(0.001, 0.003, n)
    start = end + wait
    pull = 0.0015 + nbytes / 1e9
    status = ["ok"] * n
    status[3] = "failed"
    kv_end = start + pull
    kv_end[7] = np.nan
    nbytes[11] = 0
    table = pa.table({"status": status, "prefill_end_s": end, "kv_transfer_start_s": start, "kv_transfer_end_s": kv_end,
                      "kv_bytes": nbytes.astype(np.int64)})
    h = fit_handoff(table)
    keep = np.ones(n, bool)
    keep[[3, 7, 11]] = False
    assert h["requests"] == n - 3 and h["wait_s"] == pytest.approx(wait[keep].mean())
    assert h["latency_s"] == pytest.approx(0.0015, rel=1e-3) and h["bandwidth_bytes_per_s"] == pytest.approx(1e9, rel=1e-3)
    assert h["pull_mape"] < 1e-3
    assert fit_handoff(table.slice(0, 5)) is None  # too few requests
    assert fit_handoff(table.drop(["kv_bytes"])) is None  # not a disaggregated run's records
    base = CostProfile("d", "calibrated", PrefillCost(0.01), (DecodePiece(1 << 30, 0.004),))
    prof = with_handoff(base, h, "shm")
    assert prof.links["shm"].latency_s == h["latency_s"] and prof.request_overhead_s == h["wait_s"]
    assert CostProfile.from_dict(prof.to_dict()).links["shm"] == prof.links["shm"]


def test_the_diagnostic_trace_profile_adds_each_kinds_own_loop_between_steps(tmp_path):
    """`validate.runner.trace_profile` (1P1D): wall-time fit of the run's steps plus the prefill workers' busy gap
    on prefill steps and the decode workers' on decode steps."""
    import json

    from validate.runner import trace_profile

    base = CostProfile("grid", "calibrated", PrefillCost(1.0), (DecodePiece(1 << 30, 1.0),), links={})
    t = {"prefill": 10.0, "decode": 50.0}
    gap = {"prefill": 0.001, "decode": 0.0004}
    for st in _steps(np.random.default_rng(2)):
        k, dur = st["k"], st["u"]
        st.update(w="P0" if k == "prefill" else "D0", t0=t[k], t1=t[k] + dur)
        t[k] += dur + gap[k]
        with open(tmp_path / f"{st['w']}.jsonl", "a") as f:
            f.write(json.dumps(st) + "\n")
    prof = trace_profile(tmp_path, base)
    assert prof.prefill_s([500]) == pytest.approx(TRUE.prefill_s([500]) + 0.001, rel=0.003)
    assert prof.decode_step_s(8, 4000) == pytest.approx(TRUE.decode_step_s(8, 4000) + 0.0004, rel=0.003)
    assert trace_profile(tmp_path / "none", base) is None  # no steps: nothing to fit
