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
        max_error: float = typer.Option(0.10, help="Exit 1 when a p50 TTFT / p50 TPOT / throughput error exceeds it."),
        seed: int = typer.Option(0),
        out: Path = typer.Option(Path("out/validate"), "--out", "-o"),
    ) -> None:
        """Calibrate, measure capacity, run the engine at each load, simulate the same requests, report the error."""
        from rich.console import Console

        from disagg_cli.main import fail
        from validate.report import table, write
        from validate.runner import ValidateError, validate

        console = Console(width=170)
        try:
            loads_f = tuple(float(x) for x in loads.split(",") if x.strip())
        except ValueError:
            fail(f"--loads {loads!r}: expected comma-separated numbers like 0.3,0.6,0.9")
        try:
            with console.status("validating") as status:
                report = validate(model=model, topologies=tuple(t for t in topologies.split(",") if t.strip()),
                                  loads=loads_f, workload=workload, num_requests=num_requests, profile=profile,
                                  calibrate_budget_s=budget_s, repeat=repeat, seed=seed, length_scale=length_scale,
                                  burst=burst, progress=lambda msg: status.update(f"validate: {msg}"))
        except (ValidateError, FileNotFoundError, ValueError) as e:
            fail(str(e))
        s = write(report, out, max_error=max_error)
        console.print(table(report))
        console.print(f"capacity (req/s): {', '.join(f'{k} {v:.2f}' for k, v in report.capacity_rps.items())}")
        for key, sp in s["real_spread"].items():
            console.print(f"real run-to-run spread {key}: " + ", ".join(f"{k} {v:.1%}" for k, v in sp.items()))
        console.print(f"wrote {out}/summary.json, joined.parquet and {len(s['plots'])} plots; worst error "
                      f"{s['worst_error']:.1%} (limit {max_error:.0%})")
        if not s["passed"]:
            raise typer.Exit(1)
