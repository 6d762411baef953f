"""``disagg serve`` and ``disagg loadgen`` (registered by `disagg_cli.main`; heavy imports stay inside the commands)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

LABEL = re.compile(r"^(?:(\d+)P(\d+)D|(\d+)C)$", re.IGNORECASE)


def parse_topology(text: str, router: str | None = None, **pool: object):
    """``"1P1D"`` / ``"2C"``, or a YAML file holding the simulator's ``topology:`` section (or just that section).
    ``pool`` overrides (None = keep) apply to every pool. Raises ValueError naming the file and key."""
    from sim.topology import Topology

    pool = {k: v for k, v in pool.items() if v is not None}
    m = LABEL.match(text.strip())
    if m:
        kw = {"router": router or "round_robin", **pool}
        if m.group(3):
            return Topology.colocated(int(m.group(3)), **kw)
        return Topology.disaggregated(int(m.group(1)), int(m.group(2)), **kw)
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"--topology {text!r}: expected a label like 1P1D or 2C, or a YAML file")
    import yaml
    from pydantic import ValidationError

    from sim.config import TopologyCfg

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    section = raw.get("topology", raw) if isinstance(raw, dict) else raw
    try:
        topo = TopologyCfg.model_validate(section).build()
    except ValidationError as e:
        msgs = "; ".join(f"topology.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path}: {msgs}") from None
    for role in [p.role for p in topo.pools]:
        topo = topo.with_pool(role, **pool)
    if router:
        from dataclasses import replace
        topo = replace(topo, router=router)
    return topo


def parse_role_resources(text: str) -> dict[str, str]:
    """``"prefill=gpu_p,decode=gpu_d"`` -> {"prefill": "gpu_p", "decode": "gpu_d"}. Raises ValueError naming the
    bad part."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, sep, name = part.partition("=")
        if not sep or role.strip() not in ("prefill", "decode", "colocated") or not name.strip():
            raise ValueError(f"--ray-resources: {part!r} is not ROLE=RESOURCE with ROLE prefill, decode or colocated")
        out[role.strip()] = name.strip()
    return out


def supervise(cluster, stop: dict, console, workers_fatal: bool = False) -> None:  # noqa: ANN001
    """Keep a started cluster up until Ctrl-C, SIGTERM (``stop["now"]``) or its router exits — or, with
    ``workers_fatal``, any of its processes (the built-in router retries around dead workers; vLLM's does not).
    Always stops the cluster."""
    import time

    reported: set[str] = set()
    try:
        while not stop["now"]:
            dead = cluster.dead()
            if "router" in dead:
                console.print(f"[red]router {dead['router']}[/]:\n{cluster.log_tail('router')}")
                break
            for name in sorted(set(dead) - reported):
                console.print(f"[red]{name} {dead[name]}[/]:\n{cluster.log_tail(name)}")
                reported.add(name)
            if dead and workers_fatal:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        console.print("stopped")


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: str = typer.Option("tiny", help="Preset name (tiny) or a Hugging Face Llama folder."),
        topology: str = typer.Option("1P1D", help="1P1D, 2C, ... or a YAML file with the simulator's topology section."),
        transport: str = typer.Option("shm", help="KV transport between prefill and decode workers: shm, tcp, cuda."),
        host: str = typer.Option("127.0.0.1", help="Address everything binds."),
        port: int = typer.Option(8000, help="Router port (0 = any free port)."),
        router: str | None = typer.Option(None, help="Router policy (round_robin, least_outstanding, least_kv_load, ...)."),
        kv_tokens: int | None = typer.Option(None, help="KV capacity per instance, tokens (default 32768)."),
        max_batch_size: int | None = typer.Option(None, help="Sequences per iteration."),
        max_batch_tokens: int | None = typer.Option(None, help="Prompt tokens per prefill batch."),
        chunked_prefill: bool | None = typer.Option(None, "--chunked-prefill/--no-chunked-prefill", help="Colocated: chunked prefill."),
        dtype: str = typer.Option("bf16", help="bf16, fp32 or fp16."),
        device: str = typer.Option("cpu", help="Torch device of the workers (cpu, cuda)."),
        threads: int = typer.Option(1, help="Torch threads per worker process."),
        max_outstanding: int = typer.Option(1024, help="Requests in flight before the router answers 429."),
        records: Path | None = typer.Option(None, help="Write the server-side records (Parquet) here on exit."),
        log_dir: Path | None = typer.Option(None, help="Keep the processes' logs here."),
        verify_kv: bool = typer.Option(False, help="SHA-256 every KV transfer on both sides."),
        warm_tokens: int = typer.Option(2048, min=0, help="CPU: warm each worker's GEMM shapes up to this many "
                                        "tokens at start (first-time oneDNN kernels cost ~1.4x); 0 = no warm-up."),
        backend: str = typer.Option("builtin", help="builtin (disagg's engine) or vllm (vLLM servers from "
                                    ".venv-vllm; NIXL for P/D)."),
        vllm_kv_gib: int = typer.Option(1, help="vllm backend: KV cache per instance, GiB (VLLM_CPU_KVCACHE_SPACE)."),
        vllm_eager: bool = typer.Option(True, "--vllm-eager/--vllm-compile", help="vllm backend: enforce_eager."),
        ray: str | None = typer.Option(None, "--ray", metavar="ADDRESS", help="Run the workers as Ray actors on this "
                                       "cluster: auto (the one `ray start` joined here), local, or HOST:PORT. The "
                                       "router stays on this machine; KV moves over tcp."),
        ray_resources: str = typer.Option("", help="With --ray: custom resource each role's actors ask one unit of, "
                                          "e.g. prefill=prefill,decode=decode (start nodes with ray start "
                                          "--resources '{\"prefill\": 4}')."),
        worker_host: str | None = typer.Option(None, help="With --ray: address workers bind (default: the node's IP "
                                               "as Ray sees it)."),
    ) -> None:
        """Start a router and its prefill/decode (or colocated) workers; Ctrl-C stops everything."""
        import signal

        from disagg_cli.main import console, fail
        from engine.cluster import Cluster, ClusterError
        from sim.ray_jobs import RayUnavailable

        if ray is None and (ray_resources or worker_host):
            fail("--ray-resources and --worker-host only apply with --ray ADDRESS")
        # Ctrl-C stops everything, also when started as a background job (which inherits SIGINT ignored, and Python
        # then installs no KeyboardInterrupt handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if backend == "vllm":  # vLLM backend hook: engine/vllm_backend/serve.py
            from engine.vllm_backend.serve import serve_vllm
            try:
                topo = parse_topology(topology, router, kv_capacity_tokens=kv_tokens, max_batch_size=max_batch_size,
                                      max_batch_tokens=max_batch_tokens)
            except ValueError as e:
                fail(str(e))
            try:
                role_res = parse_role_resources(ray_resources)
            except ValueError as e:
                fail(str(e))
            serve_vllm(model, topo, host, port, records, log_dir, threads, vllm_kv_gib, vllm_eager, ray, role_res,
                       worker_host)
            return
        if backend != "builtin":
            fail(f"--backend must be builtin or vllm, got {backend!r}")

        if transport not in ("shm", "tcp", "cuda"):
            fail(f"--transport must be shm, tcp or cuda, got {transport!r}")
        try:
            topo = parse_topology(topology, router, kv_capacity_tokens=kv_tokens, max_batch_size=max_batch_size,
                                  max_batch_tokens=max_batch_tokens, chunked_prefill=chunked_prefill)
        except ValueError as e:
            fail(str(e))
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        kw = dict(transport=transport, dtype=dtype, device=device, threads=threads, host=host, port=port,
                  max_outstanding=max_outstanding, records_path=records, log_dir=log_dir, verify_kv=verify_kv,
                  warm_gemm_tokens=warm_tokens)
        try:
            if ray is not None:
                from engine.ray_cluster import RayCluster

                if transport == "shm":
                    transport = kw["transport"] = "tcp"  # shm only within one machine; Ray may place roles apart
                cluster = RayCluster(model, topo, address=ray, role_resources=parse_role_resources(ray_resources),
                                     worker_host=worker_host, **kw)
            else:
                cluster = Cluster(model, topo, **kw)
        except ValueError as e:
            fail(str(e))
        try:
            with console.status(f"starting {topo.label} ({len(cluster.topology.pools)} pools"
                                f"{' as Ray actors' if ray is not None else ''}) ..."):
                url = cluster.start()
        except (ClusterError, FileNotFoundError, ValueError, OSError, RayUnavailable) as e:
            fail(str(e))
        where = ""
        if ray is not None:
            nodes = {p["node_id"] for p in cluster.placement.values()}  # type: ignore[attr-defined]
            where = f" on {len(nodes)} Ray node(s): " + ", ".join(
                f"{n}@{p['node_ip']}/{p['node_id'][:8]}" for n, p in cluster.placement.items())  # type: ignore[attr-defined]
        console.print(f"serving {model} as {topo.label} at [bold]{url}/v1[/] (transport {transport}){where}; "
                      "Ctrl-C stops", soft_wrap=True)
        supervise(cluster, stop, console)

    @app.command()
    def loadgen(
        url: str = typer.Option(..., help="Router base URL, e.g. http://127.0.0.1:8000"),
        trace: str = typer.Option("azure-conv", help="Bundled trace name or a trace file."),
        num_requests: int = typer.Option(100, min=1, help="First N requests of the trace."),
        rate_scale: float = typer.Option(1.0, help="Replay arrivals this many times faster."),
        poisson_rps: float | None = typer.Option(None, help="Replace the trace's arrivals by Poisson at this rate."),
        max_total_tokens: int | None = typer.Option(None, help="Clip prompt + output (default: the model's context)."),
        max_output_tokens: int | None = typer.Option(None, help="Clip output lengths."),
        out: Path = typer.Option(..., help="Write records.parquet and summary.json here."),
        seed: int = typer.Option(0, help="Seed for prompts and Poisson arrivals."),
        timeout_s: float = typer.Option(600.0, help="Per-request timeout, seconds."),
        ttft_ms: float = typer.Option(2000.0, help="SLO: TTFT target, ms."),
        tpot_ms: float = typer.Option(100.0, help="SLO: TPOT target, ms."),
    ) -> None:
        """Open-loop replay of a workload against a running router; prints a summary, writes records."""
        import json

        import httpx
        import numpy as np
        import pyarrow.parquet as pq
        from rich.progress import Progress

        from disagg_cli.main import console, fail
        from engine.loadgen import run_load
        from sim.metrics import SLO, summarize
        from sim.report import comparison_table
        from sim.request import RequestSpec, Workload
        from sim.traces import load_trace

        try:
            models = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=10).json()["data"][0]
        except (httpx.HTTPError, httpx.InvalidURL, KeyError, IndexError, ValueError) as e:
            fail(f"cannot reach the router at {url}: {e}")
        try:
            w = load_trace(trace).head(num_requests)
            if poisson_rps is not None:
                if poisson_rps <= 0:
                    raise ValueError("--poisson-rps must be > 0")
                gaps = np.random.default_rng(seed).exponential(1 / poisson_rps, len(w))
                arr = np.concatenate([[0.0], np.cumsum(gaps[1:])])
                w = Workload(tuple(RequestSpec(r.id, float(a), r.prompt_tokens, r.output_tokens)
                                   for r, a in zip(w.requests, arr)), f"{w.name}-poisson{poisson_rps:g}")
            elif rate_scale != 1.0:
                w = w.scale_rate(rate_scale)
            w = w.clip_lengths(None, max_output_tokens, max_total_tokens or models.get("max_model_len", 2048) - 1)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{len(w)} requests over {w.duration_s:.1f} s", total=len(w))
            table = run_load(url, w, model=models["id"], seed=seed, timeout_s=timeout_s,
                             on_done=lambda i, n: bar.update(task, completed=i))
        summary = summarize(table, SLO(ttft_ms / 1e3, tpot_ms / 1e3))
        summary.update(workload=w.name, topology=url)
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "records.parquet")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        console.print(comparison_table([("engine", summary)], title=f"disagg loadgen — {w.name}"))
        console.print(f"wrote {out}/records.parquet and summary.json")
