"""Metrics computed from `RequestRecord` tables after a run — one function for the simulator and the engine alike.

Glossary (every metric is defined here once; METRICS.md repeats it for readers):
- TTFT  = first_token_s - arrival_s (time to first token; queueing + prefill).
- TPOT  = (last_token_s - first_token_s) / (output_tokens - 1); defined only for output_tokens >= 2.
          Equal to (E2E - TTFT) / (output_tokens - 1), and to the mean inter-token latency of that request.
- ITL   = inter-token latency; ``max_itl`` is a request's largest gap between consecutive tokens.
- E2E   = finished_s - arrival_s.
- queueing = prefill_start_s - arrival_s; prefill = prefill_end_s - prefill_start_s;
  transfer_wait = kv_transfer_start_s - prefill_end_s (waiting for decode-side blocks);
  transfer = kv_transfer_end_s - kv_transfer_start_s; decode_wait = decode_start_s - kv_transfer_end_s (or
  - prefill_end_s colocated); decode = last_token_s - decode_start_s.
- throughput: completed requests / span and output tokens / span, span = last finish - first arrival.
- SLO attainment: fraction of all requests (rejected ones count as misses) with TTFT <= ttft_s and TPOT <= tpot_s
  (requests with one output token have no TPOT and only need TTFT).
- goodput_rps: requests meeting the SLO per second of span; goodput_rps_per_gpu divides by the cluster's GPUs (all
  roles). The planner's "max goodput" is the highest arrival rate whose attainment >= the SLO's attainment target.
- Percentiles p50/p90/p99 are numpy's linear-interpolation percentiles over completed requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """Latency targets: TTFT and TPOT (seconds) at ``percentile``, and the fraction of requests that must meet both."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1
    percentile: float = 90.0
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError("SLO targets must be positive")
        if not 0 < self.percentile <= 100 or not 0 < self.attainment <= 1:
            raise ValueError("SLO percentile must be in (0, 100] and attainment in (0, 1]")


def _col(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy(zero_copy_only=False).astype(float)


def per_request(records: pa.Table) -> dict[str, np.ndarray]:
    """Per-request metric arrays (NaN where undefined), aligned with the table's rows."""
    arr, first, last = _col(records, "arrival_s"), _col(records, "first_token_s"), _col(records, "last_token_s")
    out = _col(records, "output_tokens")
    pstart, pend = _col(records, "prefill_start_s"), _col(records, "prefill_end_s")
    tstart, tend = _col(records, "kv_transfer_start_s"), _col(records, "kv_transfer_end_s")
    dstart = _col(records, "decode_start_s")
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out >= 2, (last - first) / np.maximum(out - 1, 1), np.nan)
        ready = np.where(np.isnan(tend), pend, tend)
        return {
            "ttft_s": first - arr,
            "tpot_s": tpot,
            "e2e_s": _col(records, "finished_s") - arr,
            "max_itl_s": np.where(out >= 2, _col(records, "max_itl_s"), np.nan),
            "queueing_s": pstart - arr,
            "prefill_s": pend - pstart,
            "transfer_wait_s": tstart - pend,
            "transfer_s": tend - tstart,
            "decode_wait_s": dstart - ready,
            "decode_s": last - dstart,
        }


def _pcts(x: np.ndarray) -> dict[str, float]:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    vals = np.percentile(x, PERCENTILES)
    return {"mean": float(x.mean()), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, vals, strict=False)}}


def _status_is(records: pa.Table, status: str) -> np.ndarray:
    return pc.fill_null(pc.equal(records.column("status"), status), False).to_numpy(zero_copy_only=False).astype(bool)


def _met(m: dict[str, np.ndarray], ok: np.ndarray, slo: SLO) -> np.ndarray:
    tpot_ok = np.where(np.isnan(m["tpot_s"]), True, m["tpot_s"] <= slo.tpot_s)
    return ok & (m["ttft_s"] <= slo.ttft_s) & tpot_ok


def slo_met(records: pa.Table, slo: SLO) -> np.ndarray:
    """Boolean per request: completed and within both targets."""
    return _met(per_request(records), _status_is(records, "ok"), slo)


def summarize(records: pa.Table, slo: SLO | None = None, gpus: int = 1) -> dict:
    """Summary of a run: counts, throughput, latency percentiles, breakdown, SLO attainment and goodput."""
    n = records.num_rows
    ok = _status_is(records, "ok")
    m = per_request(records)
    arr, fin = _col(records, "arrival_s"), _col(records, "finished_s")
    span = float(np.nanmax(fin[ok]) - np.nanmin(arr)) if ok.any() else 0.0
    out_tokens = float(_col(records, "output_tokens")[ok].sum())
    s: dict = {
        "requests": n, "completed": int(ok.sum()), "rejected": int(_status_is(records, "rejected").sum()),
        "span_s": span,
        "throughput_rps": ok.sum() / span if span > 0 else 0.0,
        "output_tokens_per_s": out_tokens / span if span > 0 else 0.0,
        "preemptions": int(_col(records, "preemptions").sum()) if n else 0,
    }
    for key, values in m.items():
        s[key.removesuffix("_s")] = _pcts(np.where(ok, values, np.nan))
    if slo is not None:
        met = _met(m, ok, slo)
        s["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "percentile": slo.percentile,
                    "attainment_target": slo.attainment}
        s["slo_attainment"] = float(met.mean()) if n else 0.0
        s["slo_ok"] = bool(n and met.mean() >= slo.attainment)
        s["goodput_rps"] = float(met.sum() / span) if span > 0 else 0.0
        s["goodput_rps_per_gpu"] = s["goodput_rps"] / max(gpus, 1)
        q = slo.percentile
        s[f"ttft_p{q:g}_s"] = float(np.nanpercentile(m["ttft_s"][ok], q)) if ok.any() else float("nan")
        s[f"tpot_p{q:g}_s"] = (float(np.nanpercentile(m["tpot_s"][ok], q))
                               if ok.any() and not np.isnan(m["tpot_s"][ok]).all() else float("nan"))
    return s
