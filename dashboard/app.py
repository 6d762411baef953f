"""The disagg dashboard (Streamlit): a thin front over the Python API — it computes nothing of its own.

Run with ``disagg dashboard`` (binds 127.0.0.1). One file per page under ``dashboard/pages``.
"""

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` puts only this folder on sys.path

PAGES = Path(__file__).resolve().parent / "pages"
st.set_page_config(page_title="disagg", layout="wide")
nav = st.navigation([
    st.Page(PAGES / "plan.py", title="Plan", default=True),
    st.Page(PAGES / "compare.py", title="Compare"),
    st.Page(PAGES / "explain.py", title="Explain"),
    st.Page(PAGES / "explorer.py", title="Run explorer"),
    st.Page(PAGES / "calibration.py", title="Calibration"),
    st.Page(PAGES / "validation.py", title="Validation"),
])
nav.run()
