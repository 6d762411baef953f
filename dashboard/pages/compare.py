"""Compare: colocated vs disaggregated for chosen topologies — latency CDFs, TTFT/TPOT vs rate, where the time goes,
and goodput vs KV-link bandwidth (where disaggregation stops paying for its network)."""

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard.common import hardware_input, load, model_input, slo_input, workload_input

st.title("Colocated vs disaggregated")
with st.sidebar:
    model = model_input("cmp_model")
    hw = hardware_input("cmp_hw", multi=False)[0]
    workload = workload_input("cmp_wl", default_n=1500)
    slo = slo_input("cmp_slo")
    labels = st.text_input("Topologies (labels)", "2C, 1P1D", key="cmp_labels")
    rate = st.number_input("Rate (req/s)", 0.1, 10000.0, 20.0, key="cmp_rate")
    links = st.multiselect("Links for the bandwidth sweep", ["nvlink4", "pcie5", "roce400", "roce100", "eth100",
                                                               "eth25"], ["nvlink4", "roce100", "eth25"],
                           key="cmp_links")

from sim.cost_profile import roofline_profile  # noqa: E402
from sim.hardware import get_hardware  # noqa: E402
from sim.metrics import per_request  # noqa: E402
from sim.plan import plan  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from sim.topology import Topology  # noqa: E402

topos = load("topology labels", lambda: [Topology.from_label(x, hardware=hw) for x in labels.split(",") if x.strip()])
if not topos:
    st.info("Give at least one topology label, e.g. 4C or 2P2D.")
    st.stop()
profile = {r: roofline_profile(model, get_hardware(hw), 1) for r in ("prefill", "decode", "colocated")}


@st.cache_data(show_spinner=False, max_entries=32)
def run(label: str, rate: float, _topo: Topology, _w: object, key: str) -> pd.DataFrame:
    res = simulate(_topo, _w.with_rate(rate), profile, model=model, slo=slo, sample_every_s=float("inf"))
    m = per_request(res.records)
    return pd.DataFrame({k: m[k] for k in ("ttft_s", "tpot_s", "queueing_s", "prefill_s", "transfer_s", "decode_s")})


wkey = f"{workload.name}/{len(workload)}/{model.name}/{hw}"
frames = {t.label: load("simulation", lambda t=t: run(t.label, rate, t, workload, wkey)) for t in topos}
c1, c2 = st.columns(2)
for col, metric, title in ((c1, "ttft_s", "TTFT"), (c2, "tpot_s", "TPOT")):
    cdf = pd.concat([pd.DataFrame({"seconds": np.sort(f[metric].dropna()),
                                   "fraction": np.linspace(0, 1, f[metric].notna().sum()), "topology": k})
                     for k, f in frames.items()])
    fig = px.line(cdf, x="seconds", y="fraction", color="topology", title=f"{title} CDF at {rate:g} req/s")
    fig.add_vline(x=slo.ttft_s if metric == "ttft_s" else slo.tpot_s, line_dash="dash")
    col.plotly_chart(fig, use_container_width=True)

parts = pd.DataFrame([{"topology": k, "phase": p.removesuffix("_s"), "mean seconds": float(f[p].mean())}
                      for k, f in frames.items() for p in ("queueing_s", "prefill_s", "transfer_s", "decode_s")]).fillna(0)
st.plotly_chart(px.bar(parts, x="topology", y="mean seconds", color="phase", title="Where a request's time goes"),
                use_container_width=True)

sweep = pd.DataFrame([{"topology": k, "rate (req/s)": r, "TTFT p90 (s)": f.ttft_s.quantile(0.9),
                       "TPOT p90 (s)": f.tpot_s.quantile(0.9)}
                      for r in (rate / 2, rate, rate * 1.5)
                      for k, f in ((t.label, load("simulation", lambda t=t, r=r: run(t.label, r, t, workload, wkey)))
                                   for t in topos)])
c1, c2 = st.columns(2)
c1.plotly_chart(px.line(sweep, x="rate (req/s)", y="TTFT p90 (s)", color="topology", markers=True),
                use_container_width=True)
c2.plotly_chart(px.line(sweep, x="rate (req/s)", y="TPOT p90 (s)", color="topology", markers=True),
                use_container_width=True)

disagg = [t for t in topos if t.kind == "disaggregated"]
if disagg and links:
    cands = [Topology.disaggregated(t.pool("prefill").instances, t.pool("decode").instances, hardware=hw, link=ln)
             for t in disagg for ln in links] + [t for t in topos if t.kind == "colocated"]
    with st.spinner("goodput per link…"):
        res = load("planner inputs", lambda: plan(model=model, hardware=hw, workload=workload, slo=slo,
                                                  topologies=cands, refine_routers=()))
    df = res.table.to_pandas()
    df["link"] = df.link.fillna("(colocated)")
    st.plotly_chart(px.bar(df, x="link", y="goodput_rps_per_gpu", color="topology", barmode="group",
                           title="Goodput per GPU vs KV link (fastest to slowest)"), use_container_width=True)
