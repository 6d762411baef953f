"""Explain: one small workload served colocated and disaggregated, each request's timeline side by side — prefill
interrupting decode in one, the KV transfer and separate queues in the other."""

import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard.common import hardware_input, model_input

st.title("Why split prefill and decode?")
with st.sidebar:
    model = model_input("ex_model")
    hw = hardware_input("ex_hw", multi=False)[0]
    n = st.slider("Requests", 4, 40, 12, key="ex_n")
    rate = st.slider("Rate (req/s)", 1.0, 60.0, 12.0, key="ex_rate")

from sim.cost_profile import roofline_profile  # noqa: E402
from sim.hardware import get_hardware  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from sim.topology import Topology  # noqa: E402
from sim.traces import load_trace  # noqa: E402

w = load_trace("azure-conv").head(n).with_rate(rate).clip_lengths(max_prompt_tokens=4096, max_output_tokens=256)
profile = {r: roofline_profile(model, get_hardware(hw), 1) for r in ("prefill", "decode", "colocated")}
st.markdown(
    "Both clusters below have **2 GPUs** and serve the same requests. **Colocated** (2C): each GPU runs prefills and "
    "decodes, so a new prompt's prefill pauses every running decode — the inter-token gaps (TPOT) stretch. "
    "**Disaggregated** (1P1D): one GPU only prefills, the other only decodes; a finished prefill's KV cache crosses "
    "the link (orange) and joins the decode batch, so decodes are never interrupted — but prompts share one prefill "
    "GPU, so they may queue (gray).")
PHASES = [("queued", "arrival_s", "prefill_start_s", "#bbbbbb"), ("prefill", "prefill_start_s", "prefill_end_s", "#1f77b4"),
          ("KV transfer", "kv_transfer_start_s", "kv_transfer_end_s", "#ff7f0e"),
          ("waiting for decode", "prefill_end_s", "decode_start_s", "#dddddd"),
          ("decode", "decode_start_s", "finished_s", "#2ca02c")]
cols = st.columns(2)
for col, topo in zip(cols, (Topology.colocated(2, hardware=hw), Topology.disaggregated(1, 1, hardware=hw))):
    rec = simulate(topo, w, profile, model=model).records.to_pandas()
    bars = []
    for _, r in rec.iterrows():
        for name, a, b, _ in PHASES:
            start, end = r[a], r[b]
            if name == "waiting for decode" and pd.notna(r["kv_transfer_end_s"]):
                start = r["kv_transfer_end_s"]
            if pd.notna(start) and pd.notna(end) and end > start:
                bars.append({"request": f"req {int(r.request_id)} ({r.decode_instance})", "phase": name,
                             "start": start, "seconds": end - start})
    df = pd.DataFrame(bars)
    fig = px.bar(df, y="request", x="seconds", base="start", color="phase", orientation="h",
                 color_discrete_map={p[0]: p[3] for p in PHASES}, title=f"{topo.label}: request timelines")
    fig.update_layout(xaxis_title="time (s)", yaxis={"autorange": "reversed"}, height=120 + 22 * n, barmode="overlay")
    col.plotly_chart(fig, use_container_width=True)
    tpot = ((rec.last_token_s - rec.first_token_s) / (rec.output_tokens - 1).clip(lower=1)).median()
    col.metric(f"{topo.label}: median TTFT / TPOT", f"{(rec.first_token_s - rec.arrival_s).median() * 1e3:.0f} ms / "
               f"{tpot * 1e3:.1f} ms")
