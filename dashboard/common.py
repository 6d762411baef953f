"""What the dashboard's pages share: sidebar inputs, reading user files with readable errors, small chart helpers.

Every user file (HF config.json, cost profile, trace, run folder, validate report) goes through `load`, which turns
the library's exceptions into an ``st.error`` message and stops the page — a bad upload never shows a traceback.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import streamlit as st

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def load(what: str, fn: Callable[[], T]) -> T:
    """Run a loader; on a bad file show what went wrong and stop the page."""
    try:
        return fn()
    except (ValueError, FileNotFoundError, KeyError, TypeError, OSError) as e:
        st.error(f"Could not read the {what}: {e}")
        st.stop()
        raise  # st.stop() raises; this line is for type checkers


def file_input(label: str, key: str, types: list[str], help: str = "") -> Path | None:
    """An upload box with a path box under it; returns a local path (uploads are saved to a temp file) or None."""
    up = st.file_uploader(label, type=types, key=f"{key}_upload", help=help)
    path = st.text_input(f"…or a path on this machine ({label.lower()})", key=f"{key}_path").strip()
    if up is not None:
        d = Path(tempfile.mkdtemp(prefix="disagg-upload-"))
        p = d / Path(up.name).name
        p.write_bytes(up.getvalue())
        return p
    return Path(path).expanduser() if path else None


def model_input(key: str = "model") -> Any:
    from sim.model_spec import PRESETS, from_hf_config

    names = [n for n in PRESETS if n != "tiny"]
    preset = st.selectbox("Model preset", names, index=names.index("llama-3.1-8b"), key=f"{key}_preset")
    cfg = file_input("HF config.json", f"{key}_cfg", ["json"], "Overrides the preset.")
    if cfg is not None:
        return load("model config", lambda: from_hf_config(cfg))
    return PRESETS[preset]


def slo_input(key: str = "slo") -> Any:
    from sim.metrics import SLO

    c1, c2 = st.columns(2)
    ttft = c1.number_input("TTFT target (ms)", 10.0, 60000.0, 500.0, 50.0, key=f"{key}_ttft")
    tpot = c2.number_input("TPOT target (ms)", 1.0, 5000.0, 30.0, 5.0, key=f"{key}_tpot")
    pct = c1.selectbox("Percentile", [50.0, 90.0, 95.0, 99.0], index=1, key=f"{key}_pct")
    att = c2.slider("Attainment", 0.5, 0.99, 0.9, 0.01, key=f"{key}_att")
    return SLO(ttft / 1e3, tpot / 1e3, pct, att)


def workload_input(key: str = "wl", default_n: int | None = None) -> Any:
    """A bundled trace (optionally rate-scaled), an uploaded trace, or synthetic distributions."""
    from sim.traces import BUNDLED, load_trace, read_trace
    from sim.workload_gen import workload_from_dict

    src = st.radio("Workload", ["bundled trace", "trace file", "synthetic"], horizontal=True, key=f"{key}_src")
    if src == "bundled trace":
        name = st.selectbox("Trace", sorted(BUNDLED), index=sorted(BUNDLED).index("azure-conv"), key=f"{key}_name")
        w = load("trace", lambda: load_trace(name))
    elif src == "trace file":
        p = file_input("Trace (CSV / JSONL)", f"{key}_file", ["csv", "jsonl", "json"])
        if p is None:
            st.info("Upload a trace (Azure / Vidur / splitwise CSV, Mooncake JSONL) or give its path.")
            st.stop()
        w = load("trace", lambda: read_trace(p))
    else:
        c1, c2 = st.columns(2)
        n = int(c1.number_input("Requests", 100, 50000, 4000, 100, key=f"{key}_n"))
        rate = c2.number_input("Rate (req/s)", 0.1, 1000.0, 5.0, key=f"{key}_rate")
        pm = c1.number_input("Mean prompt tokens", 1, 100000, 1000, key=f"{key}_pm")
        om = c2.number_input("Mean output tokens", 1, 10000, 200, key=f"{key}_om")
        w = load("workload", lambda: workload_from_dict({
            "num_requests": n, "seed": 0, "arrival": {"kind": "poisson", "rate_rps": rate},
            "prompt": {"kind": "lognormal", "mean_tokens": pm, "sigma": 0.8},
            "output": {"kind": "lognormal", "mean_tokens": om, "sigma": 0.8}}))
    if default_n:
        w = w.head(min(len(w), default_n))
    return w


def hardware_input(key: str = "hw", multi: bool = True) -> list[str]:
    from sim.hardware import HARDWARE

    names = sorted(HARDWARE)
    if multi:
        got = st.multiselect("Hardware (several = heterogeneous prefill/decode pairs too)", names, ["h100-sxm"],
                             key=f"{key}_list")
        return got or ["h100-sxm"]
    return [st.selectbox("Hardware", names, index=names.index("h100-sxm"), key=f"{key}_one")]


def no_data(what: str, command: str) -> None:
    st.info(f"No {what} yet — run `{command}`, then pick its output here.")
