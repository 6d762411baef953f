"""Plan: the capacity planner (`sim.plan`) with its inputs in the sidebar — recommendation, ranked table, charts."""

import math

import plotly.express as px
import streamlit as st

from dashboard.common import file_input, hardware_input, load, model_input, slo_input, workload_input

st.title("Capacity plan")
with st.sidebar:
    st.header("Inputs")
    model = model_input("plan_model")
    hardware = hardware_input("plan_hw")
    prof_path = file_input("Calibrated / imported profile (JSON)", "plan_prof", ["json"],
                           "Used for its device at its TP instead of the datasheet roofline.")
    workload = workload_input("plan_wl")
    slo = slo_input("plan_slo")
    gpus = st.slider("GPU budget", 1, 32, 4, key="plan_gpus")
    price = st.number_input("Price per GPU-hour (USD, 0 = preset prices)", 0.0, 100.0, 0.0, 0.1, key="plan_price")
    target = st.number_input("Target rate (req/s, 0 = none)", 0.0, 10000.0, 0.0, key="plan_target")
    tps = st.multiselect("Tensor-parallel degrees", [1, 2, 4, 8], [1, 2], key="plan_tps")

from sim.cost_profile import CostProfile  # noqa: E402
from sim.plan import plan  # noqa: E402

profiles = [load("cost profile", lambda: CostProfile.load(prof_path))] if prof_path else None
key = repr((model, hardware, str(prof_path), workload.name, len(workload), slo, gpus, price, target, tps))
if st.session_state.get("plan_key") != key:
    bar = st.progress(0.0, text="planning…")

    def progress(done: int, total: int, what: str) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"simulating: {what} ({done}/{total})")

    res = load("planner inputs", lambda: plan(
        model=model, hardware=None if profiles else hardware, profiles=profiles, workload=workload, slo=slo,
        gpu_budget=gpus, prices={h: price for h in hardware} if price > 0 else None,
        target_rate_rps=target or None, tps=tps or None, progress=progress))
    bar.empty()
    st.session_state.update(plan_key=key, plan_result=res)
res = st.session_state["plan_result"]
rec, stats = res.recommendation, res.stats
if rec["name"]:
    st.success(f"**Recommendation: {rec['name']}** — {rec['reason']}")
    c = st.columns(4)
    c[0].metric("Goodput", f"{rec['goodput_rps']:.1f} req/s")
    c[1].metric("Per GPU", f"{rec['goodput_rps_per_gpu']:.2f} req/s")
    c[2].metric("GPUs", rec["gpus"])
    cost = rec["cost_per_m_output_tokens"]
    c[3].metric("$ / M output tokens", f"{cost:.3f}" if cost and math.isfinite(cost) else "-")
else:
    st.warning(rec["reason"])
st.caption(f"{stats['topologies']} topologies · {stats['instance_ladders']} instance ladders · {stats['verified']} "
           f"verified whole · {stats['simulations']} simulations ({stats['simulated_requests']:,} requests) · "
           f"{stats['cache_hits']} cache hits · {stats['wall_s']:.1f} s")

df = res.table.to_pandas()
st.subheader("Ranked topologies")
cols = ["rank", "name", "gpus", "goodput_rps", "goodput_rps_per_gpu", "cost_per_m_output_tokens", "ttft_p50_s",
        "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s", "tpot_p99_s", "method", "pareto_latency", "pareto_cost"]
st.dataframe(df[cols], hide_index=True, height=320)

live = df[df.goodput_rps > 0]
c1, c2 = st.columns(2)
fig = px.scatter(live, x=live.ttft_p90_s * 1e3, y="goodput_rps_per_gpu", color="kind", symbol="method",
                 hover_name="name", labels={"x": "TTFT p90 (ms)", "goodput_rps_per_gpu": "goodput (req/s per GPU)"},
                 title="Pareto: goodput per GPU vs latency")
front = live[live.pareto_latency].sort_values("ttft_p90_s")
fig.add_scatter(x=front.ttft_p90_s * 1e3, y=front.goodput_rps_per_gpu, mode="lines", name="frontier",
                line={"dash": "dot", "color": "gray"})
c1.plotly_chart(fig, use_container_width=True)
fig = px.scatter(live, x="cost_per_hour", y="goodput_rps", color="kind", hover_name="name",
                 labels={"cost_per_hour": "cluster $ / hour", "goodput_rps": "goodput (req/s)"},
                 title="Pareto: goodput vs cost")
front = live[live.pareto_cost].sort_values("cost_per_hour")
fig.add_scatter(x=front.cost_per_hour, y=front.goodput_rps, mode="lines", name="frontier",
                line={"dash": "dot", "color": "gray"})
c2.plotly_chart(fig, use_container_width=True)

curves = res.curves.to_pandas()
whole = curves[curves.kind.isin(["colocated", "disaggregated"]) & curves.full].sort_values("rate_rps")
if len(whole):
    fig = px.line(whole, x="rate_rps_per_gpu", y="attainment", color="name", markers=True,
                  labels={"rate_rps_per_gpu": "offered load (req/s per GPU)", "attainment": "SLO attainment"},
                  title="Goodput vs rate (whole-cluster simulations)")
    fig.add_hline(y=slo.attainment, line_dash="dash", annotation_text="attainment target")
    st.plotly_chart(fig, use_container_width=True)
