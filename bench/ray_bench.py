"""Ray overhead and planner speed-up, measured in one run (ratios only are meaningful on this shared box).

1. Serving: the tiny model as 1P1D with local worker processes (`engine.cluster.Cluster`, shm KV; and tcp KV, which
   the Ray path uses) and as Ray actors (`engine.ray_cluster.RayCluster` on a private one-machine Ray, tcp KV):
   startup seconds, then per-request latency of N sequential greedy requests (TTFT and end-to-end, medians).
2. Planning: one `disagg plan` search with 1 local worker, with local worker processes (one per core), and as Ray
   tasks on a private one-machine Ray; wall seconds and the speed-up over 1 worker. The three results must match.
Run: python bench/ray_bench.py [--requests N]
"""

from __future__ import annotations

import statistics
import sys
import time


def _latencies(url: str, n: int) -> tuple[float, float]:
    import httpx

    ttft, e2e = [], []
    body = {"model": "tiny", "prompt": list(range(3, 67)), "max_tokens": 16, "temperature": 0, "stream": True,
            "ignore_eos": True}
    for _ in range(n):
        t0 = time.perf_counter()
        first = None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter()
        ttft.append(first - t0)  # type: ignore[operator]
        e2e.append(time.perf_counter() - t0)
    return statistics.median(ttft), statistics.median(e2e)


def serving(n: int) -> list[tuple[str, float, float, float]]:
    from engine.cluster import Cluster
    from engine.ray_cluster import RayCluster
    from sim.ray_jobs import connect
    from sim.topology import Topology

    topo = Topology.disaggregated(1, 1, kv_capacity_tokens=8192)
    connect("local")  # started before timing: a Ray cluster outlives many launches
    rows = []
    for label, make in (("local processes, shm KV", lambda: Cluster("tiny", topo)),
                        ("local processes, tcp KV", lambda: Cluster("tiny", topo, transport="tcp")),
                        ("Ray actors, tcp KV", lambda: RayCluster("tiny", topo, address="local"))):
        c = make()
        t0 = time.perf_counter()
        c.start()
        up = time.perf_counter() - t0
        try:
            _latencies(c.url, 3)  # warm
            ttft, e2e = _latencies(c.url, n)
        finally:
            c.stop()
        rows.append((label, up, ttft, e2e))
    return rows


def planning() -> list[tuple[str, float, int]]:
    from sim.plan import plan
    from sim.ray_jobs import connect

    connect("local")
    kw = dict(model="llama-3.1-8b", hardware="h100-sxm", workload="azure-conv", gpu_budget=8, cache_dir=None)
    rows, tables = [], []
    for label, extra in (("1 local worker", {"workers": 1}), ("local worker processes", {}),
                         ("Ray tasks (one machine)", {"ray_address": "local"})):
        t0 = time.perf_counter()
        res = plan(**kw, **extra)  # type: ignore[arg-type]
        rows.append((label, time.perf_counter() - t0, res.stats["simulations"]))
        tables.append(res.table.to_pandas())
    assert all(t.equals(tables[0]) for t in tables), "plans differ between local and Ray runs"
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    n = int(sys.argv[sys.argv.index("--requests") + 1]) if "--requests" in sys.argv else 20
    con = Console(width=140)
    t = Table(title=f"1P1D tiny model: startup and per-request latency ({n} sequential requests, 64-token prompt, "
                    "16 tokens)")
    for col in ("workers", "startup s", "TTFT p50 ms", "E2E p50 ms"):
        t.add_column(col, justify="right")
    for label, up, ttft, e2e in serving(n):
        t.add_row(label, f"{up:.2f}", f"{ttft * 1e3:.1f}", f"{e2e * 1e3:.1f}")
    con.print(t)
    p = Table(title="disagg plan, Llama-3.1-8B on H100 roofline, <= 8 GPUs, no cache (results identical)")
    for col in ("runs on", "wall s", "simulations", "speed-up vs 1 worker"):
        p.add_column(col, justify="right")
    rows = planning()
    for label, wall, sims in rows:
        p.add_row(label, f"{wall:.1f}", str(sims), f"{rows[0][1] / wall:.2f}x")
    con.print(p)


if __name__ == "__main__":
    main()
