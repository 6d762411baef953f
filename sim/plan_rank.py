"""The planner's answers from its search results: the ranked table, the Pareto frontiers and the recommendation.

Ranking: with a target rate, topologies that reach it come first, cheapest per hour first (ties: more goodput);
without one, by goodput per GPU (``rank_by="goodput_per_gpu"``; a whole-cluster simulated row ahead of a composed
estimate less than 5 % better, the search's resolution) or cost per million output tokens (``"cost"``).
Frontiers: ``pareto_latency`` — no other topology has more goodput per GPU and lower TTFT and TPOT (at the SLO's
percentile, at the reference rate: the target rate, or each topology's goodput); ``pareto_cost`` — no other topology
is cheaper per hour with at least as much goodput.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import pyarrow as pa

from sim.metrics import SLO
from sim.topology import Topology

COLUMNS = pa.schema([
    ("rank", pa.int64()), ("name", pa.string()), ("topology", pa.string()), ("kind", pa.string()),
    ("gpus", pa.int64()), ("prefill_hardware", pa.string()), ("decode_hardware", pa.string()),
    ("instances", pa.int64()), ("tp", pa.int64()),  # colocated pools
    ("prefill_instances", pa.int64()), ("prefill_tp", pa.int64()), ("decode_instances", pa.int64()),
    ("decode_tp", pa.int64()), ("link", pa.string()), ("router", pa.string()), ("max_batch_size", pa.int64()),
    ("chunked_prefill", pa.bool_()), ("capacity_rps", pa.float64()), ("goodput_rps", pa.float64()),
    ("goodput_rps_per_gpu", pa.float64()), ("method", pa.string()), ("composed_goodput_rps", pa.float64()),
    ("capped", pa.bool_()), ("cost_per_hour", pa.float64()),
    ("cost_per_m_output_tokens", pa.float64()), ("ref_rate_rps", pa.float64()), ("attainment_at_ref", pa.float64()),
    ("ttft_p50_s", pa.float64()), ("ttft_p90_s", pa.float64()), ("ttft_p99_s", pa.float64()),
    ("tpot_p50_s", pa.float64()), ("tpot_p90_s", pa.float64()), ("tpot_p99_s", pa.float64()),
    ("ttft_at_slo_pct_s", pa.float64()), ("tpot_at_slo_pct_s", pa.float64()), ("meets_target", pa.bool_()),
    ("pareto_latency", pa.bool_()), ("pareto_cost", pa.bool_()), ("simulations", pa.int64()), ("note", pa.string()),
])
CURVE_COLUMNS = pa.schema([
    ("name", pa.string()), ("topology", pa.string()), ("kind", pa.string()), ("gpus", pa.int64()),
    ("rate_rps", pa.float64()), ("rate_rps_per_gpu", pa.float64()), ("requests", pa.int64()), ("full", pa.bool_()),
    ("attainment", pa.float64()), ("passes", pa.bool_()), ("ttft_p50_s", pa.float64()), ("ttft_p90_s", pa.float64()),
    ("ttft_p99_s", pa.float64()), ("tpot_p50_s", pa.float64()), ("tpot_p90_s", pa.float64()),
    ("tpot_p99_s", pa.float64()),
])
NAN = math.nan
SIMULATED_EDGE = 1.05  # a whole-cluster simulation outranks a composed estimate up to 5 % better


def _hw(t: Topology, role: str) -> str | None:
    key = "prefill_hardware" if role in ("prefill", "colocated") else "decode_hardware"
    return t.meta.get(key) or t.pool(role).hardware


def _name(t: Topology, multi_hw: bool, multi_link: bool, default_batch: int) -> str:
    parts = [t.label]
    pool = t.pools[0]
    if t.kind == "colocated" and pool.chunked_prefill:
        parts.append("chunked")
    if multi_hw:
        hws = [_hw(t, p.role) or "?" for p in t.pools]
        parts.append("/".join(dict.fromkeys(hws)) if t.kind == "colocated" else "/".join(hws))
    if multi_link and t.kind == "disaggregated":
        parts.append(t.link)
    if t.router != "round_robin":
        parts.append(t.router)
    if pool.max_batch_size != default_batch:
        parts.append(f"batch{pool.max_batch_size}")
    return " ".join(parts)


def _row(r: dict, target: float | None, price: Mapping[str, float], mean_output: float) -> dict:
    t: Topology = r["_topology"]
    colo = t.kind == "colocated"
    goodput = float(r["goodput_rps"])
    cost = sum(p.gpus * price.get(_hw(t, p.role) or "", NAN) for p in t.pools)
    ref = r.get("at_target") if target else r.get("at_goodput")
    ref = ref or {}
    lat = {f"{m}_{q}_s": (ref.get(m) or {}).get(q, NAN) for m in ("ttft", "tpot") for q in ("p50", "p90", "p99")}
    pre, dec = (None, None) if colo else (t.pool("prefill"), t.pool("decode"))
    return {
        "name": "", "topology": t.label, "kind": t.kind, "gpus": t.gpus,
        "prefill_hardware": _hw(t, "colocated" if colo else "prefill"),
        "decode_hardware": _hw(t, "colocated" if colo else "decode"),
        "instances": t.pools[0].instances if colo else None, "tp": t.pools[0].tp if colo else None,
        "prefill_instances": pre.instances if pre else None, "prefill_tp": pre.tp if pre else None,
        "decode_instances": dec.instances if dec else None, "decode_tp": dec.tp if dec else None,
        "link": None if colo else t.link, "router": t.router, "max_batch_size": t.pools[0].max_batch_size,
        "chunked_prefill": bool(colo and t.pools[0].chunked_prefill),
        "capacity_rps": float(r.get("capacity_rps", NAN)), "goodput_rps": goodput,
        "goodput_rps_per_gpu": goodput / t.gpus, "method": r.get("method", "simulated"),
        "composed_goodput_rps": float(r.get("composed_goodput_rps", NAN)), "capped": bool(r.get("capped")), "cost_per_hour": cost,
        "cost_per_m_output_tokens": (cost / (goodput * mean_output * 3600) * 1e6
                                     if goodput > 0 and mean_output > 0 else NAN),
        "ref_rate_rps": float(ref.get("rate_rps", NAN)), "attainment_at_ref": float(ref.get("attainment", NAN)),
        **lat,
        "ttft_at_slo_pct_s": (ref.get("ttft") or {}).get("slo", NAN),
        "tpot_at_slo_pct_s": (ref.get("tpot") or {}).get("slo", NAN),
        "meets_target": (goodput >= target) if target else None,
        "simulations": int(r.get("sims", 0)), "note": r.get("note", "") + (" goodput at the search cap"
                                                                          if r.get("capped") else ""),
        "_topology": t, "_points": r.get("points", []), "_src": r,
    }


def _dominated(a: Sequence[float], b: Sequence[float]) -> bool:
    """b dominates a: no worse everywhere (all minimised) and better somewhere."""
    return all(y <= x for x, y in zip(a, b, strict=False)) and any(y < x for x, y in zip(a, b, strict=False))


def _pareto(rows: list[dict], key: Callable[[dict], Sequence[float]], flag: str) -> None:
    pts = [(r, key(r)) for r in rows]
    ok = [(r, k) for r, k in pts if r["goodput_rps"] > 0 and all(math.isfinite(x) for x in k)]
    for r, k in pts:
        r[flag] = (r, k) in ok and not any(_dominated(k, k2) for r2, k2 in ok if r2 is not r)


def rank(results: Sequence[dict], rank_by: str = "goodput_per_gpu", target: float | None = None,
         price: Mapping[str, float] | None = None, mean_output: float = NAN, slo: SLO | None = None,
         multi_hw: bool = False, multi_link: bool = False) -> list[dict]:
    """Rows (dicts with the `COLUMNS` keys, plus ``_topology`` and ``_points``) ranked best first."""
    rows = [_row(r, target, price or {}, mean_output) for r in results]
    default_batch = max((r["max_batch_size"] for r in rows), key=[r["max_batch_size"] for r in rows].count,
                        default=256)
    seen: dict[str, int] = {}
    for r in rows:
        name = _name(r["_topology"], multi_hw, multi_link, default_batch)
        seen[name] = seen.get(name, 0) + 1
        r["name"] = name if seen[name] == 1 else f"{name} #{seen[name]}"

    def big(x: float) -> float:
        return x if math.isfinite(x) else math.inf

    if target:
        rows.sort(key=lambda r: (not r["meets_target"], big(r["cost_per_hour"]) if r["meets_target"] else 0.0,
                                 -r["goodput_rps"], r["gpus"], r["name"]))
    elif rank_by == "cost":
        rows.sort(key=lambda r: (big(r["cost_per_m_output_tokens"]), -r["goodput_rps_per_gpu"], r["gpus"], r["name"]))
    else:  # within the search's ~5 % resolution a simulated row ranks ahead of a composed estimate
        rows.sort(key=lambda r: (-r["goodput_rps_per_gpu"] * (SIMULATED_EDGE if r["method"] == "simulated" else 1.0),
                                 r["gpus"], big(r["ttft_p90_s"]), r["name"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    _pareto(rows, lambda r: (-r["goodput_rps_per_gpu"], r["ttft_at_slo_pct_s"], r["tpot_at_slo_pct_s"]),
            "pareto_latency")
    _pareto(rows, lambda r: (r["cost_per_hour"], -r["goodput_rps"]), "pareto_cost")
    return rows


def _breaks(point: dict | None, slo: SLO) -> str:
    """Which target a simulated point misses, in words."""
    if not point:
        return ""
    q = f"p{slo.percentile:g}"
    ttft, tpot = point["ttft"]["slo"], point["tpot"]["slo"]
    r_ttft = ttft / slo.ttft_s if math.isfinite(ttft) else math.inf
    r_tpot = tpot / slo.tpot_s if math.isfinite(tpot) else 0.0
    if max(r_ttft, r_tpot) <= 1:
        return f"only {point['attainment']:.0%} of its requests meet both targets (need {slo.attainment:.0%})"
    if r_ttft >= r_tpot:
        return f"its TTFT {q} is {ttft * 1e3:,.0f} ms, over the {slo.ttft_s * 1e3:,.0f} ms target"
    return f"its TPOT {q} is {tpot * 1e3:,.1f} ms, over the {slo.tpot_s * 1e3:,.0f} ms target"


def recommend(rows: Sequence[dict], slo: SLO, target: float | None,
              compare_point: Callable[[Topology, float], dict | None]) -> dict:
    """The top-ranked topology and why, contrasted with the best topology of the other kind.

    ``compare_point(topology, rate)`` simulates the rival at the winner's load (req/s per GPU times the rival's GPUs)
    to say which target it breaks there.
    """
    good = [r for r in rows if r["goodput_rps"] > 0 and (target is None or r["meets_target"])]
    if not good:
        best_any = max(rows, key=lambda r: r["goodput_rps"], default=None)
        what = f"serves {target:g} req/s" if target else "meets the SLO at any rate"
        hint = (f"; the most is {best_any['goodput_rps']:.2f} req/s by {best_any['name']}"
                if target and best_any and best_any["goodput_rps"] > 0 else "")
        return {"name": None, "reason": f"No topology within the budget {what}{hint}. Relax the SLO, raise the GPU "
                                        "budget or lower the target rate."}
    best = good[0]
    kind_word = {"disaggregated": "Disaggregation", "colocated": "Colocation"}[best["kind"]]
    other = "colocated" if best["kind"] == "disaggregated" else "disaggregated"
    rec = {k: v for k, v in best.items() if not k.startswith("_")}
    rival_pool = [r for r in rows if r["kind"] == other and r["goodput_rps"] > 0]
    if target:
        rate = target
        same = [r for r in rows if r["kind"] == other and r["gpus"] <= best["gpus"]]
        rival = max(same, key=lambda r: r["goodput_rps"], default=None)
        head = (f"{best['name']} ({best['gpus']} GPUs, ${best['cost_per_hour']:,.2f}/h) is the cheapest topology that "
                f"serves {target:g} req/s within the SLO (goodput {best['goodput_rps']:.1f} req/s).")
    else:
        rival = rival_pool[0] if rival_pool else None
        rate = best["goodput_rps_per_gpu"] * rival["gpus"] if rival else NAN
        head = (f"{kind_word} wins: {best['name']} sustains {best['goodput_rps_per_gpu']:.2f} req/s per GPU within "
                f"the SLO")
        if rival:
            head += (f" vs {rival['goodput_rps_per_gpu']:.2f} for the best {other} topology {rival['name']} "
                     f"({best['goodput_rps_per_gpu'] / rival['goodput_rps_per_gpu']:.2f}x).")
        else:
            head += f"; no {other} topology meets it at any rate."
    reason = head
    point = None
    if rival is not None and target and rival["meets_target"]:
        reason += (f" The best {other} topology with as many GPUs, {rival['name']}, also serves it, with less headroom "
                   f"(goodput {rival['goodput_rps']:.1f} req/s).")
    elif rival is not None and math.isfinite(rate):
        point = next((p for p in rival["_points"] if math.isclose(p["rate_rps"], rate) and p["full"]), None)
        point = point or compare_point(rival["_topology"], rate)
        why = _breaks(point, slo)
        if why and target:
            reason += (f" The best {other} topology with at most {best['gpus']} GPUs, {rival['name']}, reaches only "
                       f"{rival['goodput_rps']:.1f} req/s: at {rate:g} req/s {why}.")
        elif why:
            reason += f" At {rate:.1f} req/s on {rival['gpus']} GPUs, {rival['name']}: {why}."
    rec.update(reason=reason, rival=rival["name"] if rival else None, rival_point=point,
               kind_word=kind_word)
    return rec


def rows_table(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS.names} for r in rows], schema=COLUMNS)


def curves_table(rows: Sequence[dict], runner: object = None) -> pa.Table:
    """Every simulated point: whole-cluster runs of verified topologies (kind colocated / disaggregated) and the
    one-instance ladders the screen composed from (kind ``instance:prefill`` / ``instance:decode`` /
    ``instance:colocated``, whose attainment counts only the targets that instance decides)."""
    out = []

    def add(name: str, topo: str, kind: str, gpus: int, p: dict) -> None:
        out.append({"name": name, "topology": topo, "kind": kind, "gpus": gpus, "rate_rps": p["rate_rps"],
                    "rate_rps_per_gpu": p["rate_rps"] / gpus, "requests": p["requests"], "full": p["full"],
                    "attainment": p["attainment"], "passes": p["passes"],
                    **{f"{m}_{q}_s": p[m][q] for m in ("ttft", "tpot") for q in ("p50", "p90", "p99")}})

    for r in rows:
        for p in r["_points"]:
            add(r["name"], r["topology"], r["kind"], r["gpus"], p)
    for key, pts in (getattr(runner, "curve_points", None) or {}).items():
        role, hw, pool = key[0], key[1], key[2]
        extra = " chunked" if pool.chunked_prefill else ""
        name = f"1 {role} instance {hw} tp{pool.tp}{extra} batch{pool.max_batch_size}"
        for p in pts:
            add(name, "1" + role[0].upper() + (f"(tp{pool.tp})" if pool.tp > 1 else ""), f"instance:{role}",
                pool.tp, p)
    return pa.Table.from_pylist(out, schema=CURVE_COLUMNS)
