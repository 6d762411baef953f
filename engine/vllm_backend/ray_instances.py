"""`VllmRayCluster`: vLLM instances placed on a Ray cluster by role, disagg's router local — `VllmCluster` on Ray.

vLLM runs from its own virtualenv (`engine.vllm_backend.cluster.vllm_python`), so each instance is a Ray actor
(`VllmInstanceActor`) that owns one vLLM OpenAI server process on its node: the actor picks the node's ports, binds
the node's IP (or ``worker_host``), starts the server in its own process group, watched by a reaper that kills the
whole group (EngineCore and its workers included) when the actor's process dies, and returns its URL once
``/health`` answers. Placement, discovery by name, death reports
and shutdown are `engine.ray_cluster.ActorGroup`'s, as for the built-in engine. Every node needs the repository
(same path) with ``.venv-vllm`` built (or ``DISAGG_VLLM_PYTHON`` set there); P/D KV moves over NIXL (UCX) between
the nodes' IPs. OpenMP threads are not bound to cores here (Ray does not say which cores an actor got).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from engine.cluster import ClusterError, _tail, reap_group_with, resolve_model
from engine.ray_cluster import ActorGroup, undo_ray_niceness
from engine.vllm_backend.cluster import VllmCluster, free_port, server_argv, vllm_python, wait_healthy
from engine.vllm_backend.model_folder import vllm_model_dir
from sim.ray_jobs import import_ray


class VllmInstanceActor:
    """One vLLM OpenAI server on this actor's node; the constructor returns once it serves (or raises with its log
    tail). ``run`` blocks until the server exits or `stop` is called."""

    def __init__(self, name: str, role: str, model: str, served_name: str, server_kw: dict, env: dict,
                 worker_host: str | None, startup_timeout_s: float):
        ray = import_ray()
        undo_ray_niceness(name)
        host = worker_host or ray.util.get_node_ip_address()
        model_dir = vllm_model_dir(resolve_model(model))
        port = free_port(host)
        self.name, self.url = name, f"http://{host}:{port}"
        self.log_path = Path(tempfile.mkdtemp(prefix=f"disagg-vllm-{name}-")) / f"{name}.log"
        full = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        full.update(env, VLLM_HOST_IP=host, VLLM_NIXL_SIDE_CHANNEL_HOST=host, VLLM_CPU_OMP_THREADS_BIND="nobind",
                    VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port(host)))
        argv = server_argv(model_dir, served_name, host, port, python=vllm_python(), **server_kw)
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(argv, env=full, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          cwd=self.log_path.parent)
        reap_group_with(os.getpid(), self.popen.pid)
        self._stop = threading.Event()
        try:
            wait_healthy(name, self.url, self.popen, self.log_path, time.monotonic() + startup_timeout_s,
                         startup_timeout_s)
        except ClusterError:
            self._terminate()
            raise
        self._info = {"name": name, "role": role, "url": self.url, "pid": os.getpid(), "server_pid": self.popen.pid,
                      "node_ip": host, "node_id": ray.get_runtime_context().get_node_id()}

    def info(self) -> dict:
        return self._info

    def run(self) -> str:
        while self.popen.poll() is None and not self._stop.wait(0.5):
            pass
        self._terminate()
        return f"vLLM server exited with status {self.popen.returncode}"

    def stop(self) -> None:
        self._stop.set()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def _terminate(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's group, wait, then SIGKILL whatever of the group is left (its helpers too)."""
        with contextlib.suppress(ProcessLookupError):
            if self.popen.poll() is None:
                os.killpg(self.popen.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout_s)
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


class VllmRayCluster(VllmCluster):
    """`VllmCluster` whose instances are `VllmInstanceActor`s on the Ray cluster at ``address``; ``role_resources``
    and ``worker_host`` as for `engine.ray_cluster.RayCluster`."""

    def __init__(self, model: str | Path, topology, *, address: str | None = "auto",
                 role_resources: dict[str, str] | None = None, worker_host: str | None = None, **kw: object):
        super().__init__(model, topology, **kw)  # type: ignore[arg-type]
        self.group = ActorGroup(address, role_resources, self.threads)
        self.worker_host = worker_host

    @property
    def placement(self) -> dict[str, dict]:
        return self.group.placement

    def _launch_instances(self, model_dir: Path, max_len: int, deadline: float) -> None:
        self.group.check_fits({p.role: p.instances for p in self.topology.pools}, self.topology.label)
        for pool in self.topology.pools:
            for i in range(pool.instances):
                name = f"{pool.role[0].upper()}{i}"
                self.group.create(VllmInstanceActor, name, pool.role, name, pool.role, str(self.model), self.model_name,
                                  self.server_kw(pool, max_len), self.vllm_env(), self.worker_host,
                                  self.startup_timeout_s)
        infos = self.group.start(max(1.0, deadline - time.monotonic()))
        self.instances = [{"name": n, "role": infos[n]["role"], "url": infos[n]["url"]} for n in self.group.actors]

    def dead(self) -> dict[str, str]:
        return {**super().dead(), **self.group.dead()}

    def kill(self, name: str) -> None:
        self.group.kill(name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        return self.group.log_tail(name, lines) if name in self.group.actors else super().log_tail(name, lines)

    def stop(self, timeout_s: float = 15.0) -> None:
        super().stop(timeout_s)
        self.group.stop(timeout_s)
