"""Turn measured sweeps into a calibrated `CostProfile`: fit, score on held-out points, derive sanity figures.

The profile's ``fit`` dict (shown by ``disagg calibrate show``)::

    fit.prefill / fit.decode: formula, fit_points, heldout_points, fit_mape, cv_mape, heldout_mape, heldout_max_err,
                              rounds, samples, rejected, median_spread, wall_s, dropped_points, largest_shape
                              (+ terms for prefill: optional d / e fitted; pieces for decode)
    fit.links.<kind>:         sizes, samples, mape, max_err, bandwidth_bytes_per_s, latency_s
    fit.ceilings:             copy (bytes/s) and gemm (FLOP/s) measured in the same run
    fit.derived:              decode KV bytes/s per piece = kv_bytes_per_token / c; prefill FLOP/s = 2 x matmul
                              params / b — each next to its ceiling

Errors are fractions (0.05 = 5 %). A held-out MAPE above 10 % is logged as a warning.
"""

from __future__ import annotations

import numpy as np

from calibrate.fit import DecodeFit, PrefillFit, check_heldout, error_summary, fit_decode, fit_prefill
from calibrate.sweep import SweepResult
from sim.cost_profile import CostProfile
from sim.hardware import LinkSpec
from sim.model_spec import ModelSpec


def _sweep_stats(res: SweepResult) -> dict:
    sums = list(res.summaries.values())
    largest = max(res.points, key=lambda p: p.work)
    return {"rounds": res.rounds, "samples": sum(s.kept + s.rejected for s in sums),
            "rejected": sum(s.rejected for s in sums), "median_spread": float(np.median([s.spread for s in sums])),
            "wall_s": round(res.wall_s, 2), "dropped_points": len(res.dropped),
            "largest_shape": [largest.batch, largest.length]}


def fit_prefill_sweep(res: SweepResult) -> tuple[PrefillFit, dict]:
    """Fit the prefill formula to the sweep's fit points; score it on its held-out points."""
    b, s1, s2, y = res.arrays(heldout=False)
    fit = fit_prefill(b, s1, s2, y)
    hb, hs1, hs2, hy = res.arrays(heldout=True)
    held = error_summary(fit.predict(hb, hs1, hs2), hy)
    check_heldout("prefill", held)
    formula = "a + b*sum(len) + c*sum(len^2)" + (" + d*num_seqs" if "d" in fit.terms else "") + (
        " + e*sum(len)^2" if "e" in fit.terms else "")
    return fit, {"formula": formula,
                 "fit_points": len(y), "heldout_points": held["points"],
                 "fit_mape": error_summary(fit.predict(b, s1, s2), y)["mape"], "cv_mape": fit.cv_mape,
                 "heldout_mape": held["mape"], "heldout_max_err": held["max_err"], "terms": fit.terms,
                 **_sweep_stats(res)}


def fit_decode_sweep(res: SweepResult) -> tuple[DecodeFit, dict]:
    """Fit the piecewise decode formula to the sweep's fit points; score it on its held-out points."""
    b, ctx, _, y = res.arrays(heldout=False)
    fit = fit_decode(b, ctx, y)
    hb, hctx, _, hy = res.arrays(heldout=True)
    held = error_summary(fit.predict(hb, hctx), hy)
    check_heldout("decode", held)
    return fit, {"formula": "a_p + b_p*batch + c_p*sum(context)", "pieces": len(fit.pieces), "fit_points": len(y),
                 "heldout_points": held["points"], "fit_mape": error_summary(fit.predict(b, ctx), y)["mape"],
                 "cv_mape": fit.cv_mape, "heldout_mape": held["mape"], "heldout_max_err": held["max_err"],
                 **_sweep_stats(res)}


def derived_figures(spec: ModelSpec, pre: PrefillFit, dec: DecodeFit, ceilings: dict) -> dict:
    """Achieved rates implied by the fit, next to the measured ceilings (None where a coefficient is 0)."""
    copy = ceilings.get("copy", {}).get("bytes_per_s")
    gemm = ceilings.get("gemm", {}).get("flops_per_s")
    kv = [spec.kv_bytes_per_token / p.c_s if p.c_s > 0 else None for p in dec.pieces]
    pre_flops = 2 * spec.matmul_params / pre.cost.b_s if pre.cost.b_s > 0 else None
    return {"kv_bytes_per_token": spec.kv_bytes_per_token, "decode_kv_bytes_per_s": kv, "copy_bytes_per_s": copy,
            "decode_kv_vs_copy": [k / copy if k and copy else None for k in kv],
            "prefill_flops_per_s": pre_flops, "gemm_flops_per_s": gemm,
            "prefill_vs_gemm": pre_flops / gemm if pre_flops and gemm else None}


def build_profile(name: str, spec: ModelSpec, device, dtype: str, results: dict[str, SweepResult],
                  links: dict[str, LinkSpec], link_fit: dict, ceilings: dict, env: dict, meta: dict) -> CostProfile:
    """Fit both phases and assemble the calibrated profile (``device``: the torch device measured on)."""
    pre, pre_info = fit_prefill_sweep(results["prefill"])
    dec, dec_info = fit_decode_sweep(results["decode"])
    memory = env.get("gpu_memory_bytes") if device.type == "cuda" else None
    return CostProfile(
        name=name, source="calibrated", prefill=pre.cost, decode=dec.pieces, tp=1,
        hardware="cpu" if device.type == "cpu" else f"cuda:{env.get('device_name', '')}", dtype=dtype, model=spec,
        links=links, memory_bytes=memory, decode_context="padded",  # the runner pads decode attention to the longest
        fit={"prefill": pre_info, "decode": dec_info, "links": link_fit, "ceilings": ceilings,
             "derived": derived_figures(spec, pre, dec, ceilings)},
        environment=env, meta=meta)
