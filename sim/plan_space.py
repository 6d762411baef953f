"""The planner's search space and its analytic bounds: which topologies fit a GPU budget, and how fast each could go.

`search_space` enumerates candidate topologies (colocated N x TP, with and without chunked prefill; disaggregated
xP(TP) yD(TP) with possibly different hardware per role) within a GPU budget. `instance_capacity_rps` is an
analytic throughput bound of one instance (no queueing), used only to place the simulated rate ladders;
`unloaded_attainment` is the fraction of requests that would meet the SLO if each were served alone — an upper bound
on attainment at any rate, so a topology below the attainment target is skipped without simulating.

Both use the same `CostProfile` formulas the simulator uses, on the workload's own length distribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sim.cost_profile import CostProfile
from sim.metrics import SLO
from sim.model_spec import ModelSpec
from sim.topology import PoolSpec, Topology


@dataclass(frozen=True)
class Lengths:
    """Prompt and output lengths of a workload (tokens), as arrays; the planner's view of a workload's shape."""

    prompt: np.ndarray
    output: np.ndarray

    @property
    def mean_decode_steps(self) -> float:
        """Decode steps per request: output tokens after the first (which the prefill produces)."""
        return float(np.maximum(self.output - 1, 0).mean())

    @property
    def mean_resident_context(self) -> float:
        """Time-weighted mean context of a decoding sequence: sum(O * (L + O/2)) / sum(O)."""
        o = np.maximum(self.output - 1, 1).astype(float)
        return float((o * (self.prompt + o / 2)).sum() / o.sum())


def fits(model: ModelSpec, pool: PoolSpec, profile: CostProfile, longest_tokens: int) -> str:
    """'' when ``pool`` can hold the weights and one longest request's KV, else why not."""
    mem = profile.memory_bytes if pool.hardware is None and profile.memory_bytes else None
    try:
        cap = pool.kv_capacity(model, mem)
    except ValueError as e:
        return str(e)
    if cap < longest_tokens + pool.block_size_tokens:
        return f"{pool.role} KV capacity {cap} tokens < longest request ({longest_tokens} tokens)"
    return ""


def search_space(budget_gpus: int, hardware: Sequence[str], tps: Sequence[int], kinds: Iterable[str],
                 links: Sequence[str], router: str = "round_robin", chunked: Sequence[bool] = (False, True),
                 heterogeneous: bool = True, hw_key: Mapping[str, str | None] | None = None,
                 **pool_kw: object) -> list[Topology]:
    """All topologies with at most ``budget_gpus`` GPUs.

    colocated: N instances x TP on one hardware kind, for each ``chunked`` prefill setting;
    disaggregated: x prefill instances of TP tp_p and y decode instances of TP tp_d on each (prefill, decode)
    hardware pair (only equal pairs unless ``heterogeneous``), for each link. ``hw_key`` maps a hardware name to the
    PoolSpec.hardware value (None for a profile-only device whose memory comes from its profile).
    """
    if budget_gpus < 1:
        raise ValueError(f"GPU budget must be >= 1, got {budget_gpus}")
    if any(t < 1 for t in tps):
        raise ValueError(f"tensor-parallel degrees must be >= 1, got {list(tps)}")
    key = dict(hw_key or {})
    out: list[Topology] = []
    kinds = set(kinds)
    for hw in hardware:
        meta = {"prefill_hardware": hw, "decode_hardware": hw}
        if "colocated" in kinds:
            for tp in tps:
                for n in range(1, budget_gpus // tp + 1):
                    for ch in chunked:
                        t = Topology.colocated(n, tp, key.get(hw, hw), router=router, chunked_prefill=ch, **pool_kw)
                        out.append(Topology(t.kind, t.pools, t.link, t.router, meta=dict(meta)))
    if "disaggregated" in kinds:
        pairs = [(a, b) for a in hardware for b in hardware if heterogeneous or a == b]
        for hp, hd in pairs:
            for tpp in tps:
                for tpd in tps:
                    for x in range(1, (budget_gpus - tpd) // tpp + 1):
                        for y in range(1, (budget_gpus - x * tpp) // tpd + 1):
                            for link in links:
                                t = Topology.disaggregated(x, y, tpp, tpd, key.get(hp, hp), key.get(hd, hd), link,
                                                           router, **pool_kw)
                                out.append(Topology(t.kind, t.pools, t.link, t.router,
                                                    meta={"prefill_hardware": hp, "decode_hardware": hd}))
    for k in kinds - {"colocated", "disaggregated"}:
        raise ValueError(f"unknown topology kind {k!r}; expected 'colocated' or 'disaggregated'")
    return out


def _prefill_time_per_request(prof: CostProfile, pool: PoolSpec, lens: Lengths) -> float:
    """Mean prefill seconds per request when batches are full: the fixed cost shared by a batch's requests."""
    p = prof.prefill
    L = lens.prompt.astype(float)
    share = np.clip(L / pool.max_batch_tokens, 1.0 / pool.max_batch_size, 1.0)
    return float((p.b_s * L + p.c_s * L * L + p.d_s + p.a_s * share).mean())


def _decode_batch(prof: CostProfile, pool: PoolSpec, kv_tokens: int, lens: Lengths) -> tuple[int, float]:
    """(largest decode batch that fits in the KV cache at the mean resident context, its step time)."""
    ctx = lens.mean_resident_context
    b = max(1, min(pool.max_batch_size, int(kv_tokens / max(ctx, 1.0))))
    return b, prof.decode_step_s(b, b * ctx)


def instance_capacity_rps(role: str, prof: CostProfile, pool: PoolSpec, kv_tokens: int, lens: Lengths) -> float:
    """Analytic throughput bound of one instance (req/s; no queueing, no SLO): where its rate curve tops out.

    prefill: 1 / prefill seconds per request with full batches; decode: largest KV-resident batch / (step time x
    decode steps per request); colocated: 1 / (prefill + decode time per request).
    """
    steps = max(lens.mean_decode_steps, 1.0)  # at least one step: keeps the bound finite for one-token outputs
    if role == "prefill":
        return 1.0 / _prefill_time_per_request(prof, pool, lens)
    b, step = _decode_batch(prof, pool, kv_tokens, lens)
    if role == "decode":
        return b / (step * steps)
    return 1.0 / (_prefill_time_per_request(prof, pool, lens) + steps * step / b)


def unloaded_attainment(topo: Topology, profiles: Mapping[str, CostProfile], lens: Lengths, slo: SLO) -> float:
    """Fraction of requests meeting the SLO when each is served alone (no queueing, batch of one).

    TTFT alone = prefill of the prompt; TPOT alone >= one decode step of batch 1 at the prompt's context. An upper
    bound on attainment at any rate.
    """
    pre = profiles["colocated" if topo.kind == "colocated" else "prefill"]
    dec = profiles["colocated" if topo.kind == "colocated" else "decode"]
    ttft = np.array([pre.prefill_s([int(n)]) for n in lens.prompt])
    base, per_tok = dec.decode_linear(1)
    tpot = base + per_tok * lens.prompt
    ok = (ttft <= slo.ttft_s) & ((lens.output < 2) | (tpot <= slo.tpot_s))
    return float(ok.mean())


def unit_factor(topo: Topology) -> int:
    """How many identical independent sub-clusters round-robin routing splits ``topo`` into (1 for other routers).

    Round robin sends request r to prefill instance r mod x and decode instance r mod y, so with g = gcd(x, y) the
    instances whose index is k mod g only ever see requests r = k mod g: g independent copies of (x/g)P(y/g)D, each
    fed every g-th request. Colocated N instances are N copies of one instance.
    """
    if topo.router != "round_robin":
        return 1
    return math.gcd(*(p.instances for p in topo.pools))
