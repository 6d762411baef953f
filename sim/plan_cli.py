"""``disagg plan``: the capacity planner on the command line (see `sim.plan`)."""

from __future__ import annotations

import math
from pathlib import Path

import typer


def _floats(text: str, what: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{what}: expected NAME=NUMBER pairs separated by commas, got {part!r}") from None
    return out


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected integers separated by commas, got {text!r}") from None


def register(app: typer.Typer) -> None:
    """Add ``plan`` to the disagg command line."""

    @app.command()
    def plan(
        model: str = typer.Option("llama-3.1-8b", help="Model preset or a Hugging Face config.json path."),
        hardware: str = typer.Option("h100-sxm", help="Device preset(s), comma-separated (several = heterogeneous "
                                     "prefill/decode pairs too)."),
        profile: list[Path] = typer.Option([], "--profile", "-p", help="Calibrated/imported cost profile JSON "
                                           "(repeatable); used for its device at its TP instead of the roofline."),
        workload: str = typer.Option("azure-conv", help="Bundled trace (azure-conv, azure-code, mooncake-conv) or a "
                                     "trace file (CSV/JSONL)."),
        ttft_ms: float = typer.Option(500.0, help="TTFT target (ms)."),
        tpot_ms: float = typer.Option(30.0, help="TPOT target (ms)."),
        percentile: float = typer.Option(90.0, help="Percentile the targets are reported at."),
        attainment: float = typer.Option(0.9, help="Fraction of requests that must meet both targets."),
        gpus: int = typer.Option(16, help="GPU budget (all roles together)."),
        target_rps: float | None = typer.Option(None, help="Required request rate: rank by cost among the "
                                                "topologies that reach it."),
        prices: str = typer.Option("", help="USD per GPU-hour, e.g. h100-sxm=2.5,h200-sxm=3.5."),
        links: str = typer.Option("nvlink4", help="KV links to try for disaggregated topologies, comma-separated."),
        tps: str = typer.Option("", help="Tensor-parallel degrees, e.g. 1,2,4 (default: from the model's size)."),
        batch_sizes: str = typer.Option("256", help="Max decode batch sizes to try, comma-separated."),
        rank_by: str = typer.Option("goodput_per_gpu", help="goodput_per_gpu or cost."),
        top: int = typer.Option(10, help="Rows of the ranked table to print."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Write plan.parquet, curves.parquet, plan.json."),
        cache_dir: Path | None = typer.Option(None, help="Simulation cache (default ~/.cache/disagg/plan)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the simulation cache."),
        workers: int | None = typer.Option(None, help="Worker processes (default: CPUs)."),
        ray: str | None = typer.Option(None, "--ray", metavar="ADDRESS", help="Run the simulations as Ray tasks on "
                                       "this cluster: auto (the one `ray start` joined here), local (a private "
                                       "one-machine Ray) or HOST:PORT. Same result as a local run."),
        seed: int = typer.Option(0),
    ) -> None:
        """Find the topology with the best goodput per GPU (or lowest cost) within an SLO and a GPU budget."""
        from rich.progress import Progress
        from rich.table import Table

        from disagg_cli.main import console, fail
        from sim.cost_profile import CostProfile
        from sim.metrics import SLO
        from sim.plan import plan as run_plan
        from sim.ray_jobs import RayConnectError, RayUnavailable

        try:
            slo = SLO(ttft_ms / 1e3, tpot_ms / 1e3, percentile, attainment)
            profiles = [CostProfile.load(p) for p in profile]
            kw = dict(model=model, hardware=[h.strip() for h in hardware.split(",") if h.strip()] or None,
                      workload=workload, slo=slo, gpu_budget=gpus, profiles=profiles or None,
                      prices=_floats(prices, "--prices"), target_rate_rps=target_rps,
                      links=[x.strip() for x in links.split(",") if x.strip()], tps=_ints(tps, "--tps") or None,
                      max_batch_sizes=_ints(batch_sizes, "--batch-sizes"), rank_by=rank_by, workers=workers,
                      cache_dir=False if no_cache else (cache_dir or True), seed=seed, ray_address=ray)
            if profiles and hardware == "h100-sxm":
                kw["hardware"] = None  # the profiles name their devices
            with Progress(console=console, transient=True) as bar:
                task = bar.add_task("planning", total=None)

                def progress(done: int, total: int, what: str) -> None:
                    bar.update(task, completed=done, total=total, description=what)

                res = run_plan(**kw, progress=progress)  # type: ignore[arg-type]
        except (ValueError, FileNotFoundError, RayUnavailable, RayConnectError) as e:
            fail(str(e))
        rec, st = res.recommendation, res.stats
        console.print(f"[bold]disagg plan[/] — {res.settings['model']} on {', '.join(res.settings['hardware'])}, "
                      f"{res.settings['workload']}, SLO TTFT {ttft_ms:g} ms / TPOT {tpot_ms:g} ms at "
                      f"p{percentile:g}, {attainment:.0%} attainment, <= {gpus} GPUs")
        console.print(f"[bold green]Recommendation:[/] {rec['name'] or 'none'}\n{rec['reason']}")
        t = Table(title=f"top {min(top, res.table.num_rows)} of {res.table.num_rows} topologies")
        for col in ("#", "topology", "GPUs", "req/s", "req/s/GPU", "$/Mtok", "TTFT p90", "TPOT p90", "how"):
            t.add_column(col, justify="left" if col in ("topology", "how") else "right", no_wrap=col == "topology")

        def ms(x: float | None) -> str:
            return "-" if x is None or not math.isfinite(x) else f"{x * 1e3:.0f}ms"

        for r in res.top(top):
            flags = ("P" if r["pareto_latency"] else "") + ("$" if r["pareto_cost"] else "")
            cost = r["cost_per_m_output_tokens"]
            t.add_row(str(r["rank"]), r["name"], str(r["gpus"]), f"{r['goodput_rps']:.1f}",
                      f"{r['goodput_rps_per_gpu']:.2f}", f"{cost:.3f}" if math.isfinite(cost) else "-",
                      ms(r["ttft_p90_s"]), ms(r["tpot_p90_s"]), f"{r['method'][:4]} {flags}".strip())
        console.print(t)
        console.print(f"Latencies at {'the target rate' if target_rps else 'each topology’s goodput'}. how: simu = "
                      "whole cluster simulated (bisection), comp = composed from one-instance ladders; P / $ = on the "
                      "latency / cost Pareto frontier.")
        console.print(f"{st['topologies']} topologies, {st['instance_ladders']} instance ladders, {st['verified']} "
                      f"verified; {st['simulations']} simulations ({st['simulated_requests']:,} requests), "
                      f"{st['cache_hits']} cache hits, "
                      f"{'Ray tasks at ' + ray if ray else str(st['workers']) + ' workers'}, {st['wall_s']:.1f} s")
        if out is not None:
            console.print(f"wrote {res.write(out)}/plan.parquet, curves.parquet, plan.json")
