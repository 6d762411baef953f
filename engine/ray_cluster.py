"""`RayCluster`: the built-in engine's prefill and decode workers as Ray actors, placed by role; the router local.

    with RayCluster("tiny", Topology.disaggregated(1, 1), address="auto") as c:
        url = c.url            # the same OpenAI-compatible router as `engine.cluster.Cluster`

Each worker is one actor (`WorkerActor`) that loads its own model copy and runs the worker loop in the actor's
process. An actor asks Ray for ``threads`` CPUs (one GPU with ``device="cuda"``) and, when ``role_resources`` names
one for its role, one unit of a custom resource: start prefill nodes with ``--resources '{"prefill": N}'`` and
decode nodes with ``'{"decode": N}'`` to keep each role on its own machines. Actors are named ``P0``, ``D0``, ...
in a fresh Ray namespace; the launcher finds them there and hands their addresses to the router (one more local
process, bound to ``host``, 127.0.0.1 by default).

Workers listen on their node's IP (Ray's view of it, or ``worker_host``) so the router and the other role can
reach them across machines; KV moves over the engine's TCP transport (``transport="tcp"``, the default here; shm
only works within one machine) or NCCL (``"cuda"``). Every link authenticates with the launch secret: when
``DISAGG_SECRET`` is set here, the nodes are expected to have the same value in their environment (set it before
``ray start``) and it is not sent; otherwise a fresh secret travels to the actors as an argument over Ray's own
channel, which is only as private as the Ray cluster (enable Ray's TLS on untrusted networks).

Failures: a worker whose actor dies (node lost, process killed) drops its links; the router retries its requests
on a live worker of the same role, or answers 503 when none is left. `dead` reports it from Ray's side, with the
actor's death cause. Ray is optional: without it, `import_ray` raises `RayUnavailable` saying how to install it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import sys
import time
from dataclasses import replace
from pathlib import Path

from engine.cluster import Cluster, ClusterError, resolve_model
from engine.transport.auth import SECRET_ENV
from engine.worker import WorkerSpec
from sim import ray_jobs
from sim.ray_jobs import RayUnavailable, import_ray

log = logging.getLogger(__name__)
__all__ = ["ActorGroup", "RayCluster", "RayUnavailable", "WorkerActor", "connect"]
LOG_LINES = 200


def connect(address: str | None):
    """`sim.ray_jobs.connect`, raising ClusterError when the cluster cannot be joined."""
    try:
        return ray_jobs.connect(address)
    except ray_jobs.RayConnectError as e:
        raise ClusterError(str(e)) from None


def undo_ray_niceness(name: str) -> None:
    """Ray starts worker processes at nice 15 (its ``worker_niceness``, so that its own daemons stay responsive).
    A serving worker there loses its core to anything else running (measured here: TTFT +60 % on a shared 2-core
    box), so put this process back at 0; without the privilege to, warn and say how to avoid it."""
    if os.getpriority(os.PRIO_PROCESS, 0) <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:
        log.warning("%s: Ray runs this worker at nice %d and lowering it needs privileges; start the nodes with "
                    "RAY_worker_niceness=0 ray start ... to serve at normal priority", name,
                    os.getpriority(os.PRIO_PROCESS, 0))


class _Tail(logging.Handler):
    """The last `LOG_LINES` log lines, for `WorkerActor.log_tail`."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class WorkerActor:
    """One engine worker inside a Ray actor: builds it (model load, warm-up, listening) in the constructor;
    `run` is the worker loop (blocks until `stop`). Made remote by `RayCluster` with its resource requests."""

    def __init__(self, spec_json: str, model: str, secret_hex: str | None, log_level: str = "WARNING"):
        from engine.worker import build_worker

        self._tail = _Tail()
        root = logging.getLogger()
        root.addHandler(self._tail)
        root.setLevel(log_level)
        sys.setswitchinterval(0.0005)  # as engine.worker.main: link threads get the GIL within 0.5 ms
        ray = import_ray()
        spec = WorkerSpec.from_json(spec_json)
        undo_ray_niceness(spec.name)
        host = spec.host or ray.util.get_node_ip_address()
        spec = replace(spec, host=host, model_dir=str(resolve_model(model)))
        secret = secret_hex or os.environ.get(SECRET_ENV)
        if not secret:
            raise RuntimeError(f"{spec.name}: {SECRET_ENV} is not set on node {host} (set the same value on every "
                               "node before `ray start`, or unset it on the launcher to have one sent)")
        self.worker = build_worker(spec, bytes.fromhex(secret))
        self._info = {"name": spec.name, "role": spec.role, "pid": os.getpid(), "control": self.worker.control.address,
                      "kv": self.worker.kv_address, "node_ip": host,
                      "node_id": ray.get_runtime_context().get_node_id(), "time": time.time()}

    def info(self) -> dict:
        return self._info

    def run(self) -> str:
        try:
            self.worker.run()
        finally:
            self.worker.close()
        return "stopped"

    def stop(self) -> None:
        self.worker.stop.set()
        self.worker.wake.set()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._tail.lines)[-lines:])


class ActorGroup:
    """A launch's actors on Ray: placed by role (CPUs, a GPU, one unit of the role's custom resource), named in a
    fresh namespace and found there again by name, each running a blocking ``run`` whose end Ray reports. Shared by
    the built-in engine's `RayCluster` and the vLLM backend's. Actor classes need ``info``, ``run``, ``stop`` and
    ``log_tail`` methods."""

    def __init__(self, address: str | None, role_resources: dict[str, str] | None, cpus: int, gpus: int = 0):
        unknown = set(role_resources or {}) - {"prefill", "decode", "colocated"}
        if unknown:
            raise ValueError(f"role_resources: unknown role(s) {sorted(unknown)} (prefill, decode, colocated)")
        self.address, self.role_resources, self.cpus, self.gpus = address, dict(role_resources or {}), cpus, gpus
        self.actors: dict[str, object] = {}
        self.placement: dict[str, dict] = {}
        self._runs: dict[str, object] = {}
        self._deaths: dict[str, str] = {}
        self.namespace = ""

    def ray(self):
        return connect(self.address)

    def check_fits(self, roles: dict[str, int], what: str) -> None:
        """Raise ClusterError at once when ``roles`` ({role: actors}) ask for more than the whole cluster has."""
        need: dict[str, float] = {}
        for role, n in roles.items():
            asks = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
            if role in self.role_resources:
                asks[self.role_resources[role]] = 1
            for k, v in asks.items():
                need[k] = need.get(k, 0) + v * n
        have = self.ray().cluster_resources()
        short = ", ".join(f"{v:g} {k} (the cluster has {have.get(k, 0):g})" for k, v in need.items()
                          if have.get(k, 0) < v)
        if short:
            raise ClusterError(f"{what}: the actors need {short}; add nodes or start them with more (ray start "
                               "--num-cpus N --resources '{\"prefill\": N}'), or use fewer instances / --threads")

    def create(self, cls: type, name: str, role: str, *args: object) -> None:
        """Create actor ``name`` of ``cls`` (made remote here) with the role's resource requests."""
        ray = self.ray()
        if not self.namespace:
            self.namespace = f"disagg-{secrets.token_hex(4)}"
        opts: dict = {"name": name, "namespace": self.namespace, "num_cpus": self.cpus, "max_concurrency": 4,
                      "max_restarts": 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(self.cpus),
                                                                      "MKL_NUM_THREADS": str(self.cpus)}}}
        if self.gpus:
            opts["num_gpus"] = self.gpus
        if role in self.role_resources:
            opts["resources"] = {self.role_resources[role]: 1}
        self.actors[name] = ray.remote(cls).options(**opts).remote(*args)

    def start(self, timeout_s: float) -> dict[str, dict]:
        """Find every created actor by name in the namespace (discovery through Ray), wait for each one's ``info``
        (its constructor done), start its ``run``; {name: info}. Raises ClusterError naming the actor."""
        ray = self.ray()
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == self.namespace}
        missing = sorted(set(self.actors) - names)
        if missing:
            raise ClusterError(f"Ray did not register actor(s) {missing} in namespace {self.namespace}")
        handles = {n: ray.get_actor(n, namespace=self.namespace) for n in self.actors}
        pending = {h.info.remote(): n for n, h in handles.items()}
        deadline = time.monotonic() + timeout_s
        infos: dict[str, dict] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ClusterError(f"actor(s) {sorted(pending.values())} not ready after {timeout_s:g} s (Ray may "
                                   f"still be placing them; free resources now {ray.available_resources()})")
            name = pending.pop(ready[0])
            try:
                infos[name] = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                raise ClusterError(f"actor {name} failed to start: {e}") from None
        for name, h in handles.items():
            self._runs[name] = h.run.remote()
            self.placement[name] = {k: infos[name][k] for k in ("node_id", "node_ip", "pid")}
        return infos

    def dead(self) -> dict[str, str]:
        """{name: why} for every actor whose ``run`` ended: "stopped (...)" or "died (Ray: cause)"."""
        if not self._runs:
            return dict(self._deaths)
        ray = import_ray()
        done, _ = ray.wait(list(self._runs.values()), num_returns=len(self._runs), timeout=0)
        for name, ref in self._runs.items():
            if ref in done and name not in self._deaths:
                try:
                    self._deaths[name] = f"stopped ({ray.get(ref)})"
                except ray.exceptions.RayError as e:
                    first = str(e).strip().splitlines()
                    self._deaths[name] = f"died (Ray: {first[0] if first else type(e).__name__})"
        return dict(self._deaths)

    def kill(self, name: str) -> None:
        import_ray().kill(self.actors[name], no_restart=True)

    def log_tail(self, name: str, lines: int = 40) -> str:
        ray = import_ray()
        try:
            return ray.get(self.actors[name].log_tail.remote(lines), timeout=5)  # type: ignore[attr-defined]
        except ray.exceptions.GetTimeoutError:
            return "(no log: the actor did not answer in 5 s)"
        except ray.exceptions.RayError as e:
            return f"(no log: the actor is gone: {str(e).strip().splitlines()[0] if str(e).strip() else e})"

    def stop(self, timeout_s: float) -> None:
        """Ask every live actor to stop, wait up to ``timeout_s`` for their ``run`` to end, kill them all."""
        if not self.actors:
            return
        ray = import_ray()
        for name, a in self.actors.items():
            if name not in self._deaths:
                with contextlib.suppress(ray.exceptions.RayError):
                    a.stop.remote()  # type: ignore[attr-defined]
        if self._runs:
            ray.wait(list(self._runs.values()), num_returns=len(self._runs), timeout=timeout_s)
        for a in self.actors.values():
            with contextlib.suppress(ray.exceptions.RayError, ValueError):
                ray.kill(a, no_restart=True)
        self.actors, self._runs = {}, {}


class RayCluster(Cluster):
    """`Cluster` whose workers are Ray actors. Extra keywords: ``address`` (see `connect`), ``role_resources``
    ({role: custom resource name}, one unit per worker), ``worker_host`` (address workers bind; default the node's
    IP as Ray sees it). ``transport`` defaults to tcp (shm only within one machine)."""

    def __init__(self, model: str | Path, topology, *, address: str | None = "auto",
                 role_resources: dict[str, str] | None = None, worker_host: str | None = None,
                 transport: str = "tcp", **kw: object):
        super().__init__(model, topology, transport=transport, **kw)  # type: ignore[arg-type]
        self.group = ActorGroup(address, role_resources, self.threads, 1 if self.device.startswith("cuda") else 0)
        self.worker_host = worker_host

    @property
    def placement(self) -> dict[str, dict]:
        """{worker: {node_id, node_ip, pid}} where Ray placed each worker actor."""
        return self.group.placement

    @property
    def actors(self) -> dict[str, object]:
        return self.group.actors

    def _launch_workers(self, model_dir: Path, env: dict) -> list[tuple[WorkerSpec, dict]]:
        shared = os.environ.get(SECRET_ENV)
        secret_hex = None if shared else env[SECRET_ENV]
        if shared:
            env[SECRET_ENV] = shared  # the router uses the nodes' pre-shared secret too
        self.group.check_fits({p.role: p.instances for p in self.topology.pools}, self.topology.label)
        specs: list[WorkerSpec] = []
        for pool in self.topology.pools:
            for i in range(pool.instances):
                spec = replace(self._worker_spec(pool, f"{pool.role[0].upper()}{i}", model_dir),
                               host=self.worker_host or "", ready_path="", parent_pid=0)
                self.group.create(WorkerActor, spec.name, pool.role, spec.to_json(), str(self.model), secret_hex,
                                  self.log_level)
                specs.append(spec)
        infos = self.group.start(self.startup_timeout_s)
        return [(replace(s, host=infos[s.name]["node_ip"]), infos[s.name]) for s in specs]

    def dead(self) -> dict[str, str]:
        """{name: why} for the router if it exited and for every worker actor Ray reports finished or dead."""
        return {**super().dead(), **self.group.dead()}

    def kill(self, name: str, sig: int = 9) -> None:
        """Kill a worker actor through Ray (``name`` a worker) or signal the router's process group."""
        if name in self.group.actors:
            self.group.kill(name)
        else:
            super().kill(name, sig)

    def pid(self, name: str) -> int:
        return int(self.placement[name]["pid"]) if name in self.placement else super().pid(name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        return self.group.log_tail(name, lines) if name in self.group.actors else super().log_tail(name, lines)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the router (as `Cluster.stop`), then the worker actors (`ActorGroup.stop`)."""
        super().stop(timeout_s)
        self.group.stop(timeout_s)
