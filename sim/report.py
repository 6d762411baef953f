"""Writing a simulation's outputs and printing summaries side by side (rich tables)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
from rich.table import Table

from sim.simulator import SimResult

ROWS = [
    ("completed / rejected", lambda s: f"{s['completed']} / {s['rejected']}"),
    ("throughput (req/s)", lambda s: f"{s['throughput_rps']:.2f}"),
    ("output tok/s", lambda s: f"{s['output_tokens_per_s']:.0f}"),
    ("TTFT p50 / p90 / p99 (ms)", lambda s: _ms3(s["ttft"])),
    ("TPOT p50 / p90 / p99 (ms)", lambda s: _ms3(s["tpot"])),
    ("E2E p50 / p90 (s)", lambda s: f"{s['e2e']['p50']:.2f} / {s['e2e']['p90']:.2f}"),
    ("queueing p90 (ms)", lambda s: _ms(s["queueing"]["p90"])),
    ("KV transfer p90 (ms)", lambda s: _ms(s["transfer"]["p90"])),
    ("SLO attainment", lambda s: f"{s['slo_attainment']:.1%}" if "slo_attainment" in s else "-"),
    ("goodput (req/s/GPU)", lambda s: f"{s['goodput_rps_per_gpu']:.3f}" if "goodput_rps_per_gpu" in s else "-"),
    ("preemptions", lambda s: str(s["preemptions"])),
]


def _ms(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.1f}"


def _ms3(d: dict) -> str:
    return " / ".join(_ms(d[k]) for k in ("p50", "p90", "p99"))


def comparison_table(results: Sequence[tuple[str, dict]], title: str = "simulation") -> Table:
    """A rich table with one column per (name, summary)."""
    t = Table(title=title)
    t.add_column("metric")
    for name, s in results:
        t.add_column(f"{name}\n{s.get('topology', '')} ({s.get('gpus', '?')} GPU)", justify="right")
    for label, fmt in ROWS:
        t.add_row(label, *(fmt(s) for _, s in results))
    return t


def write_result(result: SimResult, out: str | Path) -> Path:
    """``out/records.parquet``, ``out/timeseries.parquet`` and ``out/summary.json`` (creates ``out``)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.records, d / "records.parquet")
    pq.write_table(result.timeseries, d / "timeseries.parquet")
    (d / "summary.json").write_text(json.dumps(result.summary, indent=2, sort_keys=True, default=float) + "\n")
    return d
