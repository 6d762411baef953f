"""Validation: simulated vs real latencies from a ``disagg validate`` report folder (summary.json + joined.parquet
with sim_/real_ columns per request)."""

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard.common import ROOT, load, no_data

st.title("Validation: simulator vs real")
found = sorted({p.parent for p in (ROOT / "out").glob("**/summary.json") if (p.parent / "joined.parquet").is_file()}) \
    if (ROOT / "out").is_dir() else []
with st.sidebar:
    pick = st.selectbox("Report folder", ["(none)"] + [str(p) for p in found], key="val_pick")
    typed = st.text_input("…or a report folder path", key="val_path").strip()


def read(d: Path) -> tuple[dict, pd.DataFrame | None]:
    from validate.report import load_report

    s, j = load_report(d)
    return s, (j.to_pandas() if j is not None else None)


folder = Path(typed).expanduser() if typed else (Path(pick) if not pick.startswith("(") else None)
if folder is None:
    no_data("validate report", "disagg validate")
    st.stop()
summary, joined = load("validate report", lambda: read(folder))
verdict = summary.get("passed", summary.get("pass"))
st.caption(f"{folder} · verdict: {verdict if verdict is not None else '?'}")
runs = pd.DataFrame(summary.get("runs", []))
if len(runs):
    st.dataframe(runs.drop(columns=[c for c in runs.columns if isinstance(runs[c].iloc[0], dict)]), hide_index=True)
    st.subheader("Errors: (sim - real) / real")
    rows = []
    for r in summary["runs"]:
        e, plain, at_speed = r.get("errors", {}), r.get("without_host_speed") or {}, r.get("with_run_step_speed") or {}
        rows.append({"topology": r.get("topology"), "load": r.get("load"), "run": r.get("repeat", 0) + 1,
                     **{k: e.get(k) for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "throughput")},
                     **{f"{k} without host speed": plain.get(k) for k in ("ttft_p50", "tpot_p50")},
                     **{f"{k} at the run's step speed": at_speed.get(k) for k in ("ttft_p50", "tpot_p50")}})
    st.dataframe(pd.DataFrame(rows).style.format(lambda v: f"{v:+.1%}" if isinstance(v, float) and 0 <= abs(v) < 100
                                                 else v, subset=[c for c in rows[0] if c not in ("topology", "load", "run")]),
                 hide_index=True)
    st.caption("'without host speed': the same simulation with every instance at the profile's speed (no per-core "
               "speed measured during the run). 'at the run's step speed': the calibrated model with its steps "
               "stretched by how fast the run's own steps ran (a diagnosis, not a prediction; see README, Validation).")
    means = summary.get("mean_abs_error") or {}
    if means:
        st.subheader(f"Mean |error| over {len(runs)} runs")
        st.dataframe(pd.DataFrame([{"simulated": name, **m} for name, m in means.items()]).style.format(
            lambda v: f"{v:.1%}" if isinstance(v, float) else v), hide_index=True)
    seeds = (summary.get("config") or {}).get("sim_seeds")
    spreads = [{"point": k, "spread": "real runs: (max - min) / mean", **v}
               for k, v in (summary.get("real_spread") or {}).items()]
    spreads += [{"point": k, "spread": f"simulator, {seeds} seeds: sd / mean", **v}
                for k, v in (summary.get("sim_spread") or {}).items()]
    if spreads:
        st.subheader("Noise: the real system's between repeats, the simulator's between seeds")
        st.dataframe(pd.DataFrame(spreads).style.format(lambda v: f"{v:.1%}" if isinstance(v, float) else v),
                     hide_index=True)
        st.caption("Each simulated statistic is the mean over the run's seeded simulations (--sim-seeds).")
if joined is None or not len(joined):
    st.info("The report has no joined.parquet (no runs finished).")
    st.stop()


def metric(prefix: str, name: str) -> pd.Series:
    d = joined
    if name == "ttft":
        return d[f"{prefix}first_token_s"] - d[f"{prefix}arrival_s"]
    return (d[f"{prefix}last_token_s"] - d[f"{prefix}first_token_s"]) / (d[f"{prefix}output_tokens"] - 1).clip(lower=1)


need = [f"{p}{c}" for p in ("sim_", "real_") for c in ("arrival_s", "first_token_s", "last_token_s", "output_tokens")]
missing = [c for c in need if c not in joined.columns]
if missing:
    st.error(f"joined.parquet lacks columns {missing}: not a disagg validate report")
    st.stop()
c1, c2 = st.columns(2)
for col, name in ((c1, "ttft"), (c2, "tpot")):
    parts = []
    for src in ("sim", "real"):
        x = np.sort(metric(f"{src}_", name).dropna().to_numpy())
        parts.append(pd.DataFrame({"seconds": x, "fraction": np.linspace(0, 1, len(x)), "source": src}))
    col.plotly_chart(px.line(pd.concat(parts), x="seconds", y="fraction", color="source",
                             title=f"{name.upper()} CDF: simulated vs real"), use_container_width=True)
    col.plotly_chart(px.scatter(x=metric("real_", name), y=metric("sim_", name), opacity=0.4,
                                labels={"x": f"real {name} (s)", "y": f"simulated {name} (s)"},
                                title=f"{name.upper()} per request"), use_container_width=True)
