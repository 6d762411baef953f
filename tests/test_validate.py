"""validate: the error computation on constructed records, input checks, and one short real run end to end."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from sim import PRESETS, RequestRecord, records_to_table
from validate.compare import compare, join, rel_err, worst_error
from validate.runner import ValidateError, parse_topology, scaled_workload


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
                                    ({"serving_s": 0}, "--serving-s must be > 0"),
                                    ({"loads": (0.5, 3.0)}, "--loads must be fractions")])
def test_validate_rejects_bad_options_before_running_anything(kw, msg):
    from validate.runner import validate

    with pytest.raises(ValidateError, match=msg):
        validate(**kw)


def test_scaled_workload_fits_context_and_is_seeded():
    tiny = PRESETS["tiny"]
    w = scaled_workload("azure-conv", tiny, 200, rate_rps=3.0, seed=1)
    assert max(r.prompt_tokens + r.output_tokens for r in w) < tiny.max_context_tokens
    assert w.rate_rps == pytest.approx(3.0, rel=0.25)
    assert [r.arrival_s for r in w] == [r.arrival_s for r in scaled_workload("azure-conv", tiny, 200, 3.0, seed=1)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_validate_run_end_to_end(tmp_path):
    from disagg_cli.main import app

    out = tmp_path / "v"
    res = CliRunner().invoke(app, ["validate", "--topologies", "1P1D", "--loads", "0.5", "--num-requests", "12",
                                   "--burst", "8", "--budget-s", "25", "--serving-s", "6", "--host-speed", "--max-error", "100",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["capacity_rps"]["1P1D"] > 0 and len(s["runs"]) == 1
    run = s["runs"][0]
    assert run["compared"] == 12
    for k in ("ttft_p50", "tpot_p50", "throughput"):
        assert math.isfinite(run["errors"][k]) and abs(run["errors"][k]) < 5  # sane, not a unit slip
    assert (out / "joined.parquet").exists() and (out / "error_vs_load.png").exists()
    assert (out / "profile.json").exists()
    assert s["config"]["calibration"] == "serving" and s["config"]["host_speed"]
    for k in ("ttft_p50", "tpot_p50"):  # the same run simulated without the measured host speed
        assert math.isfinite(run["without_host_speed"][k])
    speed = run["host_speed"]
    assert set(speed) == {"P0", "D0"} and all(0.2 < v["prefill"]["median"] < 5 for v in speed.values())
    from sim.cost_profile import CostProfile

    prof = CostProfile.load(out / "profile.json")
    assert prof.fit["method"] == "engine steps (u)" and prof.meta["host_speed_reference"]["samples"] >= 3
    for role in ("prefill", "decode"):  # the 1P1D pools' own serving calibration
        assert role in CostProfile.load(out / f"profile_{role}.json").fit
    from validate.report import load_report

    summary, joined = load_report(out)
    assert joined.num_rows == 12 and summary["passed"]
