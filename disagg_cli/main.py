"""The ``disagg`` command line. Each part registers its commands here; heavy imports happen inside the commands."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="disagg: should you disaggregate prefill and decode? calibrate, simulate, serve, validate.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()


def fail(msg: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback, no line wrapping inside paths) and exit with ``code``."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def simulate(
    configs: list[Path] = typer.Argument(..., help="One or more YAML configs (see sim/configs/)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write records.parquet, timeseries.parquet, summary.json here "
                                    "(one subfolder per config when several are given)."),
    seed: int | None = typer.Option(None, help="Override the configs' seed."),
) -> None:
    """Simulate one or more configs and print their summaries side by side."""
    from sim.config import ConfigError, load_config
    from sim.report import comparison_table, write_result
    from sim.simulator import simulate as run_sim

    results = []
    for path in configs:
        try:
            cfg = load_config(path)
            with console.status(f"simulating {path.name}: {len(cfg.workload)} requests on {cfg.topology.label}"):
                res = run_sim(cfg.topology, cfg.workload, cfg.profiles, model=cfg.model, slo=cfg.slo,
                              seed=cfg.seed if seed is None else seed)
        except ConfigError as e:
            fail(str(e))
        except ValueError as e:
            fail(f"{path}: {e}")
        if out is not None:
            d = write_result(res, out if len(configs) == 1 else out / path.stem)
            console.print(f"wrote {d}/records.parquet, summary.json ({res.wall_s:.2f} s, "
                          f"{len(cfg.workload) / max(res.wall_s, 1e-9):,.0f} simulated req/s)")
        results.append((path.stem, res.summary))
    console.print(comparison_table(results, title=f"disagg simulate — {results[0][1]['workload']}"))


def _register() -> None:
    """Attach the other parts' command groups (each module defers its heavy imports)."""
    import importlib

    for module, attr, name in [("calibrate.cli", "app", "calibrate"), ("engine.cli", "register", None),
                               ("validate.cli", "register", None), ("sim.plan_cli", "register", None),
                               ("dashboard.cli", "register", None)]:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # that part is not built (or not installed) yet
            raise
        obj = getattr(mod, attr)
        if name:
            app.add_typer(obj, name=name)
        else:
            obj(app)


_register()

if __name__ == "__main__":
    app()
