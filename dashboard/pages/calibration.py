"""Calibration: a cost profile's formulas, its measured-vs-fitted curves and held-out errors (`fit` dict)."""

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard.common import ROOT, file_input, load, no_data

st.title("Calibration profile")
found = sorted((ROOT / "profiles").glob("*.json")) if (ROOT / "profiles").is_dir() else []
with st.sidebar:
    pick = st.selectbox("Profile", ["(none)"] + [str(p) for p in found], key="cal_pick")
    other = file_input("Profile JSON", "cal_file", ["json"])

from sim.cost_profile import CostProfile  # noqa: E402

path = other or (Path(pick) if not pick.startswith("(") else None)
if path is None:
    no_data("calibrated profile", "disagg calibrate run")
    st.stop()
prof = load("cost profile", lambda: CostProfile.load(path))
st.subheader(prof.name)
st.caption(f"source {prof.source} · hardware {prof.hardware or '?'} · TP {prof.tp} · {prof.dtype}")
p = prof.prefill
st.code(f"prefill(batch) = {p.a_s:.3g} + {p.b_s:.3g}·Σlen + {p.c_s:.3g}·Σlen² + {p.d_s:.3g}·num_seqs  (s)\n" +
        "\n".join(f"decode(batch ≤ {d.max_batch}) = {d.a_s:.3g} + {d.b_s:.3g}·batch + {d.c_s:.3g}·Σcontext  (s)"
                  for d in prof.decode))
fit = prof.fit or {}
rows = [{"part": k, **{m: v.get(m) for m in ("fit_mape", "cv_mape", "heldout_mape", "heldout_max_err",
                                             "fit_points", "heldout_points")}}
        for k, v in fit.items() if isinstance(v, dict) and k in ("prefill", "decode")]
if rows:
    st.subheader("Held-out error")
    st.dataframe(pd.DataFrame(rows), hide_index=True)
else:
    st.info("This profile has no fit report (it was not measured by `disagg calibrate run`).")
c1, c2 = st.columns(2)
lens = np.unique(np.geomspace(16, 8192, 40).astype(int))
c1.plotly_chart(px.line(x=lens, y=[prof.prefill_s([int(n)]) * 1e3 for n in lens], log_x=True,
                        labels={"x": "prompt tokens (batch of 1)", "y": "prefill ms"}, title="Fitted prefill"),
                use_container_width=True)
bs = np.arange(1, 257)
dec = pd.DataFrame([{"batch": int(b), "context": c, "ms": prof.decode_step_s(int(b), int(b) * c) * 1e3}
                    for c in (512, 2048, 8192) for b in bs])
c2.plotly_chart(px.line(dec, x="batch", y="ms", color="context", title="Fitted decode step (per-seq context)"),
                use_container_width=True)
measured = fit.get("points") or fit.get("samples_table")
if isinstance(measured, list) and measured and isinstance(measured[0], dict):
    st.subheader("Measured points")
    st.dataframe(pd.DataFrame(measured), hide_index=True)
with st.expander("Full fit report"):
    st.json(fit)
