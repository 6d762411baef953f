"""``disagg validate``: the simulator's error against real engine runs (see `validate.runner`)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("validate")
    def validate_cmd(
        model: str = typer.Option("tiny", help="Engine model: 'tiny' or a Hugging Face Llama folder."),
        topologies: str = typer.Option("2C,1P1D", help="Comma-separated, e.g. 2C,1P1D."),
        loads: str = typer.Option("0.3,0.6,0.9", help="Fractions of each topology's measured capacity."),
        workload: str = typer.Option("azure-conv", help="Bundled trace name or a trace file (lengths are scaled "
                                     "to the model's context; arrivals are Poisson at each load's rate)."),
        num_requests: int = typer.Option(100, help="Requests per run."),
        profile: Path | None = typer.Option(None, help="Use this calibrated profile instead of calibrating now."),
        budget_s: float = typer.Option(60.0, "--budget-s", help="Calibration budget when --profile is not given."),
        repeat: int = typer.Option(1, help="Real runs per point, to show the real system's own spread."),
        length_scale: float | None = typer.Option(None, help="Scale trace lengths by this (default: fit context)."),
        burst: int = typer.Option(32, help="Requests in each capacity ramp."),
        host_contention: bool = typer.Option(True, help="Model the workers sharing this host's CPU cores, with the "
                                             "background CPU measured during each run."),
        host_speed: bool = typer.Option(False, help="Measure each CPU's speed during the runs with a sensor "
                                        "process per core (calibrate.host_speed) and simulate "
                                        "each instance at its core's speed relative to the calibration's "
                                        "(built-in backend; experimental: its sensors also read the run's own "
                                        "load, see README)."),
        calibration: str = typer.Option("serving", help="Without --profile: 'grid' times each shape in one "
                                        "process; 'serving' also fits the engine's own steps while it serves a "
                                        "calibration workload (calibrate.serving)."),
        serving_s: float = typer.Option(45.0, "--serving-s", help="Length of the serving calibration's load."),
        sim_seeds: int = typer.Option(10, "--sim-seeds", help="Simulations of each run (seeds); the prediction is "
                                      "each statistic's mean over them, their spread is reported."),
        max_error: float = typer.Option(0.10, help="Exit 1 when a p50 TTFT / p50 TPOT / throughput error exceeds it."),
        seed: int = typer.Option(0),
        out: Path = typer.Option(Path("out/validate"), "--out", "-o"),
        backend: str = typer.Option("builtin", help="builtin (disagg's engine) or vllm (vLLM servers, NIXL P/D; "
                                    "also measures built-in vs vLLM throughput)."),
    ) -> None:
        """Calibrate, measure capacity, run the engine at each load, simulate the same requests, report the error."""
        from rich.console import Console

        from calibrate import CalibrationError
        from calibrate.host_speed import SensorError
        from disagg_cli.main import fail
        from engine.cluster import ClusterError
        from validate.report import mean_table, table, write
        from validate.runner import ValidateError, validate

        console = Console(width=170)
        try:
            loads_f = tuple(float(x) for x in loads.split(",") if x.strip())
        except ValueError:
            fail(f"--loads {loads!r}: expected comma-separated numbers like 0.3,0.6,0.9")
        if backend == "vllm":  # vLLM backend hook: validate/vllm_runner.py
            unused = [flag for flag, used in (("--host-speed", host_speed), ("--calibration", calibration != "serving"),
                                              ("--serving-s", serving_s != 45.0), ("--repeat", repeat != 1),
                                              ("--sim-seeds", sim_seeds != 10)) if used]
            if unused:
                fail(f"{', '.join(unused)}: only with the built-in backend (--backend vllm calibrates from vLLM's "
                     "own iteration stats and runs each point once)")
            _validate_vllm(console, model, topologies, loads_f, workload, num_requests, profile, budget_s, burst,
                           length_scale, max_error, seed, out, host_contention)
            return
        if backend != "builtin":
            fail(f"--backend must be builtin or vllm, got {backend!r}")
        try:
            with console.status("validating") as status:
                report = validate(model=model, topologies=tuple(t for t in topologies.split(",") if t.strip()),
                                  loads=loads_f, workload=workload, num_requests=num_requests, profile=profile,
                                  calibrate_budget_s=budget_s, repeat=repeat, seed=seed, length_scale=length_scale,
                                  burst=burst, host_contention=host_contention, host_speed=host_speed,
                                  calibration=calibration, serving_s=serving_s, sim_seeds=sim_seeds,
                                  progress=lambda msg: status.update(f"validate: {msg}"))
        except (ValidateError, CalibrationError, ClusterError, SensorError, FileNotFoundError, ValueError) as e:
            fail(str(e))
        s = write(report, out, max_error=max_error)
        console.print(table(report))
        console.print(mean_table(report))
        console.print(f"capacity (req/s): {', '.join(f'{k} {v:.2f}' for k, v in report.capacity_rps.items())}")
        for key, sp in s["real_spread"].items():
            console.print(f"real run-to-run spread {key}: " + ", ".join(f"{k} {v:.1%}" for k, v in sp.items()))
        for key, sp in s["sim_spread"].items():
            console.print(f"simulator's spread over {sim_seeds} seeds (sd / mean) {key}: "
                          + ", ".join(f"{k} {v:.1%}" for k, v in sp.items()))
        console.print(f"wrote {out}/summary.json, joined.parquet and {len(s['plots'])} plots; worst error "
                      f"{s['worst_error']:.1%} (limit {max_error:.0%})")
        if not s["passed"]:
            raise typer.Exit(1)


def _validate_vllm(console, model, topologies, loads: tuple[float, ...], workload, num_requests, profile, budget_s, burst, length_scale,
                   max_error, seed, out: Path, host_contention: bool = True) -> None:
    import json

    from disagg_cli.main import fail
    from engine.cluster import ClusterError
    from validate.report import mean_table, table, write
    from validate.runner import ValidateError
    from validate.vllm_runner import validate_vllm

    try:
        with console.status("validating vLLM") as status:
            report, thr = validate_vllm(model, tuple(t for t in topologies.split(",") if t.strip()), loads, workload,
                                        num_requests, profile, budget_s, seed, burst, length_scale,
                                        progress=lambda msg: status.update(f"validate vllm: {msg}"),
                                        log_dir=out / "logs", host_contention=host_contention)
    except (ValidateError, ClusterError, FileNotFoundError, ValueError, RuntimeError) as e:
        fail(str(e))
    s = write(report, out, max_error=max_error)
    (out / "throughput.json").write_text(json.dumps(thr, indent=2, default=float) + "\n")
    console.print(table(report))
    console.print(mean_table(report))
    console.print(f"capacity (req/s): {', '.join(f'{k} {v:.2f}' for k, v in report.capacity_rps.items())}")
    if "ratio_builtin_over_vllm" in thr:
        console.print(f"output tokens/s on {thr['workload']}: built-in {thr['builtin']['output_tokens_per_s']:.1f}, "
                      f"vLLM {thr['vllm']['output_tokens_per_s']:.1f}, ratio built-in/vLLM "
                      f"{thr['ratio_builtin_over_vllm']:.2f}")
    console.print(f"wrote {out}/summary.json, throughput.json; worst error {s['worst_error']:.1%} "
                  f"(limit {max_error:.0%})")
    if not s["passed"]:
        raise typer.Exit(1)
