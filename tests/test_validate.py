"""validate: the error computation on constructed records, input checks, and one short real run end to end."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from sim import PRESETS, RequestRecord, records_to_table
from sim.request import RequestSpec, Workload
from validate.compare import compare, join, rel_err, worst_error
from validate.runner import ValidateError, capacity_burst, parse_topology, scaled_workload


def records(n, ttft, tpot, out=11, start=0.0, gap=1.0, status="ok"):
    rs = []
    for i in range(n):
        a = start + i * gap
        first = a + ttft[i]
        rs.append(RequestRecord(i, a, 100, out, prefill_start_s=a, prefill_end_s=first, first_token_s=first,
                                decode_start_s=first, last_token_s=first + tpot[i] * (out - 1),
                                finished_s=first + tpot[i] * (out - 1), status=status))
    return records_to_table(rs)


def test_relative_errors_of_percentiles_and_throughput():
    n = 101
    real_ttft = np.linspace(0.1, 1.1, n)
    real = records(n, real_ttft, [0.02] * n)
    sim = records(n, real_ttft * 1.1, [0.018] * n)  # TTFT 10 % slower, TPOT 10 % faster
    c = compare(real, sim)
    for st in ("mean", "p50", "p90", "p99"):
        assert c["errors"][f"ttft_{st}"] == pytest.approx(0.10)
        assert c["errors"][f"tpot_{st}"] == pytest.approx(-0.10)
    assert c["per_request"]["ttft"]["p50"] == pytest.approx(0.10)
    assert c["compared"] == n and c["real_failed"] == 0
    assert worst_error(c) == pytest.approx(0.10)
    assert -0.01 < c["errors"]["throughput"] < 0.01  # same arrivals, nearly the same span


def test_several_simulations_predict_each_statistic_by_their_mean():
    """Seeds of the same requests: each statistic's prediction is its mean over them, their spread is sd / mean,
    the per-request errors come from the first; one simulation gives no spread."""
    n = 101
    base = np.linspace(0.1, 1.1, n)
    real = records(n, base, [0.02] * n)
    sims = [records(n, base * f, [0.02 * f] * n) for f in (1.0, 1.2, 1.4)]  # 0 %, +20 %, +40 %
    c = compare(real, sims)
    for st in ("mean", "p50", "p90"):
        assert c["errors"][f"ttft_{st}"] == pytest.approx(0.20) and c["errors"][f"tpot_{st}"] == pytest.approx(0.20)
        assert c["sim_spread"][f"ttft_{st}"] == pytest.approx(np.std([1.0, 1.2, 1.4]) / 1.2)
    assert c["sim"]["ttft_p50"] == pytest.approx(np.mean([compare(real, t)["sim"]["ttft_p50"] for t in sims]))
    assert c["per_request"]["ttft"]["p50"] == pytest.approx(0.0)  # the first simulation's requests
    assert c["sim_seeds"] == 3 and c["breakdown_mean_s"]["prefill"]["sim"] == pytest.approx(1.2 * base.mean())
    assert "sim_spread" not in compare(real, sims[0]) and "sim_seeds" not in compare(real, sims[:1])
    with pytest.raises(ValueError, match="at least one simulation"):
        compare(real, [])


def test_failed_requests_are_excluded_and_counted():
    real = records(10, [0.1] * 10, [0.01] * 10)
    sim_rows = records(10, [0.1] * 10, [0.01] * 10).to_pylist()
    sim_rows[3]["status"] = "rejected"
    import pyarrow as pa

    sim = pa.Table.from_pylist(sim_rows, schema=real.schema)
    c = compare(real, sim)
    assert c["compared"] == 9 and c["sim_failed"] == 1


def test_join_prefixes_and_aligns_by_id():
    real = records(5, [0.1] * 5, [0.01] * 5)
    sim = records(5, [0.2] * 5, [0.01] * 5).take([4, 3, 2, 1, 0])
    j = join(real, sim)
    assert j.column("request_id").to_pylist() == [0, 1, 2, 3, 4]
    assert np.allclose(j.column("sim_m_ttft_s").to_numpy(), 0.2) and "real_arrival_s" in j.column_names


def test_rel_err_edge_cases():
    assert math.isnan(rel_err(1.0, 0.0)) and math.isnan(rel_err(math.nan, 1.0)) and rel_err(1.5, 1.0) == 0.5


@pytest.mark.parametrize("label,kind,gpus", [("2C", "colocated", 2), ("1p1d", "disaggregated", 2), ("2P3D", "disaggregated", 5)])
def test_parse_topology(label, kind, gpus):
    t = parse_topology(label, kv_capacity_tokens=1000)
    assert t.kind == kind and t.gpus == gpus


@pytest.mark.parametrize("label", ["0C", "P1D", "2X", ""])
def test_parse_topology_rejects(label):
    with pytest.raises(ValidateError, match="e.g. 2C or 1P1D"):
        parse_topology(label)


@pytest.mark.parametrize("kw,msg", [({"calibration": "fast"}, "--calibration must be serving or grid"),
                                    ({"serving_s": 0}, "--serving-s must be a positive number"),
                                    ({"serving_s": math.inf}, "--serving-s must be a positive number"),
                                    ({"burst": 1}, "--burst must be >= 2"),
                                    ({"sim_seeds": 0}, "--sim-seeds must be >= 1"),
                                    ({"length_scale": 0.0}, "--length-scale must be a positive number"),
                                    ({"length_scale": -1.0}, "--length-scale must be a positive number"),
                                    ({"capacity_rps": {"2C": 0.0}}, r"capacity_rps\['2C'\] must be a positive"),
                                    ({"loads": (0.5, 3.0)}, "--loads must be fractions")])
def test_validate_rejects_bad_options_before_running_anything(kw, msg):
    from validate.runner import validate

    with pytest.raises(ValidateError, match=msg):
        validate(**kw)


def test_scaled_workload_names_the_option_that_asked_for_too_many_requests():
    with pytest.raises(ValidateError, match="--burst 999999: the trace has only"):
        scaled_workload("azure-conv", PRESETS["tiny"], 999_999, rate_rps=1.0, seed=0, option="--burst")
    with pytest.raises(ValidateError, match="request rate must be a positive number"):
        scaled_workload("azure-conv", PRESETS["tiny"], 10, rate_rps=0.0, seed=0)


def test_scaled_workload_fits_context_and_is_seeded():
    tiny = PRESETS["tiny"]
    w = scaled_workload("azure-conv", tiny, 200, rate_rps=3.0, seed=1)
    assert max(r.prompt_tokens + r.output_tokens for r in w) < tiny.max_context_tokens
    assert w.rate_rps == pytest.approx(3.0, rel=0.25)
    assert [r.arrival_s for r in w] == [r.arrival_s for r in scaled_workload("azure-conv", tiny, 200, 3.0, seed=1)]


def test_capacity_burst_has_the_load_runs_length_mix():
    tiny = PRESETS["tiny"]
    w = scaled_workload("azure-conv", tiny, 240, rate_rps=3.0, seed=0)
    b = capacity_burst(w, 32)
    assert len(b) == 32 and {r.arrival_s for r in b} == {0.0} and len({r.id for r in b}) == 32
    out = lambda reqs: float(np.mean([r.output_tokens for r in reqs]))  # noqa: E731
    head = scaled_workload("azure-conv", tiny, 32, rate_rps=3.0, seed=0)  # the trace's first 32: lighter than the mix
    assert abs(out(b) / out(w) - 1) < 0.15 < abs(out(head) / out(w) - 1)
    pairs = {(r.prompt_tokens, r.output_tokens) for r in w}
    assert all((r.prompt_tokens, r.output_tokens) in pairs for r in b)
    small = Workload(tuple(RequestSpec(i, i * 0.5, 10 + i, 3 + i) for i in range(5)))  # distinct lengths
    b = capacity_burst(small, 12)  # a burst larger than the runs reuses them in turn
    assert len(b) == 12 and len({r.id for r in b}) == 12
    used = [sum(r.prompt_tokens == s.prompt_tokens and r.output_tokens == s.output_tokens for r in b) for s in small]
    assert sum(used) == 12 and min(used) >= 2  # every run request, each 2-3 times
    with pytest.raises(ValidateError, match="capacity burst"):
        capacity_burst(small, 0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_validate_run_end_to_end(tmp_path):
    from disagg_cli.main import app

    out = tmp_path / "v"
    res = CliRunner().invoke(app, ["validate", "--topologies", "1P1D", "--loads", "0.5", "--num-requests", "12",
                                   "--burst", "8", "--budget-s", "25", "--serving-s", "6", "--host-speed", "--max-error", "100",
                                   "--sim-seeds", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["capacity_rps"]["1P1D"] > 0 and len(s["runs"]) == 1
    run = s["runs"][0]
    assert run["compared"] == 12
    # three simulations of the run: the prediction is their mean, their own spread is reported next to the real one
    assert s["config"]["sim_seeds"] == 3 and run["sim_seeds"] == 3 and run["sim_spread"]["ttft_p50"] >= 0
    assert set(s["sim_spread"]["1P1D@0.5"]) >= {"ttft_p50", "tpot_p50"} and "simulator's spread over 3 seeds" in res.output
    for k in ("ttft_p50", "tpot_p50", "throughput"):
        assert math.isfinite(run["errors"][k]) and abs(run["errors"][k]) < 5  # sane, not a unit slip
    assert (out / "joined.parquet").exists() and (out / "error_vs_load.png").exists()
    assert (out / "profile.json").exists()
    assert s["config"]["calibration"] == "serving" and s["config"]["host_speed"]
    assert math.isfinite(run["without_prefill_dispersion"]["ttft_p50"])  # the serving profile has a dispersion
    for k in ("ttft_p50", "tpot_p50"):  # the same run simulated without the measured host speed
        assert math.isfinite(run["without_host_speed"][k])
    speed = run["host_speed"]
    assert set(speed) == {"P0", "D0"} and all(0.2 < v["prefill"]["median"] < 5 for v in speed.values())
    from sim.cost_profile import CostProfile

    prof = CostProfile.load(out / "profile.json")
    assert prof.fit["method"] == "engine steps (u)" and prof.meta["host_speed_reference"]["samples"] >= 3
    for role in ("prefill", "decode"):  # the 1P1D pools' own serving calibration
        assert role in CostProfile.load(out / f"profile_{role}.json").fit
    assert CostProfile.load(out / "profile_decode.json").fit["handoff"]["requests"] >= 8  # the engine's KV hand-off
    # the calibrated model at the speed this run's steps ran: factors from the step trace, a full set of errors
    assert all(0.2 < run["run_step_speed"][k] < 5 for k in ("prefill", "decode"))
    assert all(math.isfinite(run["with_run_step_speed"][k]) for k in ("ttft_p50", "tpot_p50", "throughput"))
    from validate.report import load_report

    summary, joined = load_report(out)
    assert joined.num_rows == 12 and summary["passed"]
    means = summary["mean_abs_error"]
    assert means["as predicted"]["ttft_p50"] == pytest.approx(abs(run["errors"]["ttft_p50"]))
    assert means["at the run's step speed"]["tpot_p50"] == pytest.approx(abs(run["with_run_step_speed"]["tpot_p50"]))
    assert "mean |error| over 1 runs" in res.output
    # the pinned workers' wait for their cores: measured per step kind, and what the contention model gave them
    import os

    cores = len(os.sched_getaffinity(0))
    from sim.topology import HostCPU

    host = HostCPU(cores, run["host"]["background_cpu"], pinned=True)
    for kind in ("prefill", "decode"):
        role = CostProfile.load(out / f"profile_{kind}.json")
        share = run["service"][kind]["contended"]  # of the CPU time, steps started with another worker mid-step
        assert 0 <= share <= 1 and run["service"][kind]["waited"] >= 0
        model = share * host.pinned_wait(role) + (1 - share) * host.pinned_wait(role, contended=False)
        assert run["core_wait_model"][kind] == pytest.approx(model)


def test_service_error_compares_cpu_time_with_the_profile_less_its_loop(tmp_path):
    """Step error: model-thread CPU time (``u``) against the profile's step time without the loop it carries
    (a core wait, ``t1 - t0 - u``, is the contention model's); ``total`` is the error of the summed times."""
    from calibrate.serving import with_loop
    from sim.cost_profile import CostProfile, DecodePiece, PrefillCost
    from sim.topology import SpeedTrace
    from validate.runner import service_error

    prof = with_loop(CostProfile("p", "constant", PrefillCost(0.010), (DecodePiece(1 << 30, 0.004),)), 0.001)
    steps = [{"w": "C0", "k": "prefill", "t0": 1.0, "t1": 1.5, "n": [10], "c": [0], "u": 0.008},  # -> +25 %
             {"w": "C0", "k": "prefill", "t0": 2.0, "t1": 2.5, "n": [10], "c": [0], "u": 0.012},  # -> -16.7 %
             {"w": "C0", "k": "decode", "t0": 3.0, "t1": 3.1, "n": [1], "c": [5], "u": 0.005}]  # -> -20 %
    (tmp_path / "C0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    e = service_error(tmp_path, prof)
    assert e["prefill"]["steps"] == 2 and e["prefill"]["mean"] == pytest.approx((0.25 - 1 / 6) / 2)
    assert e["prefill"]["total"] == pytest.approx(0.0) and e["decode"]["median"] == pytest.approx(-0.2)
    # how long the steps waited for their core, per kind: total wall / total CPU time - 1
    assert e["prefill"]["waited"] == pytest.approx(1.0 / 0.020 - 1) and e["decode"]["waited"] == pytest.approx(19.0)
    # a core running at half speed from t = 2.5 s (relative to t_origin 0.5): the decode step's prediction doubles
    slow = {"C0": SpeedTrace((0.0, 2.5), (1.0, 1.0), (1.0, 2.0))}
    assert service_error(tmp_path, prof, slow, t_origin=0.5)["decode"]["median"] == pytest.approx(0.6)


def test_run_step_speed_scales_the_model_steps_and_keeps_the_loop():
    """A run whose steps took 1.25x (prefill) and 0.8x (decode) the predicted total is re-simulated with the
    profile's model steps that much longer (each role's profile), the worker loop unchanged."""
    from calibrate.serving import at_speed, with_loop
    from sim.cost_profile import CostProfile, DecodePiece, PrefillCost
    from validate.runner import _scaled, run_step_speed

    base = CostProfile("p", "constant", PrefillCost(0.010, 1e-4, 1e-8), (DecodePiece(8, 0.004, 1e-4, 1e-7),
                                                                         DecodePiece(1 << 30, 0.005, 2e-4, 1e-7)))
    prof = with_loop(base, 0.001)
    f = run_step_speed({"prefill": {"steps": 10, "total": -0.2}, "decode": {"steps": 5, "total": 0.25},
                        "other": {"steps": 3, "total": 9.0}})
    assert f == pytest.approx({"prefill": 1.25, "decode": 0.8})
    assert run_step_speed({"prefill": {"steps": 0, "total": math.nan}, "decode": {"steps": 4, "total": math.nan}}) \
        == {"prefill": 1.0, "decode": 1.0}  # no steps of a kind, or no total: left as calibrated
    fast = at_speed(prof, f["prefill"], f["decode"])
    for n in ([17], [300, 40]):
        assert fast.prefill_s(n) == pytest.approx(base.prefill_s(n) * 1.25 + 0.001)
    for batch, ctx in ((3, 400), (20, 9000)):  # both decode pieces
        assert fast.decode_step_s(batch, ctx) == pytest.approx(base.decode_step_s(batch, ctx) * 0.8 + 0.001)
    roles = _scaled({"prefill": prof, "decode": prof}, f)
    assert roles["decode"].decode_step_s(3, 400) == pytest.approx(fast.decode_step_s(3, 400))
    assert at_speed(prof) == prof
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="step speed"):
            at_speed(prof, prefill=bad)


def test_validate_refuses_a_profile_of_another_model(tmp_path):
    from dataclasses import replace

    from sim.cost_profile import CostProfile, DecodePiece, PrefillCost
    from validate.runner import validate

    other = replace(PRESETS["tiny"], name="wider", hidden_size=PRESETS["tiny"].hidden_size * 2)
    CostProfile("p", "calibrated", PrefillCost(0.01), (DecodePiece(1 << 30, 0.005),), model=other).save(tmp_path / "p.json")
    with pytest.raises(ValidateError, match=r"--profile .*p.json: calibrated for 'wider'.*hidden_size"):
        validate(profile=tmp_path / "p.json")
    CostProfile("p", "calibrated", PrefillCost(0.01), (DecodePiece(1 << 30, 0.005),), dtype="fp32",
                model=PRESETS["tiny"]).save(tmp_path / "q.json")
    with pytest.raises(ValidateError, match="calibrated in fp32; validate runs the engine in bf16"):
        validate(profile=tmp_path / "q.json")


def test_vllm_backend_refuses_the_builtin_only_flags():
    from disagg_cli.main import app

    res = CliRunner().invoke(app, ["validate", "--backend", "vllm", "--host-speed", "--repeat", "2"])
    assert res.exit_code == 2 and "--host-speed, --repeat: only with the built-in backend" in res.output
    assert "Traceback" not in res.output


def test_validate_cli_reports_bad_numbers_without_a_traceback():
    from disagg_cli.main import app

    res = CliRunner().invoke(app, ["validate", "--burst", "0"])
    assert res.exit_code == 2 and "--burst must be >= 2" in res.output and "Traceback" not in res.output
