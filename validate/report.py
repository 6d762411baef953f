"""Validation report files: ``joined.parquet`` (every request of every run, real_ and sim_ columns side by side),
``summary.json`` (configuration, capacities, per-run errors, the real runs' own spread, pass/fail), PNG plots (CDF
overlays of sim vs real per run, error vs load), ``profile.json`` (and ``profile_prefill.json`` /
``profile_decode.json`` when calibrated per role), and a rich table on screen. `load_report` reads them back."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.table import Table

from sim.jsonfile import read_json
from validate.compare import join, worst_error
from validate.runner import ValidationReport

KEYS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "e2e_p50", "throughput")
SPREAD_KEYS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "throughput_rps")


def spread(report: ValidationReport) -> dict[str, dict[str, float]]:
    """The real system's run-to-run spread per (topology, load): (max - min) / mean over repeats, per metric."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in report.runs:
        groups[f"{r.topology}@{r.load:g}"].append(r.errors["real"])
    out = {}
    for key, reals in groups.items():
        if len(reals) < 2:
            continue
        out[key] = {}
        for k in SPREAD_KEYS:
            v = np.array([x[k] for x in reals], float)
            out[key][k] = float((v.max() - v.min()) / v.mean()) if v.mean() else math.nan
    return out


def sim_spread(report: ValidationReport) -> dict[str, dict[str, float]]:
    """The simulator's own spread per (topology, load): sd / mean of each statistic over the seeds of the as-predicted
    simulation (`validate.compare`), averaged over the point's runs; empty when each run was simulated once."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in report.runs:
        if r.errors.get("sim_spread"):
            groups[f"{r.topology}@{r.load:g}"].append(r.errors["sim_spread"])
    return {key: {k: float(np.nanmean([x[k] for x in sps])) for k in SPREAD_KEYS} for key, sps in groups.items()}


# the simulations each run reports errors of (`validate.runner`): as predicted, and the diagnoses next to it
VARIANTS = {"as predicted": "errors", "at the run's step speed": "with_run_step_speed",
            "no prefill dispersion": "without_prefill_dispersion", "no host speed": "without_host_speed",
            "engine steps (in-sample)": "with_engine_step_costs"}


def mean_abs_errors(report: ValidationReport) -> dict[str, dict[str, float]]:
    """Mean |error| over the runs, per `KEYS` metric, for each simulation in `VARIANTS` the runs have."""
    out = {}
    for name, key in VARIANTS.items():
        errs = [r.errors[key] for r in report.runs if r.errors.get(key)]
        if errs:
            out[name] = {k: float(np.nanmean([abs(e[k]) for e in errs])) for k in KEYS}
    return out


def summary(report: ValidationReport, max_error: float) -> dict:
    runs = [{"topology": r.topology, "load": r.load, "rate_rps": r.rate_rps, "repeat": r.repeat, **r.errors}
            for r in report.runs]
    worst = max((worst_error(r.errors) for r in report.runs), default=0.0)
    return {"format": "disagg.validate", "version": 1, "config": report.config, "capacity_rps": report.capacity_rps,
            "profile": {"name": report.profile.name, "fit": report.profile.fit}, "runs": runs,
            "mean_abs_error": mean_abs_errors(report),
            "real_spread": spread(report), "sim_spread": sim_spread(report), "max_error": max_error, "worst_error": worst, "passed": worst <= max_error}


def mean_table(report: ValidationReport) -> Table:
    """`mean_abs_errors` as a table: one row per simulation."""
    t = Table(title=f"mean |error| over {len(report.runs)} runs")
    for col in ("simulated", *KEYS):
        t.add_column(col, justify="right")
    for name, errs in mean_abs_errors(report).items():
        t.add_row(name, *(f"{errs[k]:.1%}" for k in KEYS))
    return t


def table(report: ValidationReport) -> Table:
    """Per run: the errors (`KEYS`), the real p50s, the TTFT p50 error without prefill dispersion (when the profile
    has one), the p50 errors without host speed (when it was measured), the
    step-time error (prefill / decode, with host speed when measured), the p50 errors at the speed the run's steps
    ran (the calibrated model less the host's change of speed) and with the engine's own step costs (in-sample)."""
    t = Table(title="simulator error vs the real engine: (sim - real) / real")
    for col in ("topology", "load", "req/s", "run", *KEYS, "real TTFT p50 ms", "real TPOT p50 ms",
                "TTFT p50 | no prefill dispersion", "TTFT / TPOT p50 | no host speed", "step err prefill / decode",
                "TTFT / TPOT p50 | run's step speed", "TTFT / TPOT p50 | engine steps"):
        t.add_column(col, justify="right")

    def pair(d: dict | None, a: str, b: str, get=lambda d, k: d[k]) -> str:
        if not d:
            return "-"
        return " / ".join("-" if (v := get(d, k)) is None or math.isnan(v) else f"{v:+.1%}" for k in (a, b))

    for r in report.runs:
        e = r.errors["errors"]
        service = r.errors.get("service_with_host_speed") or r.errors.get("service")
        t.add_row(r.topology, f"{r.load:.0%}", f"{r.rate_rps:.2f}", str(r.repeat + 1),
                  *(_pct(e[k]) for k in KEYS),
                  f"{r.errors['real']['ttft_p50'] * 1e3:.1f}", f"{r.errors['real']['tpot_p50'] * 1e3:.2f}",
                  _pct((r.errors.get("without_prefill_dispersion") or {}).get("ttft_p50")),
                  pair(r.errors.get("without_host_speed"), "ttft_p50", "tpot_p50"),
                  pair(service, "prefill", "decode", lambda d, k: d[k]["median"] if d[k]["steps"] else None),
                  pair(r.errors.get("with_run_step_speed"), "ttft_p50", "tpot_p50"),
                  pair(r.errors.get("with_engine_step_costs"), "ttft_p50", "tpot_p50"))
    return t


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:+.1%}"


def _plots(report: ValidationReport, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for r in report.runs:
        j = join(r.real, r.sim)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, m, label in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
            for side, style in (("real", "-"), ("sim", "--")):
                v = np.sort(j.column(f"{side}_m_{m}_s").to_numpy(zero_copy_only=False) * 1e3)
                v = v[np.isfinite(v)]
                ax.plot(v, np.arange(1, v.size + 1) / max(v.size, 1), style, label=side)
            ax.set_xlabel(label)
            ax.set_ylabel("CDF")
            ax.legend()
        fig.suptitle(f"{r.topology} at {r.load:.0%} of capacity ({r.rate_rps:.2f} req/s), run {r.repeat + 1}")
        fig.tight_layout()
        p = out / f"cdf_{r.topology}_{r.load:g}_{r.repeat + 1}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for topo in sorted({r.topology for r in report.runs}):
        for key, marker in (("ttft_p50", "o"), ("tpot_p50", "s"), ("throughput", "^")):
            rs = [r for r in report.runs if r.topology == topo]
            ax.plot([r.load for r in rs], [100 * r.errors["errors"][key] for r in rs], marker, label=f"{topo} {key}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("load (fraction of measured capacity)")
    ax.set_ylabel("error (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "error_vs_load.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return [*paths, p]


def write(report: ValidationReport, out: str | Path, max_error: float = 0.10) -> dict:
    """Write the report folder (creates it); returns the summary dict."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    tables = []
    for r in report.runs:
        j = join(r.real, r.sim)
        n = j.num_rows
        j = j.append_column("topology", pa.array([r.topology] * n)).append_column("load", pa.array([r.load] * n))
        tables.append(j.append_column("repeat", pa.array([r.repeat] * n, pa.int64())))
    if tables:
        pq.write_table(pa.concat_tables(tables, promote_options="default"), d / "joined.parquet")
    s = summary(report, max_error)
    s["plots"] = [p.name for p in _plots(report, d)] if report.runs else []
    (d / "summary.json").write_text(json.dumps(s, indent=2, default=_num) + "\n")
    report.profile.save(d / "profile.json")
    for role, prof in report.role_profiles.items():  # per-role serving calibration: the disaggregated pools' own
        if prof is not report.profile:
            prof.save(d / f"profile_{role}.json")
    return s


def _num(o: object) -> object:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)


def load_report(path: str | Path) -> tuple[dict, pa.Table | None]:
    """(summary dict, joined table or None) from a report folder; raises FileNotFoundError / ValueError clearly."""
    d = Path(path)
    f = d / "summary.json"
    if not f.is_file():
        raise FileNotFoundError(f"{d}: no summary.json — not a validate report folder (run `disagg validate --out {d}`)")
    s = read_json(f)
    if s.get("format") != "disagg.validate":
        raise ValueError(f"{f}: not a disagg validate summary")
    j = pq.read_table(d / "joined.parquet") if (d / "joined.parquet").is_file() else None
    return s, j
