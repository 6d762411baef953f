"""Hand-computed timelines, asserted exactly (to float round-off), like SimPy's own resource tests."""

import math

import pytest

from sim import CostProfile, LinkSpec, PRESETS, Topology, Workload, constant_profile, simulate
from sim.cost_profile import DecodePiece, PrefillCost

TINY = PRESETS["tiny"]  # 2,048 KV bytes per token
PROFILE = constant_profile(prefill_s=1.0, decode_step_s=0.1)


def run(topo, arrivals, prompts, outputs, profile=PROFILE):
    w = Workload.from_lists(arrivals, prompts, outputs)
    return {r["request_id"]: r for r in simulate(topo, w, profile, model=TINY).records.to_pylist()}


def approx(x):
    return pytest.approx(x, abs=1e-9)


def test_kv_bytes_formula_knows_gqa():
    assert PRESETS["llama-3.1-8b"].kv_bytes_per_token == 131_072
    assert PRESETS["llama-2-7b"].kv_bytes_per_token == 524_288
    assert PRESETS["llama-3.1-70b"].kv_bytes_per_token == 327_680
    assert TINY.kv_bytes_per_token == 2 * 4 * 2 * 64 * 2


def test_one_request_colocated():
    r = run(Topology.colocated(1, kv_capacity_tokens=1000), [0.0], [10], [5])[0]
    assert (r["prefill_start_s"], r["prefill_end_s"], r["first_token_s"]) == (0.0, 1.0, 1.0)
    assert r["decode_start_s"] == 1.0
    assert r["last_token_s"] == approx(1.4) and r["finished_s"] == approx(1.4)
    assert r["max_itl_s"] == approx(0.1)
    assert math.isnan(r["kv_transfer_start_s"]) and r["prefill_instance"] == r["decode_instance"] == "C0"


def test_one_request_disaggregated_transfer_in_first_gap():
    link = LinkSpec("slow", bandwidth_bytes_per_s=20_480, latency_s=0.5)  # 10 tokens x 2,048 B = 1 s + 0.5 s
    prof = CostProfile("c", "constant", PrefillCost(1.0), (DecodePiece(1 << 30, 0.1),), links={"slow": link})
    r = run(Topology.disaggregated(1, 1, kv_capacity_tokens=1000, link="slow"), [0.0], [10], [5], prof)[0]
    assert r["first_token_s"] == 1.0  # the prefill instance delivers the first token
    assert (r["kv_transfer_start_s"], r["kv_transfer_end_s"]) == (1.0, approx(2.5))
    assert r["decode_start_s"] == approx(2.5)
    assert r["last_token_s"] == approx(2.9)
    assert r["max_itl_s"] == approx(1.6)  # first token at 1.0, second at 2.6
    assert r["kv_bytes"] == 20_480 and (r["prefill_instance"], r["decode_instance"]) == ("P0", "D0")


def test_decode_instance_emits_first_token_like_vllm_pd():
    """`Topology.first_token` "decode": the prefill's token is dropped; the decode instance produces all 5 tokens,
    the first at the end of its first step after the KV arrived (TTFT includes the transfer and one decode step)."""
    from dataclasses import replace

    link = LinkSpec("slow", bandwidth_bytes_per_s=20_480, latency_s=0.5)
    prof = CostProfile("c", "constant", PrefillCost(1.0), (DecodePiece(1 << 30, 0.1),), links={"slow": link})
    topo = replace(Topology.disaggregated(1, 1, kv_capacity_tokens=1000, link="slow"), first_token="decode")
    recs = run(topo, [0.0, 10.0], [10, 10], [5, 1], prof)
    r = recs[0]
    assert r["prefill_end_s"] == 1.0 and r["decode_start_s"] == approx(2.5)
    assert r["first_token_s"] == approx(2.6)  # 1 s prefill + 1.5 s transfer + one 0.1 s decode step
    assert r["last_token_s"] == approx(3.0)  # tokens 2..5: four more steps
    assert r["max_itl_s"] == approx(0.1)  # the wait for the first token is TTFT, not an inter-token gap
    one = recs[1]  # a single output token also comes from the decode instance, after its KV transfer
    assert one["status"] == "ok" and not math.isnan(one["kv_transfer_end_s"])
    assert (one["kv_transfer_end_s"], one["first_token_s"]) == (approx(12.5), approx(12.6))
    assert one["last_token_s"] == one["first_token_s"]
    with pytest.raises(ValueError, match="first_token"):
        replace(topo, first_token="router")


def test_request_overhead_delays_scheduling_at_each_server():
    """`CostProfile.request_overhead_s`: a request becomes schedulable that long after it arrives, at its first
    instance and again at the decode instance (with the transfer's latency); a delay, not busy time."""
    from dataclasses import replace

    link = LinkSpec("slow", bandwidth_bytes_per_s=20_480, latency_s=0.5)
    prof = CostProfile("c", "constant", PrefillCost(1.0), (DecodePiece(1 << 30, 0.1),), links={"slow": link},
                       request_overhead_s=0.25)
    c = run(Topology.colocated(1, kv_capacity_tokens=1000), [0.0, 0.1], [10, 10], [2, 2], prof)
    assert (c[0]["prefill_start_s"], c[0]["first_token_s"]) == (0.25, 1.25)
    assert c[1]["prefill_start_s"] == approx(1.25)  # queued behind the first prefill, not behind its overhead
    topo = replace(Topology.disaggregated(1, 1, kv_capacity_tokens=1000, link="slow"), first_token="decode")
    d = run(topo, [0.0], [10], [5], prof)[0]
    assert (d["prefill_start_s"], d["prefill_end_s"]) == (0.25, 1.25)
    assert d["kv_transfer_end_s"] == approx(1.25 + 0.5 + 0.25 + 1.0) and d["first_token_s"] == approx(3.1)
    again = CostProfile.from_dict(prof.to_dict())
    assert again.request_overhead_s == 0.25 and "request_overhead_s" not in PROFILE.to_dict()
    with pytest.raises(ValueError, match="request_overhead_s"):
        replace(prof, request_overhead_s=-1.0)


def test_prefill_dispersion_spreads_prefill_steps_seeded_and_keeps_their_mean(tmp_path):
    """`CostProfile.prefill_dispersion`: each prefill step (colocated, prefill instance) takes the formula's time times
    a seeded draw with the stored quantiles; the decode steps are untouched; absent, every prefill takes 1 s."""
    from dataclasses import replace

    from sim.cost_profile import CostProfile as CP

    q = (0.5, 1.0, 1.5)  # uniform on [0.5, 1.5]: mean 1
    prof = replace(PROFILE, prefill_dispersion=q)
    n = 400
    arrivals = [10.0 * i for i in range(n)]  # far apart: TTFT is one prefill step
    for topo in (Topology.colocated(1, kv_capacity_tokens=1000), Topology.disaggregated(1, 1, kv_capacity_tokens=1000)):
        w = Workload.from_lists(arrivals, [10] * n, [3] * n)
        recs = simulate(topo, w, prof, model=TINY, seed=1).records.to_pylist()
        ttft = [r["first_token_s"] - r["arrival_s"] for r in recs]
        assert 0.5 <= min(ttft) < 0.55 and 1.45 < max(ttft) <= 1.5
        assert sum(ttft) / n == pytest.approx(1.0, abs=0.05)
        def times(seed, topo=topo, w=w):
            return [(r["first_token_s"], r["finished_s"]) for r in simulate(topo, w, prof, model=TINY, seed=seed).records.to_pylist()]

        assert times(1) == [(r["first_token_s"], r["finished_s"]) for r in recs] != times(2)  # seeded
        plain = simulate(topo, w, PROFILE, model=TINY, seed=1).records.to_pylist()
        assert {r["first_token_s"] - r["arrival_s"] for r in plain} == {1.0}
        if topo.kind == "colocated":  # 2 decode steps of 0.1 s after the first token, whatever the prefill took
            assert all(r["finished_s"] - r["first_token_s"] == approx(0.2) for r in recs)
    path = tmp_path / "p.json"
    prof.save(path)
    assert CP.load(path).prefill_dispersion == q and "prefill_dispersion" not in PROFILE.to_dict()
    assert prof.prefill_factor(0.25) == 0.75 and PROFILE.prefill_factor(0.25) == 1.0
    for bad in ((1.0,), (1.2, 0.8), (0.0, 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="prefill_dispersion"):
            replace(PROFILE, prefill_dispersion=bad)
    d = prof.to_dict()
    d["prefill_dispersion"] = [2.0, 1.0]
    with pytest.raises(ValueError, match=r"bad\.json: .*prefill_dispersion"):
        CP.from_dict(d, where="bad.json")


def test_single_output_token_finishes_at_prefill_end_without_transfer():
    r = run(Topology.disaggregated(1, 1, kv_capacity_tokens=1000), [0.0], [10], [1])[0]
    assert r["finished_s"] == 1.0 and math.isnan(r["kv_transfer_start_s"]) and r["status"] == "ok"


def test_two_requests_contend_for_one_prefill_instance():
    recs = run(Topology.colocated(1, kv_capacity_tokens=1000, max_batch_size=1), [0.0, 0.0], [10, 10], [1, 1])
    assert (recs[0]["prefill_start_s"], recs[0]["prefill_end_s"]) == (0.0, 1.0)
    assert (recs[1]["prefill_start_s"], recs[1]["prefill_end_s"]) == (1.0, 2.0)
    batched = run(Topology.colocated(1, kv_capacity_tokens=1000), [0.0, 0.0], [10, 10], [1, 1])
    assert batched[0]["prefill_end_s"] == batched[1]["prefill_end_s"] == 1.0


def test_prefill_token_budget_splits_batches():
    recs = run(Topology.disaggregated(1, 1, kv_capacity_tokens=1000, max_batch_tokens=15),
               [0.0, 0.0, 0.0], [10, 5, 5], [1, 1, 1])
    assert [recs[i]["prefill_end_s"] for i in range(3)] == [1.0, 1.0, 2.0]


def test_concurrent_transfers_share_the_link():
    link = LinkSpec("l", bandwidth_bytes_per_s=20_480, latency_s=0.0)
    prof = CostProfile("c", "constant", PrefillCost(1.0), (DecodePiece(1 << 30, 0.1),), links={"l": link})
    recs = run(Topology.disaggregated(1, 1, kv_capacity_tokens=1000, link="l"), [0.0, 0.0], [10, 10], [2, 2], prof)
    for r in recs.values():  # alone each would take 1 s; sharing, both end at 3 s
        assert (r["kv_transfer_start_s"], r["kv_transfer_end_s"]) == (1.0, approx(3.0))
        assert r["finished_s"] == approx(3.1)


def test_staggered_transfers_processor_sharing():
    link = LinkSpec("l", bandwidth_bytes_per_s=20_480, latency_s=0.0)
    prof = CostProfile("c", "constant", PrefillCost(1.0), (DecodePiece(1 << 30, 0.1),), links={"l": link})
    topo = Topology.disaggregated(2, 1, kv_capacity_tokens=1000, link="l")
    recs = run(topo, [0.0, 0.5], [10, 10], [2, 2], prof)
    # r0 alone 1.0-1.5 (half its bytes), shares 1.5-2.5 (half-rate: the other half) -> ends 2.5; r1 then alone -> 3.0
    assert recs[0]["kv_transfer_end_s"] == approx(2.5)
    assert recs[1]["kv_transfer_end_s"] == approx(3.0)


def test_arrival_mid_decode_joins_at_step_boundary_prefill_first():
    recs = run(Topology.colocated(1, kv_capacity_tokens=1000), [0.0, 1.25], [10, 10], [11, 3])
    r0, r1 = recs[0], recs[1]
    # r0 decodes at 1.1, 1.2, 1.3; r1 arrives 1.25, waits for the step to end, prefills 1.3-2.3
    assert (r1["prefill_start_s"], r1["first_token_s"]) == (approx(1.3), approx(2.3))
    assert r1["finished_s"] == approx(2.5)
    assert r0["finished_s"] == approx(3.0)  # 7 more tokens at 2.4 ... 3.0
    assert r0["max_itl_s"] == approx(1.1)  # the prefill stalled it: 1.3 -> 2.4


def test_decode_join_in_disaggregated_mode_does_not_stall_running():
    recs = run(Topology.disaggregated(2, 1, kv_capacity_tokens=1000, link="nvlink4"), [0.0, 1.25], [10, 10], [31, 3])
    r0, r1 = recs[0], recs[1]
    assert r0["max_itl_s"] == pytest.approx(0.1, abs=1e-4)  # never waits for a prefill (first gap: +10 us of NVLink)
    assert r1["first_token_s"] == approx(2.25) and 2.25 < r1["kv_transfer_end_s"] < 2.26
    assert r1["decode_start_s"] == pytest.approx(2.3, abs=1e-4)  # joins when r0's step in progress ends
    assert r1["finished_s"] == pytest.approx(2.5, abs=1e-4) and r0["finished_s"] == pytest.approx(4.0, abs=1e-4)


def test_decode_cost_grows_with_context_closed_form():
    prof = CostProfile("lin", "constant", PrefillCost(1.0), (DecodePiece(1 << 30, 0.1, 0.0, 0.01),))
    r = run(Topology.colocated(1, kv_capacity_tokens=1000), [0.0], [10], [4], prof)[0]
    # steps see contexts 11, 12, 13: 0.21 + 0.22 + 0.23
    assert r["finished_s"] == approx(1.0 + 0.21 + 0.22 + 0.23)
    assert r["max_itl_s"] == approx(0.23)


def test_chunked_prefill_iterations():
    topo = Topology.colocated(1, kv_capacity_tokens=1000, max_batch_tokens=4, chunked_prefill=True)
    prof = constant_profile(prefill_s=1.0, decode_step_s=0.1, prefill_per_token_s=0.0)
    r = run(topo, [0.0], [10], [2], prof)[0]
    # chunks of 4, 4, 2 tokens: three 1 s iterations, then one decode step
    assert r["first_token_s"] == approx(3.0) and r["finished_s"] == approx(3.1)


@pytest.mark.parametrize("mode,end", [("sum", 1.0 + 0.42 + 0.44), ("padded", 1.0 + 0.52 + 0.54)])
def test_decode_context_sum_vs_padded(mode, end):
    from dataclasses import replace

    prof = replace(CostProfile("lin", "constant", PrefillCost(1.0), (DecodePiece(1 << 30, 0.1, 0.0, 0.01),)),
                   decode_context=mode)
    recs = run(Topology.colocated(1, kv_capacity_tokens=1000), [0.0, 0.0], [10, 20], [3, 3], prof)
    # contexts 11 and 21 on the first step: sum 32, padded 2 x 21 = 42; each grows by 2 per step
    assert recs[0]["finished_s"] == approx(end) and recs[1]["finished_s"] == approx(end)


def test_host_cpu_contention_stretches_overlapping_steps():
    from sim.topology import HostCPU

    topo = Topology.colocated(2, kv_capacity_tokens=1000, max_batch_size=1)
    w = Workload.from_lists([0.0, 0.0], [10, 10], [1, 1])
    alone = simulate(topo, w, PROFILE, model=TINY, host=HostCPU(cores=2)).records.to_pylist()
    assert [r["finished_s"] for r in alone] == [1.0, 1.0]  # two busy instances on two cores: no slowdown
    loaded = simulate(topo, w, PROFILE, model=TINY, host=HostCPU(cores=2, background_cpu=1.0)).records.to_pylist()
    # the first to start sees 1 busy + 1 background = 2 cores' worth (no slowdown), the second 2 + 1 over 2 cores
    assert sorted(r["finished_s"] for r in loaded) == [approx(1.0), approx(1.5)]
    # contention off (speed traces only): no stretch whatever the load
    off = simulate(topo, w, PROFILE, model=TINY, host=HostCPU(cores=1, background_cpu=1.0, contention=False))
    assert [r["finished_s"] for r in off.records.to_pylist()] == [1.0, 1.0]


def test_pinned_workers_wait_for_the_background_on_their_own_core():
    """``HostCPU(pinned=True)``: every step waits ``core_wait x background`` whether or not the other core is busy;
    a profile without a measured ``core_wait`` gets an even spread (1 / cores)."""
    from dataclasses import replace

    from sim.topology import HostCPU

    topo = Topology.colocated(2, kv_capacity_tokens=1000, max_batch_size=1)
    w = Workload.from_lists([0.0, 0.0, 5.0], [10, 10, 10], [1, 1, 1])
    host = HostCPU(cores=2, background_cpu=0.4, pinned=True)
    even = simulate(topo, w, PROFILE, model=TINY, host=host).records.to_pylist()
    # 1 + 0.4 / 2 for each step, alone (the one at 5 s) or not (processor sharing would give 1.0, 1.2 and 1.0)
    assert sorted(r["finished_s"] - r["arrival_s"] for r in even) == [approx(1.2)] * 3
    measured = simulate(topo, w, replace(PROFILE, core_wait=1.5), model=TINY, host=host).records.to_pylist()
    assert sorted(r["finished_s"] - r["arrival_s"] for r in measured) == [approx(1.6)] * 3
    # per role: the prefill worker waits, the decode worker does not
    prof = CostProfile("c", "constant", PrefillCost(1.0), (DecodePiece(1 << 30, 0.1),),
                       links={"slow": LinkSpec("slow", bandwidth_bytes_per_s=20_480, latency_s=0.5)})
    roles = {"prefill": replace(prof, core_wait=1.0), "decode": replace(prof, core_wait=0.0)}
    dis = simulate(Topology.disaggregated(1, 1, link="slow", kv_capacity_tokens=1000), Workload.from_lists([0.0], [10], [3]),
                   roles, model=TINY, host=host).records.to_pylist()[0]
    assert dis["prefill_end_s"] == approx(1.4) and dis["finished_s"] == approx(1.4 + 1.5 + 2 * 0.1)
    with pytest.raises(ValueError, match="one instance per core, but topology 3C has 3 instances for 2 cores"):
        simulate(Topology.colocated(3, kv_capacity_tokens=1000), w, PROFILE, model=TINY, host=host)
    with pytest.raises(ValueError, match="core_wait must be a finite number >= 0"):
        replace(PROFILE, core_wait=-0.1)
    with pytest.raises(ValueError, match="core_wait_alone must be a finite number >= 0"):
        replace(PROFILE, core_wait=0.5, core_wait_alone=math.nan)
    with pytest.raises(ValueError, match="core_wait_alone needs core_wait"):
        replace(PROFILE, core_wait_alone=0.5)
    back = CostProfile.from_dict(replace(PROFILE, core_wait=0.75, core_wait_alone=0.1).to_dict())
    assert (back.core_wait, back.core_wait_alone) == (0.75, 0.1)
    assert CostProfile.from_dict(PROFILE.to_dict()).core_wait is None
    assert "core_wait_alone" not in replace(PROFILE, core_wait=0.75).to_dict()


def test_pinned_step_waits_less_when_no_other_instance_is_mid_step():
    """``core_wait_alone``: a step that starts while no other instance is mid-step waits that much per core of
    background; one that starts while another is, ``core_wait``; a decode segment keeps the state it started in."""
    from dataclasses import replace

    from sim.topology import HostCPU

    topo = Topology.colocated(2, kv_capacity_tokens=1000, max_batch_size=1)
    # two requests at once (the second starts while the first's instance is mid-step), one alone at 5 s
    w = Workload.from_lists([0.0, 0.0, 5.0], [10, 10, 10], [1, 1, 1])
    host = HostCPU(cores=2, background_cpu=0.4, pinned=True)
    prof = replace(PROFILE, core_wait=1.5, core_wait_alone=0.25)
    recs = sorted(simulate(topo, w, prof, model=TINY, host=host).records.to_pylist(), key=lambda r: r["request_id"])
    took = [r["finished_s"] - r["arrival_s"] for r in recs]
    # the first of the pair started with nothing else mid-step: 1 + 0.25 x 0.4; the second 1 + 1.5 x 0.4
    assert sorted(took[:2]) == [approx(1.1), approx(1.6)] and took[2] == approx(1.1)
    assert host.pinned_wait(prof, contended=False) == approx(0.1) and host.pinned_wait(prof) == approx(0.6)
    # without core_wait_alone, one figure for every step (the model before the split)
    one = replace(PROFILE, core_wait=1.5)
    assert host.pinned_wait(one, contended=False) == host.pinned_wait(one) == approx(0.6)


def test_speed_trace_lookup_and_validation():
    from sim.topology import SpeedTrace

    tr = SpeedTrace((1.0, 2.0), (3.0, 4.0), (5.0, 6.0))
    assert tr.at("prefill", 0.0) == (3.0, 2.0)  # before the first time: the first factors
    assert tr.at("decode", 1.5) == (5.0, 2.0)
    assert tr.at("decode", 2.0) == (6.0, math.inf)
    for bad in (((), (), ()), ((1.0,), (1.0, 2.0), (1.0,)), ((2.0, 1.0), (1.0, 1.0), (1.0, 1.0)),
                ((0.0,), (0.0,), (1.0,)), ((0.0,), (1.0,), (math.nan,))):
        with pytest.raises(ValueError, match="SpeedTrace"):
            SpeedTrace(*bad)


def test_host_speed_stretches_steps_and_splits_decode_segments_at_changes():
    from sim.topology import HostCPU, SpeedTrace

    # C0: prefill 2x slower throughout; decode 2x slower until t = 2.45, then at the profile's speed.
    trace = SpeedTrace((0.0, 2.45), (2.0, 2.0), (2.0, 1.0))
    topo = Topology.colocated(1, kv_capacity_tokens=1000)
    w = Workload.from_lists([0.0], [10], [6])
    r = simulate(topo, w, PROFILE, model=TINY, host=HostCPU(cores=2, speed={"C0": trace})).records.to_pylist()[0]
    assert r["first_token_s"] == approx(2.0)  # prefill 1.0 x 2
    # decode steps of 0.1 x 2 from 2.0: ends 2.2, 2.4, 2.6 (the one running at 2.45 finishes at the old speed);
    # then 0.1 each: 2.7, 2.8
    assert r["finished_s"] == approx(2.8)
    assert r["max_itl_s"] == approx(0.2)
    # an instance without a trace runs at the profile's speed
    plain = simulate(topo, w, PROFILE, model=TINY, host=HostCPU(cores=2, speed={"C1": trace})).records.to_pylist()[0]
    assert plain["finished_s"] == approx(1.5)


def test_host_speed_applies_per_instance_in_disaggregated_mode():
    from sim.topology import HostCPU, SpeedTrace

    link = LinkSpec("slow", bandwidth_bytes_per_s=20_480, latency_s=0.5)  # 1.5 s for 10 tokens
    prof = CostProfile("c", "constant", PrefillCost(1.0), (DecodePiece(1 << 30, 0.1),), links={"slow": link})
    topo = Topology.disaggregated(1, 1, link="slow", kv_capacity_tokens=1000)
    w = Workload.from_lists([0.0], [10], [3])
    speed = {"P0": SpeedTrace((0.0,), (3.0,), (1.0,)), "D0": SpeedTrace((0.0,), (1.0,), (0.5,))}
    r = simulate(topo, w, prof, model=TINY, host=HostCPU(cores=2, speed=speed)).records.to_pylist()[0]
    assert r["prefill_end_s"] == approx(3.0)  # P0's prefill 3x; the link is not a step and keeps its time
    assert r["kv_transfer_end_s"] == approx(4.5)
    assert r["finished_s"] == approx(4.5 + 2 * 0.05)  # D0's two decode steps at half the time
