"""Planner timing: the 16-GPU default search (Llama-3.1-8B, H100 roofline, Azure conv trace, TTFT 500 ms / TPOT 30 ms
at p90, 90 % attainment) with a cold cache, again warm, and warm with a changed SLO. Prints one line per run."""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.metrics import SLO  # noqa: E402
from sim.plan import DEFAULT_SLO, plan  # noqa: E402


def run(label: str, cache: str, slo: SLO) -> None:
    t = time.perf_counter()
    res = plan(gpu_budget=16, slo=slo, cache_dir=cache)
    s = res.stats
    print(f"{label:<22} {time.perf_counter() - t:6.1f} s  {s['topologies']} topologies, {s['instance_ladders']} "
          f"ladders, {s['verified']} verified, {s['simulations']} simulations ({s['simulated_requests']:,} requests), "
          f"{s['cache_hits']} cache hits, {s['workers']} workers -> {res.recommendation['name']}")


if __name__ == "__main__":
    print(f"planner, 16 GPUs, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as d:
        run("cold cache", d, DEFAULT_SLO)
        run("warm cache", d, DEFAULT_SLO)
        run("warm, TTFT 400 ms", d, SLO(0.4, 0.03, 90, 0.9))
