"""Engine benchmark: KV path bytes/s vs the same run's memcpy bandwidth, and 2C vs 1P1D throughput and latency
percentiles at a few request rates on the tiny model. Prints tables; ``--out FILE`` also writes every raw figure.

    python bench/engine_bench.py [--rates 2,4,8] [--requests 40] [--out out/bench/engine.json]

KV path figures (medians over raw samples, all in this run):
- ``transport``: `engine.transport.bench.measure` one-way transfers to a receiver process (body written into the
  link, receiver notified), shm and tcp, against an in-process memcpy of the same size: "hot" (the same two warm
  buffers every time: L2-resident below ~1 MiB) and "streaming" (rotating over 256 MiB, i.e. from memory).
- ``engine link``: per request in the 1P1D runs, KV bytes / (body fully at the decode worker - prefill worker began
  gathering it into the link's buffer); the gather out of the paged cache is the only copy on this path.
- ``engine handoff``: KV bytes / (kv_transfer_end_s - kv_transfer_start_s): adds the pull round trip and the
  scatter into the decode worker's paged cache (a second copy), so it is at most about half of memcpy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from engine.cluster import Cluster
from engine.loadgen import run_load
from engine.transport.bench import measure, memcpy_bandwidth
from sim.metrics import summarize
from sim.request import Workload
from sim.topology import Topology

console = Console(width=150)
MIB = 1 << 20
STREAM_BYTES = 256 * MIB  # working set of the streaming memcpy figure (beyond every cache level but L3's 300 MiB)


def kv_path(repeats: int) -> list[dict]:
    sizes = [256 << 10, MIB, 4 * MIB, 16 * MIB]
    rows = []
    for kind in ("shm", "tcp"):
        samples = measure(kind, sizes, repeats)
        for n in sizes:
            bw = float(np.median([s["bytes_per_s"] for s in samples if s["nbytes"] == n]))
            copy = memcpy_bandwidth(n, repeats)
            stream = memcpy_bandwidth(n, repeats, working_set_bytes=STREAM_BYTES)
            secs = [s["seconds"] for s in samples if s["nbytes"] == n]
            rows.append({"kind": kind, "nbytes": n, "bytes_per_s": bw, "memcpy_bytes_per_s": copy,
                         "memcpy_stream_bytes_per_s": stream, "fraction_of_memcpy": bw / copy,
                         "fraction_of_stream": bw / stream, "p10_s": float(np.percentile(secs, 10)),
                         "p90_s": float(np.percentile(secs, 90)), "samples_s": secs})
    return rows


def workload(n: int, rate: float, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = np.concatenate([[0.0], np.cumsum(rng.exponential(1 / rate, n - 1))])
    return Workload.from_lists(arrivals, rng.integers(32, 1024, n), rng.integers(16, 64, n), name=f"poisson{rate:g}")


def engine_runs(rates: list[float], n: int, transport: str) -> tuple[list[dict], list[dict]]:
    results, links = [], []
    for topo in (Topology.colocated(2), Topology.disaggregated(1, 1)):
        with Cluster("tiny", topo, transport=transport) as c:
            run_load(c.url, workload(4, 4.0, 99))  # warm-up, not reported
            for rate in rates:
                t0 = time.monotonic()
                table = run_load(c.url, workload(n, rate, 0))
                s = summarize(table)
                results.append({"topology": topo.label, "rate_rps": rate, "wall_s": time.monotonic() - t0,
                                **{k: s[k] for k in ("completed", "rejected", "throughput_rps", "output_tokens_per_s",
                                                     "ttft", "tpot", "e2e", "transfer")}})
                time.sleep(0.5)
            if topo.kind == "disaggregated":
                for r in httpx.get(f"{c.url}/v1/records", timeout=30).json()["records"]:
                    if r.get("kv_recv_s") and r["kv_bytes"]:
                        links.append({"nbytes": r["kv_bytes"],
                                      "link_s": r["kv_recv_s"] - r["kv_export_start_s"],
                                      "handoff_s": r["kv_transfer_end_s"] - r["kv_transfer_start_s"]})
    return results, links


def _ms(d: dict) -> str:
    return " / ".join(f"{d[k] * 1e3:.1f}" for k in ("p50", "p90", "p99"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="2,4,8", help="request rates (req/s), comma-separated")
    ap.add_argument("--requests", type=int, default=40, help="requests per rate")
    ap.add_argument("--repeats", type=int, default=20, help="transport samples per size")
    ap.add_argument("--transport", default="shm", help="KV transport of the 1P1D runs")
    ap.add_argument("--out", type=Path, default=None, help="write all figures (JSON) here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rates = [float(x) for x in args.rates.split(",")]

    kv = kv_path(args.repeats)
    t = Table(title="KV transport: one-way bytes/s vs same-run memcpy (medians)")
    for col in ("kind", "size", "transfer GB/s", "hot memcpy GB/s", "of hot", "streaming memcpy GB/s", "of streaming",
                "p10-p90 us"):
        t.add_column(col, justify="right")
    for r in kv:
        t.add_row(r["kind"], f"{r['nbytes'] / MIB:g} MiB", f"{r['bytes_per_s'] / 1e9:.2f}",
                  f"{r['memcpy_bytes_per_s'] / 1e9:.2f}", f"{r['fraction_of_memcpy']:.0%}",
                  f"{r['memcpy_stream_bytes_per_s'] / 1e9:.2f}", f"{r['fraction_of_stream']:.0%}",
                  f"{r['p10_s'] * 1e6:.0f}-{r['p90_s'] * 1e6:.0f}")
    console.print(t)

    results, links = engine_runs(rates, args.requests, args.transport)
    t = Table(title=f"engine, tiny model, {args.requests} Poisson requests per rate (prompt 32-1023, output 16-63)")
    for col in ("topology", "rate (req/s)", "done", "req/s", "out tok/s", "TTFT p50/p90/p99 ms",
                "TPOT p50/p90/p99 ms", "KV transfer p50 ms"):
        t.add_column(col, justify="right")
    for r in results:
        tr = r["transfer"]["p50"]
        t.add_row(r["topology"], f"{r['rate_rps']:g}", f"{r['completed']}", f"{r['throughput_rps']:.2f}",
                  f"{r['output_tokens_per_s']:.0f}", _ms(r["ttft"]), _ms(r["tpot"]),
                  "-" if math.isnan(tr) else f"{tr * 1e3:.2f}")
    console.print(t)

    big = [x for x in links if x["nbytes"] >= MIB]
    copy = memcpy_bandwidth(int(np.median([x["nbytes"] for x in big])) if big else MIB)
    if big:
        link = float(np.median([x["nbytes"] / x["link_s"] for x in big]))
        hand = float(np.median([x["nbytes"] / x["handoff_s"] for x in big]))
        console.print(f"engine KV path ({args.transport}), {len(big)} transfers >= 1 MiB: link {link / 1e9:.2f} GB/s "
                      f"({link / copy:.0%} of memcpy {copy / 1e9:.2f} GB/s), whole handoff {hand / 1e9:.2f} GB/s "
                      f"({hand / copy:.0%}; includes pull round trip and scatter into the paged cache)")
    if args.out:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": datetime.datetime.now().isoformat(), "git": rev,
                                        "machine": platform.processor() or platform.machine(), "kv_transport": kv,
                                        "engine": results, "engine_kv_transfers": links,
                                        "memcpy_bytes_per_s": copy}, indent=1, default=float))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
