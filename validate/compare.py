"""The simulator's error against real runs, computed from two `RequestRecord` tables joined on ``request_id``.

Errors are relative: ``(sim - real) / real`` (positive = the simulator predicts slower / higher). For each latency
metric (TTFT, TPOT, E2E) the error of its mean, p50, p90 and p99; the error of throughput; the distribution of
per-request errors; and a breakdown of where the time goes (queueing, prefill, transfer wait, transfer, decode wait,
decode) on both sides, so a reader can tell a queueing miss from a service-time or transfer miss.

The simulator's draws (prefill step dispersion) are seeded, so one simulation is one sample of its prediction: over
240 requests, the TTFT p50 of ten seeds of the same run spread by 2-4 % (sd) and the p90 by 3-8 % (up to 18 % at a
run's step speed), as much as the fidelity target. Given several simulations of the same requests (seeds), `compare` takes each statistic's mean over
them as the prediction and reports their spread (``sim_spread``: sd / mean); the per-request errors come from the
first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def _completed(t: pa.Table) -> tuple[pa.Table, np.ndarray]:
    ok = np.asarray(t.column("status").to_pylist()) == "ok"
    return t.filter(pa.array(ok)), ok


def _only(t: pa.Table, ids: list[int]) -> pa.Table:
    return t.filter(pa.array(np.isin(t.column("request_id").to_numpy(), ids)))


def _flat(summary: dict) -> dict[str, float]:
    """`sim.metrics.summarize`'s statistics as one flat dict: ``ttft_p50``, ..., ``queueing_mean``, ``throughput_rps``."""
    out = {f"{m}_{st}": float(summary[m][st]) for m in LATENCY for st in STATS}
    out.update({f"{k}_mean": float(summary[k]["mean"]) for k in BREAKDOWN})
    out["throughput_rps"] = float(summary["throughput_rps"])
    return out


def _mean(v: list[float]) -> float:
    a = np.array(v, float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


def _rel_sd(v: list[float]) -> float:
    """sd / mean over the simulations (NaN with fewer than two defined or a zero mean)."""
    a = np.array(v, float)
    a = a[np.isfinite(a)]
    return float(a.std() / a.mean()) if a.size > 1 and a.mean() else math.nan


def compare(real: pa.Table, sim: pa.Table | Sequence[pa.Table]) -> dict:
    """Summary of the simulator's error on one run (see module docstring): ``sim`` is one simulation's records or
    several (seeds) of the same requests. Only requests completed on both sides count (per simulation)."""
    sims = [sim] if isinstance(sim, pa.Table) else list(sim)
    if not sims:
        raise ValueError("compare needs at least one simulation's records")
    real_ok, ok_r = _completed(real)
    real_ids = set(real_ok.column("request_id").to_pylist())
    flats, failed = [], []
    for t in sims:
        sim_ok, ok_s = _completed(t)
        both = sorted(real_ids & set(sim_ok.column("request_id").to_pylist()))
        flats.append(_flat(summarize(_only(sim_ok, both))))
        failed.append(int((~ok_s).sum()))
        if len(flats) == 1:  # the first simulation: the real side, the per-request join
            pair = (_only(real_ok, both), _only(sim_ok, both))
            rflat, n_both = _flat(summarize(pair[0])), len(both)
    sim_stats = {k: _mean([f[k] for f in flats]) for k in rflat}
    out: dict = {"requests": real.num_rows, "compared": n_both, "real_failed": int((~ok_r).sum()),
                 "sim_failed": failed[0], "errors": {}, "real": {}, "sim": {}}
    for m in LATENCY:
        for st in STATS:
            key = f"{m}_{st}"
            out["real"][key], out["sim"][key] = rflat[key], sim_stats[key]
            out["errors"][key] = rel_err(sim_stats[key], rflat[key])
    out["real"]["throughput_rps"], out["sim"]["throughput_rps"] = rflat["throughput_rps"], sim_stats["throughput_rps"]
    out["errors"]["throughput"] = rel_err(sim_stats["throughput_rps"], rflat["throughput_rps"])
    if len(sims) > 1:
        out["sim_seeds"], out["sim_failed_max"] = len(sims), max(failed)
        out["sim_spread"] = {k: _rel_sd([f[k] for f in flats]) for k in (*out["sim"],)}
    j = join(*pair)
    per_req = {}
    for m in LATENCY:
        a, b = j.column(f"sim_m_{m}_s").to_numpy(), j.column(f"real_m_{m}_s").to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            e = (a - b) / b
        e = e[np.isfinite(e)]
        per_req[m] = ({"p10": float(np.percentile(e, 10)), "p50": float(np.percentile(e, 50)),
                       "p90": float(np.percentile(e, 90)), "mean_abs": float(np.abs(e).mean())} if e.size else {})
    out["per_request"] = per_req
    out["breakdown_mean_s"] = {k: {"real": rflat[f"{k}_mean"], "sim": sim_stats[f"{k}_mean"]} for k in BREAKDOWN}
    return out


def worst_error(result: dict, keys: tuple[str, ...] = ("ttft_p50", "tpot_p50", "throughput")) -> float:
    """The largest absolute relative error among ``keys`` (NaN-free; 0 when none are defined)."""
    vals = [abs(result["errors"][k]) for k in keys if not math.isnan(result["errors"].get(k, math.nan))]
    return max(vals) if vals else 0.0
