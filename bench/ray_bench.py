"""Ray overhead and planner speed-up, measured in one run (ratios only are meaningful on this shared box).

1. Serving: the tiny model as 1P1D with local worker processes (`engine.cluster.Cluster`, shm KV; and tcp KV, which
   the Ray path uses) and as Ray actors (`engine.ray_cluster.RayCluster` on a private one-machine Ray, tcp KV):
   startup seconds, then per-request latency (TTFT and end-to-end, medians) of N rounds of one request to each,
   interleaved so that the comparison shares the machine's noise.
2. Planning: one `disagg plan` search with 1 local worker, with local worker processes (one per core), and as Ray
   tasks on a private one-machine Ray; wall seconds and the speed-up over 1 worker. The three results must match.
Run: python bench/ray_bench.py [--requests N]
"""

from __future__ import annotations

import statistics
import sys
import time


def _one(url: str) -> tuple[float, float]:
    """TTFT and end-to-end seconds of one streamed greedy request (64-token prompt, 16 tokens)."""
    import httpx

    body = {"model": "tiny", "prompt": list(range(3, 67)), "max_tokens": 16, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    assert first is not None, "no token came back"
    return first - t0, time.perf_counter() - t0


def serving(n: int) -> list[tuple[str, float, float, float]]:
    """Start the three set-ups one after another (startup timed), keep all up, then send requests round-robin
    over them (one at a time), so each round's three requests see the same machine noise."""
    from engine.cluster import Cluster
    from engine.ray_cluster import RayCluster
    from sim.ray_jobs import connect
    from sim.topology import Topology

    topo = Topology.disaggregated(1, 1, kv_capacity_tokens=8192)
    connect("local")  # started before timing: a Ray cluster outlives many launches
    setups = (("local processes, shm KV", lambda: Cluster("tiny", topo)),
              ("local processes, tcp KV", lambda: Cluster("tiny", topo, transport="tcp")),
              ("Ray actors, tcp KV", lambda: RayCluster("tiny", topo, address="local")))
    clusters, ups = [], []
    try:
        for _, make in setups:
            c = make()
            clusters.append(c)
            t0 = time.perf_counter()
            c.start()
            ups.append(time.perf_counter() - t0)
        samples: list[list[tuple[float, float]]] = [[] for _ in setups]
        for i in range(n + 3):  # 3 warm-up rounds
            for k, c in enumerate(clusters):
                x = _one(c.url)
                if i >= 3:
                    samples[k].append(x)
    finally:
        for c in clusters:
            c.stop()
    return [(label, up, statistics.median(t for t, _ in s), statistics.median(e for _, e in s))
            for (label, _), up, s in zip(setups, ups, samples, strict=True)]


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
    t = Table(title=f"1P1D tiny model: startup and per-request latency ({n} interleaved rounds, 64-token prompt, "
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
