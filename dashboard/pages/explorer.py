"""Run explorer: queue length, batch size and KV occupancy over time per instance, and request timelines, from a
run folder written by ``disagg simulate --out`` (records.parquet + timeseries.parquet + summary.json)."""

import json
from pathlib import Path

import plotly.express as px
import pyarrow.parquet as pq
import streamlit as st

from dashboard.common import ROOT, load

st.title("Run explorer")
runs = sorted({p.parent for p in (ROOT / "out").glob("**/records.parquet")}) if (ROOT / "out").is_dir() else []
with st.sidebar:
    choice = st.selectbox("Run folder", ["(simulate the bundled 2P2D example)"] + [str(r) for r in runs], key="rx_run")
    typed = st.text_input("…or a run folder path", key="rx_path").strip()


def read_folder(d: Path) -> tuple:
    if not (d / "records.parquet").is_file():
        raise FileNotFoundError(f"{d}: no records.parquet — not a `disagg simulate --out` folder")
    ts = pq.read_table(d / "timeseries.parquet").to_pandas() if (d / "timeseries.parquet").is_file() else None
    summ = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    return pq.read_table(d / "records.parquet").to_pandas(), ts, summ


if typed or not choice.startswith("("):
    records, ts, summary = load("run folder", lambda: read_folder(Path(typed or choice).expanduser()))
else:
    from sim.config import load_config
    from sim.simulator import simulate

    cfg = load("config", lambda: load_config(ROOT / "sim/configs/llama8b-h100-2p2d.yaml"))
    res = simulate(cfg.topology, cfg.workload.head(600), cfg.profiles, model=cfg.model, slo=cfg.slo)
    records, ts, summary = res.records.to_pandas(), res.timeseries.to_pandas(), res.summary
if summary:
    st.caption(f"{summary.get('topology', '?')} · {summary.get('requests', len(records))} requests · "
               f"throughput {summary.get('throughput_rps', float('nan')):.2f} req/s")
if ts is not None and len(ts):
    ts["kv occupancy"] = ts.kv_used_blocks / ts.kv_capacity_blocks
    c1, c2, c3 = st.columns(3)
    c1.plotly_chart(px.line(ts, x="t_s", y="queue", color="instance", title="Queue length"), use_container_width=True)
    c2.plotly_chart(px.line(ts, x="t_s", y="batch", color="instance", title="Batch size"), use_container_width=True)
    c3.plotly_chart(px.line(ts, x="t_s", y="kv occupancy", color="instance", title="KV occupancy"),
                    use_container_width=True)
util = summary.get("utilisation") if summary else None
if util:
    st.plotly_chart(px.bar(x=list(util), y=list(util.values()), labels={"x": "instance", "y": "busy fraction"},
                           title="Utilisation"), use_container_width=True)
first = records.sort_values("arrival_s").head(60)
first = first.assign(request=first.request_id.astype(str), ttft=first.first_token_s - first.arrival_s,
                     rest=first.finished_s - first.first_token_s)
fig = px.bar(first, y="request", x="ttft", base="arrival_s", orientation="h", title="First 60 requests: "
             "arrival → first token (blue) → finished (green)")
fig.add_bar(y=first.request, x=first.rest, base=first.first_token_s, orientation="h", name="decode",
            marker_color="#2ca02c")
fig.update_layout(height=900, yaxis={"autorange": "reversed"}, xaxis_title="time (s)")
st.plotly_chart(fig, use_container_width=True)
