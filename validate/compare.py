"""The simulator's error against real runs, computed from two `RequestRecord` tables joined on ``request_id``.

Errors are relative: ``(sim - real) / real`` (positive = the simulator predicts slower / higher). For each latency
metric (TTFT, TPOT, E2E) the error of its mean, p50, p90 and p99; the error of throughput; the distribution of
per-request errors; and a breakdown of where the time goes (queueing, prefill, transfer wait, transfer, decode wait,
decode) on both sides, so a reader can tell a queueing miss from a service-time or transfer miss.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from sim.metrics import per_request, summarize

LATENCY = ("ttft", "tpot", "e2e")
STATS = ("mean", "p50", "p90", "p99")
BREAKDOWN = ("queueing", "prefill", "transfer_wait", "transfer", "decode_wait", "decode")


def rel_err(sim: float, real: float) -> float:
    """(sim - real) / real; NaN when either is undefined or real is 0."""
    if sim is None or real is None or math.isnan(sim) or math.isnan(real) or real == 0:
        return math.nan
    return (sim - real) / real


def join(real: pa.Table, sim: pa.Table) -> pa.Table:
    """One row per request present in both, columns prefixed ``real_`` / ``sim_``, plus per-request metrics."""
    r_ids, s_ids = real.column("request_id").to_pylist(), sim.column("request_id").to_pylist()
    common = sorted(set(r_ids) & set(s_ids))
    r_idx = {v: i for i, v in enumerate(r_ids)}
    s_idx = {v: i for i, v in enumerate(s_ids)}
    r = real.take(pa.array([r_idx[i] for i in common], pa.int64()))
    s = sim.take(pa.array([s_idx[i] for i in common], pa.int64()))
    cols: dict[str, pa.Array] = {"request_id": pa.array(common, pa.int64())}
    for prefix, t in (("real", r), ("sim", s)):
        for name in t.column_names:
            if name != "request_id":
                cols[f"{prefix}_{name}"] = t.column(name)
        for metric, values in per_request(t).items():
            cols[f"{prefix}_m_{metric}"] = pa.array(values, pa.float64())
    return pa.table(cols)


def compare(real: pa.Table, sim: pa.Table) -> dict:
    """Summary of the simulator's error on one run (see module docstring). Only requests completed on both sides count."""
    ok_r = np.asarray(real.column("status").to_pylist()) == "ok"
    ok_s = np.asarray(sim.column("status").to_pylist()) == "ok"
    real_ok, sim_ok = real.filter(pa.array(ok_r)), sim.filter(pa.array(ok_s))
    both = sorted(set(real_ok.column("request_id").to_pylist()) & set(sim_ok.column("request_id").to_pylist()))
    mask_r = pa.array(np.isin(real_ok.column("request_id").to_numpy(), both))
    mask_s = pa.array(np.isin(sim_ok.column("request_id").to_numpy(), both))
    rsum, ssum = summarize(real_ok.filter(mask_r)), summarize(sim_ok.filter(mask_s))
    out: dict = {"requests": real.num_rows, "compared": len(both), "real_failed": int((~ok_r).sum()),
                 "sim_failed": int((~ok_s).sum()), "errors": {}, "real": {}, "sim": {}}
    for m in LATENCY:
        for st in STATS:
            key = f"{m}_{st}"
            out["real"][key], out["sim"][key] = rsum[m][st], ssum[m][st]
            out["errors"][key] = rel_err(ssum[m][st], rsum[m][st])
    out["real"]["throughput_rps"], out["sim"]["throughput_rps"] = rsum["throughput_rps"], ssum["throughput_rps"]
    out["errors"]["throughput"] = rel_err(ssum["throughput_rps"], rsum["throughput_rps"])
    j = join(real_ok.filter(mask_r), sim_ok.filter(mask_s))
    per_req = {}
    for m in LATENCY:
        a, b = j.column(f"sim_m_{m}_s").to_numpy(), j.column(f"real_m_{m}_s").to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            e = (a - b) / b
        e = e[np.isfinite(e)]
        per_req[m] = ({"p10": float(np.percentile(e, 10)), "p50": float(np.percentile(e, 50)),
                       "p90": float(np.percentile(e, 90)), "mean_abs": float(np.abs(e).mean())} if e.size else {})
    out["per_request"] = per_req
    out["breakdown_mean_s"] = {k: {"real": rsum[k]["mean"], "sim": ssum[k]["mean"]} for k in BREAKDOWN}
    return out


def worst_error(result: dict, keys: tuple[str, ...] = ("ttft_p50", "tpot_p50", "throughput")) -> float:
    """The largest absolute relative error among ``keys`` (NaN-free; 0 when none are defined)."""
    vals = [abs(result["errors"][k]) for k in keys if not math.isnan(result["errors"].get(k, math.nan))]
    return max(vals) if vals else 0.0
