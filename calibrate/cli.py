"""``disagg calibrate``: run | show | import-aic | roofline (also ``python -m calibrate``).

Heavy imports (torch, the model runner, pyarrow tables) happen inside the commands. User errors are printed without
a traceback (`disagg_cli.main.fail`).
"""

from __future__ import annotations

import math
from pathlib import Path

import typer

app = typer.Typer(help="Measure step times and KV-transfer bandwidth, fit cost profiles, or build them from tables.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _fail(msg: str) -> None:
    from disagg_cli.main import fail

    fail(msg)


def _pct(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{100 * x:.1f} %"


def _print_rows(rows: list[dict], title: str) -> None:
    from rich.table import Table

    from disagg_cli.main import console

    t = Table(title=title)
    for col in ("what", "points fit/held-out", "held-out MAPE", "held-out max", "CV/fit MAPE", "sample spread"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for r in rows:
        bad = r["heldout_mape"] is not None and r["heldout_mape"] > 0.10
        t.add_row(r["what"], r["points"], ("[bold red]" if bad else "") + _pct(r["heldout_mape"]),
                  _pct(r["heldout_max_err"]), _pct(r["cv_mape"]), _pct(r["spread"]))
    console.print(t)
    for r in rows:
        console.print(f"  {r['what']}: {r['formula']}" + (f"  ({r['note']})" if r["note"] else ""), highlight=False,
                      markup=False)


def _print_compare(profiles: dict) -> None:
    from rich.table import Table

    from calibrate.report import compare
    from disagg_cli.main import console

    t = Table(title="predicted step times")
    t.add_column("shape")
    for name in profiles:
        t.add_column(name, justify="right")
    for row in compare(profiles):
        t.add_row(row["shape"], *(f"{row[n] * 1e3:.2f} ms" for n in profiles))
    console.print(t)


@app.command()
def run(
    model: str = typer.Option("tiny", help="'tiny' (random weights) or a Hugging Face model folder."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    dtype: str = typer.Option("bf16", help="bf16 | fp32 (| fp16 on CUDA)"),
    budget_s: float = typer.Option(120.0, "--budget-s", help="Wall-clock target for the whole run; shapes the grid."),
    out: Path | None = typer.Option(None, help="Profile JSON to write (default profiles/MODEL-DEVICE-DTYPE.json); "
                                    "raw samples go next to it as NAME.samples.parquet."),
    seed: int = typer.Option(0, help="Seeds shapes, token ids, visiting order and the tiny model's weights."),
    threads: int = typer.Option(1, help="torch threads on CPU (1 is fastest on a shared CPU)."),
    transport: list[str] | None = typer.Option(None, help="Transports to sweep (repeatable); 'none' for none; "
                                               "default: all the engine has."),
    backend: str = typer.Option("builtin", help="builtin (disagg's model runner) or vllm (vLLM's per-iteration "
                                "stats from one eager vLLM server, .venv-vllm)."),
    serving_s: float = typer.Option(0.0, "--serving-s", help="Then serve a calibration workload on the engine for "
                                    "this many seconds and fit its own steps instead (calibrate.serving; CPU; 0: "
                                    "off). The grid fit stays in the profile's fit.base; the traced steps go to "
                                    "NAME.serving-steps/."),
) -> None:
    """Measure prefill/decode step times and KV-transfer bandwidth on this machine and fit a cost profile."""
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from calibrate import CalibrationError
    from calibrate.harness import run as run_calibration
    from calibrate.report import show
    from disagg_cli.main import console

    if backend == "vllm":  # vLLM backend hook: calibrate/vllm_iterations.py
        _run_vllm(model, budget_s, out, seed)
        return
    if backend != "builtin":
        _fail(f"--backend must be builtin or vllm, got {backend!r}")

    if serving_s < 0 or not math.isfinite(serving_s):
        _fail(f"--serving-s must be >= 0 seconds, got {serving_s}")
    if serving_s and device != "cpu":
        _fail("--serving-s: the serving calibration runs the CPU engine; use it with --device cpu")
    kinds = None if not transport else [k for k in transport if k != "none"]
    name = Path(model).name if Path(model).exists() else model
    out = out or Path("profiles") / f"{name}-{device.replace(':', '')}-{dtype}.json"
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.percentage:>3.0f} %"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(task: str, frac: float) -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=1.0)
            bar.update(tasks[task], completed=frac)

        try:
            res = run_calibration(model, device, dtype, budget_s, out, seed=seed, threads=threads,
                                  transports=kinds, progress=progress)
        except CalibrationError as e:
            _fail(str(e))
        for t in tasks.values():
            bar.update(t, completed=1.0)
    _print_rows(show(res.profile), f"{res.profile.name} ({res.wall_s:.0f} s, budget {budget_s:.0f} s)")
    d = res.profile.fit.get("derived", {})
    kv = [f"{x / 1e9:.2f}" for x in d.get("decode_kv_bytes_per_s", []) if x]
    if d.get("copy_bytes_per_s"):
        console.print(f"decode KV read {', '.join(kv)} GB/s per piece vs copy {d['copy_bytes_per_s'] / 1e9:.2f} GB/s; "
                      f"prefill {(d.get('prefill_flops_per_s') or 0) / 1e9:.0f} GFLOP/s vs GEMM "
                      f"{(d.get('gemm_flops_per_s') or 0) / 1e9:.0f} GFLOP/s")
    for which in ("prefill", "decode"):
        if res.profile.fit[which]["heldout_mape"] > 0.10:
            console.print(f"[bold red]warning:[/] {which} held-out MAPE above 10 %: the machine was too noisy or "
                          "the budget too small; rerun with a larger --budget-s")
    if serving_s:
        _serve_and_refit(model, dtype, res.profile, serving_s, seed, res.profile_path)
    console.print(f"wrote {res.profile_path} and {res.samples_path}")


def _serve_and_refit(model: str, dtype: str, grid, serving_s: float, seed: int, out: Path) -> None:
    from calibrate import CalibrationError
    from calibrate.report import show
    from calibrate.serving import calibrate_serving, describe_wait
    from disagg_cli.main import console
    from engine.cluster import ClusterError, resolve_model
    from sim.model_spec import from_hf_config, get_model

    folder = resolve_model(model)
    spec = get_model(model) if model.lower() == "tiny" else from_hf_config(folder)
    try:
        with console.status(f"serving calibration ({serving_s:g} s of load) ...") as status:
            steps_dir = out.with_name(out.stem + ".serving-steps")  # every traced step kept, as JSON lines
            profs, info = calibrate_serving(folder, spec, grid, serving_s, seed, dtype=dtype, trace_dir=steps_dir,
                                            progress=lambda msg: status.update(msg))
            prof = profs["colocated"]
    except (CalibrationError, ClusterError) as e:
        _fail(str(e))
    prof.save(out)
    console.print(f"serving calibration steps: {steps_dir}/")
    _print_rows(show(prof)[:2], f"{prof.name}: {info['requests']} requests at {info['rate_rps']:.2f} req/s, "
                f"{info['duration_s']:.0f} s (cross-validated MAPE over the engine's steps)")
    if prof.prefill_dispersion:
        lo, mid, hi = (prof.prefill_factor(u) for u in (0.1, 0.5, 0.9))
        console.print(f"prefill steps / fitted time: p10 {lo:.2f}, p50 {mid:.2f}, p90 {hi:.2f} (mean 1; kept as "
                      "prefill_dispersion, the simulator draws each prefill step's factor from it)")
    if prof.core_wait is not None:
        console.print(f"steps {describe_wait(prof)} (the simulator's pinned-worker contention, HostCPU(pinned=True))")


def _run_vllm(model: str, budget_s: float, out: Path | None, seed: int) -> None:
    from calibrate.vllm_iterations import calibrate_vllm
    from disagg_cli.main import console
    from engine.cluster import ClusterError

    name = Path(model).name if Path(model).exists() else model
    out = out or Path("profiles") / f"vllm-{name}-cpu-bf16.json"
    try:
        with console.status(f"vLLM calibration ({budget_s:.0f} s budget) ..."):
            prof = calibrate_vllm(model, budget_s, rounds=50, seed=seed, out=out)
    except (ClusterError, FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e))
    for which in ("prefill", "decode"):
        f = prof.fit[which]
        console.print(f"{which}: {f['formula']} — {f['samples']} samples, {f['fit_points']}+{f['heldout_points']} "
                      f"points, held-out MAPE {_pct(f['heldout_mape'])} (max {_pct(f['heldout_max_err'])})")
    console.print(f"prefill {prof.prefill}; decode {list(prof.decode)}", markup=False)
    console.print(f"wrote {out}")


@app.command()
def show(profile: Path = typer.Argument(..., help="A cost-profile JSON file.")) -> None:
    """Print a profile's formulas and fit quality (held-out errors, spread, transports)."""
    from calibrate import CalibrationError
    from calibrate.report import load_profile
    from calibrate.report import show as rows

    try:
        prof = load_profile(profile)
    except CalibrationError as e:
        _fail(str(e))
    _print_rows(rows(prof), f"{prof.name} [{prof.source}]")


@app.command("import-aic")
def import_aic(
    gpu: str = typer.Option("h200_sxm", help="aiconfigurator-core system name, e.g. h100_sxm, h200_sxm, b200_sxm."),
    model: str = typer.Option("llama-3.1-8b", help="Preset, HF folder, or a bundled config such as "
                              "meta-llama/Meta-Llama-3.1-8B."),
    tp: int = typer.Option(1, help="Tensor-parallel degree."),
    framework: str = typer.Option("vllm", help="vllm | sglang | trtllm (whose kernel tables to use)."),
    version: str | None = typer.Option(None, help="Framework version of the tables (default: newest)."),
    out: Path | None = typer.Option(None, help="Write the profile JSON here."),
) -> None:
    """Compose a profile from NVIDIA's measured kernel tables (aiconfigurator-core) and compare it with the roofline."""
    from calibrate import CalibrationError
    from calibrate.aic_import import import_aic as build
    from calibrate.report import roofline
    from calibrate.report import show as rows
    from disagg_cli.main import console

    try:
        prof = build(gpu, model, tp, framework, version)
    except CalibrationError as e:
        _fail(str(e))
    _print_rows(rows(prof), f"{prof.name} [{framework} {prof.fit['source']['gemm_tables']}]")
    try:
        _print_compare({"imported": prof, "roofline": roofline(prof.model or model, prof.hardware, tp)})
    except CalibrationError as e:
        console.print(f"(no roofline comparison: {e})")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"wrote {prof.save(out)}")


@app.command("roofline")
def roofline_cmd(
    model: str = typer.Option("llama-3.1-8b", help="Preset or HF folder."),
    hardware: str = typer.Option("h200-sxm", help="A sim hardware preset."),
    tp: int = typer.Option(1, help="Tensor-parallel degree."),
    out: Path | None = typer.Option(None, help="Write the profile JSON here."),
) -> None:
    """Build a datasheet roofline profile (efficiency factors documented in sim.cost_profile.RooflineFactors)."""
    from calibrate import CalibrationError
    from calibrate.report import roofline
    from calibrate.report import show as rows
    from disagg_cli.main import console

    try:
        prof = roofline(model, hardware, tp)
    except CalibrationError as e:
        _fail(str(e))
    _print_rows(rows(prof), prof.name)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"wrote {prof.save(out)}")
