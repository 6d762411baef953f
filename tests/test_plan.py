"""The capacity planner: bisection and ladders on known answers, composition, a tiny plan whose goodput follows from
a constant cost profile, the on-disk cache, ranking and Pareto frontiers, and bad inputs."""

import math
import time
from dataclasses import replace

import pytest

from sim.cost_profile import constant_profile
from sim.metrics import SLO
from sim.plan_compose import Composition, Curve
from sim.plan_rank import rank
from sim.plan_search import bisect_goodput, grid_rate, ladder
from sim.topology import Topology
from sim.workload_gen import workload_from_dict

# One request at a time (batch limit 1), each prefill 0.1 s, one output token: a colocated instance serves exactly
# 10 req/s. Constant arrivals below that never queue (TTFT = 0.1 s); above it the queue grows without bound.
TOY = replace(constant_profile(0.1, 0.01, name="toy"), hardware="toy", memory_bytes=2**30)
TOY_SLO = SLO(ttft_s=0.3, tpot_s=0.05, percentile=90, attainment=0.9)


def toy_workload(n: int = 4000):
    return workload_from_dict({"num_requests": n, "arrival": {"kind": "constant", "rate_rps": 1.0},
                               "prompt": {"kind": "fixed", "tokens": 64}, "output": {"kind": "fixed", "tokens": 1},
                               "name": "toy"})


def toy_plan(tmp_path, topologies, **kw):
    from sim.plan import plan

    args = dict(model="tiny", profiles=[TOY], workload=toy_workload(), slo=TOY_SLO, topologies=topologies,
                workers=1, cache_dir=tmp_path / "cache", sim_seconds=10.0, refine_routers=())
    return plan(**{**args, **kw})


def colocated(n):
    return Topology.colocated(n, max_batch_size=1)


# --- search primitives ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("start", [0, 20, 37, 38, 60])
def test_bisection_finds_the_largest_passing_grid_rate(start):
    calls = []

    def passes(k):
        calls.append(k)
        return k <= 37

    k, capped = bisect_goodput(passes, start, -50, 100)
    assert (k, capped) == (37, False)
    assert len(calls) == len(set(calls)) and len(calls) <= 9


def test_bisection_uses_known_outcomes_and_reports_bounds():
    assert bisect_goodput(lambda k: pytest.fail("no simulation needed"), 0, -50, 100, {37: True, 38: False}) == (37, False)
    assert bisect_goodput(lambda k: False, 0, -10, 10) == (None, False)
    assert bisect_goodput(lambda k: True, 0, -10, 10) == (10, True)


def test_ladder_stops_at_the_first_failure_and_refines_once():
    known = {}
    ladder(lambda k: k <= 13, 0, 64, -64, known)
    assert max(k for k, v in known.items() if v) == 12 and min(k for k, v in known.items() if not v) == 14
    assert not any(v for k, v in known.items() if k > 14)


def test_composition_of_instance_curves():
    def pts(rates_att):
        return [{"rate_rps": r, "full": True, "attainment": a, "ttft": {q: 0.1 for q in ("p50", "p90", "p99", "slo")},
                 "tpot": {q: 0.02 for q in ("p50", "p90", "p99", "slo")}} for r, a in rates_att]

    pre = Curve(pts([(5, 1.0), (10, 1.0), (20, 0.0)]), 0.9)  # passes up to 10 + 0.1 of the way to 20
    dec = Curve(pts([(10, 1.0), (40, 1.0), (80, 0.0)]), 0.9)
    assert pre.attainment(10) == 1.0 and pre.attainment(20) == 0.0 and pre.attainment(100) == 0.0
    topo = Topology.disaggregated(2, 1)
    g = Composition(topo, [(pre, 2, "ttft"), (dec, 1, "tpot")]).goodput(0.9)
    # prefill limits: attainment 1 - log(r/10)/log(2) >= 0.9  ->  r = 10 * 2**0.1 per prefill instance
    assert g == pytest.approx(2 * 10 * 2**0.1, rel=2e-3)
    assert Composition(topo, [(pre, 2, "ttft"), (dec, 1, "tpot")]).point(g)["ttft"]["p90"] == 0.1


# --- whole plans --------------------------------------------------------------------------------------------------
def test_goodput_is_the_known_capacity_and_round_robin_scales_exactly(tmp_path):
    res = toy_plan(tmp_path, [colocated(1), colocated(2)])
    rows = {r["topology"]: r for r in res.rows()}
    assert rows["1C"]["method"] == rows["2C"]["method"] == "simulated"
    assert rows["1C"]["goodput_rps"] == pytest.approx(grid_rate(53))  # 9.85: the last grid rate below 10 req/s
    assert rows["2C"]["goodput_rps"] == pytest.approx(2 * grid_rate(53))
    assert rows["1C"]["ttft_p50_s"] == pytest.approx(0.1)
    assert 8.5 < rows["1C"]["composed_goodput_rps"] <= 10.4
    assert res.recommendation["name"] in ("1C", "2C") and res.recommendation["reason"]


def test_cache_makes_replanning_fast(tmp_path):
    t0 = time.perf_counter()
    first = toy_plan(tmp_path, [colocated(1), colocated(3)])
    cold = time.perf_counter() - t0
    assert first.stats["simulations"] > 0
    t0 = time.perf_counter()
    again = toy_plan(tmp_path, [colocated(1), colocated(3)])
    warm = time.perf_counter() - t0
    assert again.stats["simulations"] == 0 and warm < cold
    assert again.table.column("goodput_rps").to_pylist() == first.table.column("goodput_rps").to_pylist()
    looser = toy_plan(tmp_path, [colocated(1), colocated(3)], slo=replace(TOY_SLO, ttft_s=0.5))
    assert looser.stats["cache_hits"] > looser.stats["simulations"]


def test_search_space_plan_writes_its_outputs(tmp_path):
    res = toy_plan(tmp_path, None, gpu_budget=3, tps=[1], max_batch_sizes=[1], chunked=[False], verify_top=1)
    assert res.stats["topologies"] == 3 + 3  # 1C 2C 3C; 1P1D 1P2D 2P1D
    out = res.write(tmp_path / "out")
    import json

    import pyarrow.parquet as pq

    doc = json.loads((out / "plan.json").read_text())
    assert doc["recommendation"]["name"] == res.table.column("name")[0].as_py()
    assert pq.read_table(out / "plan.parquet").num_rows == 6 and pq.read_table(out / "curves.parquet").num_rows > 0


# --- ranking ------------------------------------------------------------------------------------------------------
def _result(topo, goodput, ttft, tpot, method="simulated"):
    pt = {"rate_rps": goodput, "attainment": 0.95, "ttft": {"p50": ttft, "p90": ttft, "p99": ttft, "slo": ttft},
          "tpot": {"p50": tpot, "p90": tpot, "p99": tpot, "slo": tpot}}
    return {"_topology": replace(topo, meta={"prefill_hardware": "h100-sxm", "decode_hardware": "h100-sxm"}),
            "goodput_rps": goodput, "at_goodput": pt, "method": method, "points": []}


def test_ranking_and_pareto_frontiers():
    res = [_result(Topology.colocated(1), 10, 0.1, 0.02), _result(Topology.colocated(2), 18, 0.2, 0.02),
           _result(Topology.disaggregated(1, 1), 24, 0.3, 0.01), _result(Topology.disaggregated(2, 2), 40, 0.4, 0.03),
           _result(Topology.colocated(4), 0, math.nan, math.nan)]
    rows = rank(res, price={"h100-sxm": 2.0}, mean_output=100)
    assert [r["topology"] for r in rows] == ["1P1D", "1C", "2P2D", "2C", "4C"]  # 12, 10, 10, 9, 0 req/s per GPU
    lat = {r["topology"]: r["pareto_latency"] for r in rows}
    assert lat == {"1P1D": True, "1C": True, "2P2D": False, "2C": False, "4C": False}
    cost = {r["topology"]: r["pareto_cost"] for r in rows}
    assert cost == {"1P1D": True, "1C": True, "2P2D": True, "2C": False, "4C": False}
    assert rows[0]["cost_per_m_output_tokens"] == pytest.approx(4.0 / (24 * 100 * 3600) * 1e6)
    by_target = rank(res, target=15, price={"h100-sxm": 2.0}, mean_output=100)
    assert [r["topology"] for r in by_target][:3] == ["1P1D", "2C", "2P2D"]  # meet 15 req/s, cheapest first


# --- bad inputs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    ({"model": "no-such-model"}, "unknown model"),
    ({"gpu_budget": 0}, "GPU budget"),
    ({"links": ["carrier-pigeon"]}, "unknown link"),
    ({"target_rate_rps": -1}, "target rate"),
    ({"hardware": "abacus"}, "unknown hardware"),
    ({"workload": "no-such-trace"}, "unknown trace"),
    ({"rank_by": "vibes"}, "rank_by"),
])
def test_bad_inputs_raise_readable_errors(kw, msg):
    from sim.plan import plan

    with pytest.raises(ValueError, match=msg):
        plan(**{"workers": 1, "cache_dir": None, **kw})


def test_cli_reports_bad_input_without_traceback():
    from typer.testing import CliRunner

    from disagg_cli.main import app

    r = CliRunner().invoke(app, ["plan", "--model", "no-such-model", "--no-cache"])
    assert r.exit_code == 2 and "unknown model" in r.output and "Traceback" not in r.output
