"""`Cluster`: launch a router and its worker processes for a `sim.topology.Topology`, and stop them all.

    with Cluster("tiny", Topology.disaggregated(1, 1)) as c:
        url = c.url            # http://127.0.0.1:PORT, OpenAI-compatible
        ...

Workers are named like the simulator's instances (``P0``, ``D0``, ``C0``...), so engine and simulator records join
on them. Each worker is its own process (own model copy, ``threads`` torch threads) in its own process group; the
router is one more process. Everything binds ``host`` (127.0.0.1) on free ports; a fresh secret authenticates
every link. ``device`` is the workers' torch device (``"cuda"`` for GPU runs; pair it with
``transport="cuda"`` for NCCL KV transfers). Pool settings come from the topology: ``max_batch_size``, ``max_batch_tokens``, ``block_size_tokens``,
``chunked_prefill`` and ``kv_capacity_tokens`` (default `DEFAULT_KV_TOKENS` per instance when unset; ``tp``,
``hardware`` and ``memory_utilization`` do not apply to this CPU engine). On CPU each worker warms its GEMM shapes
up to ``warm_gemm_tokens`` before it reports ready (`engine.worker.warm_gemm_shapes`; 0 skips it).
``pin_cores=True`` pins worker k (launch order: pools in topology order, instances in order) and all its threads to
the k-th CPU this process may use, modulo their count (`worker_cpus` says which), so that per-core measurements
(`calibrate.host_speed`) can be attributed to instances; the router stays unpinned.

`stop` (or leaving the ``with``) sends SIGTERM to each process group, waits, then SIGKILLs what is left; workers also
exit on their own if this process dies. Startup failures raise `ClusterError` with the failing process's log tail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.transport.auth import SECRET_ENV, new_secret
from engine.worker import WorkerSpec
from sim.topology import PoolSpec, Topology

log = logging.getLogger(__name__)
DEFAULT_KV_TOKENS = 32768
CACHE_ENV = "DISAGG_CACHE"


class ClusterError(RuntimeError):
    """The cluster could not start (a process died or did not become ready in time); the message says which."""


def resolve_model(model: str | Path) -> Path:
    """A model folder: ``"tiny"`` (or another `sim.model_spec.PRESETS` name) is created once, deterministically
    (random weights, seed 0), under ``$DISAGG_CACHE`` or ``~/.cache/disagg/models/NAME``; anything else must be a
    Hugging Face Llama folder. Raises FileNotFoundError naming the path."""
    from sim.model_spec import PRESETS

    key = str(model).lower()
    if key in PRESETS and not Path(model).exists():
        root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "disagg")) / "models"
        folder = root / key
        if not (folder / "config.json").is_file():
            from engine.model.loader import create_random_model

            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
            create_random_model(tmp, PRESETS[key], seed=0)
            try:
                tmp.rename(folder)
            except OSError:  # another process won the race; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
        return folder
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model {str(model)!r}: not a preset ({', '.join(sorted(PRESETS))}) and no "
                                f"config.json in {folder}")
    return folder


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_path: Path
    info: dict = field(default_factory=dict)


class Cluster:
    """Router + workers for ``topology`` serving ``model`` (a preset name or a folder). See the module docstring."""

    def __init__(self, model: str | Path, topology: Topology, *, transport: str = "shm", dtype: str = "bf16",
                 device: str = "cpu",
                 threads: int = 1, host: str = "127.0.0.1", port: int = 0, max_outstanding: int = 1024,
                 max_retries: int = 2, request_timeout_s: float = 600.0, verify_kv: bool = False, seed: int = 0,
                 queue_limit: int = 4096, records_path: str | Path | None = None, log_dir: str | Path | None = None,
                 startup_timeout_s: float = 120.0, model_name: str | None = None, log_level: str = "WARNING",
                 warm_gemm_tokens: int = 2048, pin_cores: bool = False):
        self.model, self.topology, self.transport, self.dtype, self.device = model, topology, transport, dtype, device
        if transport == "cuda" and not device.startswith("cuda"):
            raise ValueError("the cuda KV transport needs device='cuda'")
        self.threads, self.host, self.port, self.max_outstanding = threads, host, port, max_outstanding
        self.max_retries, self.request_timeout_s, self.verify_kv, self.seed = max_retries, request_timeout_s, verify_kv, seed
        self.queue_limit, self.records_path, self.log_dir = queue_limit, records_path, log_dir
        self.startup_timeout_s, self.model_name, self.log_level = startup_timeout_s, model_name, log_level
        self.warm_gemm_tokens, self.pin_cores = warm_gemm_tokens, pin_cores
        self.worker_cpus: dict[str, int] = {}
        self.procs: dict[str, Proc] = {}
        self.url = ""
        self._run_dir: Path | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, module: str, spec_text: str, env: dict) -> Proc:
        assert self._run_dir is not None
        spec_path = self._run_dir / f"{name}.json"
        spec_path.write_text(spec_text)
        logs = Path(self.log_dir) if self.log_dir else self._run_dir
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as out:
            p = subprocess.Popen([sys.executable, "-m", module, str(spec_path)], env=env, stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name, p, log_path, self._run_dir / f"{name}.ready")
        self.procs[name] = proc
        return proc

    def _wait_ready(self, procs: list[Proc]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        for p in procs:
            while not p.ready_path.exists():
                if p.popen.poll() is not None:
                    raise ClusterError(f"{p.name} exited with status {p.popen.returncode} during startup:\n"
                                       f"{_tail(p.log_path)}")
                if time.monotonic() > deadline:
                    raise ClusterError(f"{p.name} not ready after {self.startup_timeout_s:g} s:\n{_tail(p.log_path)}")
                time.sleep(0.05)
            p.info = json.loads(p.ready_path.read_text())

    def start(self) -> str:
        """Launch everything and wait until the router answers; returns the base URL. Raises `ClusterError`."""
        model_dir = resolve_model(self.model)
        self._run_dir = Path(tempfile.mkdtemp(prefix="disagg-run-"))
        env = {**os.environ, SECRET_ENV: new_secret().hex(), "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads), "DISAGG_LOG_LEVEL": self.log_level,
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        try:
            workers = self._launch_workers(model_dir, env)
            router_spec = {
                "workers": [{"name": s.name, "role": s.role, "control": info["control"], "kv": info["kv"],
                             "capacity_blocks": s.num_blocks, "block_size": s.block_size} for s, info in workers],
                "policy": self.topology.router, "model_dir": str(model_dir),
                "model_name": self.model_name or (str(self.model) if not Path(self.model).exists()
                                                  else Path(self.model).name),
                "host": self.host, "port": self.port, "max_outstanding": self.max_outstanding,
                "max_retries": self.max_retries, "request_timeout_s": self.request_timeout_s, "seed": self.seed,
                "records_path": str(self.records_path) if self.records_path else "",
                "ready_path": str(self._run_dir / "router.ready"), "parent_pid": os.getpid()}
            router = self._spawn("router", "engine.server", json.dumps(router_spec), env)
            self._wait_ready([router])
        except BaseException:
            self.stop()
            raise
        self.url = router.info["url"]
        return self.url

    def _launch_workers(self, model_dir: Path, env: dict) -> list[tuple[WorkerSpec, dict]]:
        """Start every pool's workers as local processes; (spec, ready info with ``control`` and ``kv``) each."""
        workers = []
        cpus = sorted(os.sched_getaffinity(0))
        for pool in self.topology.pools:
            for i in range(pool.instances):
                spec = self._worker_spec(pool, f"{pool.role[0].upper()}{i}", model_dir)
                if self.pin_cores:
                    spec = replace(spec, cpu=cpus[len(workers) % len(cpus)])
                    self.worker_cpus[spec.name] = spec.cpu
                workers.append((spec, self._spawn(spec.name, "engine.worker", spec.to_json(), env)))
        self._wait_ready([p for _, p in workers])
        return [(s, p.info) for s, p in workers]

    def _worker_spec(self, pool: PoolSpec, name: str, model_dir: Path) -> WorkerSpec:
        assert self._run_dir is not None
        cap = pool.kv_capacity_tokens or DEFAULT_KV_TOKENS
        return WorkerSpec(name=name, role=pool.role, model_dir=str(model_dir), num_blocks=cap // pool.block_size_tokens,
                          block_size=pool.block_size_tokens, max_batch_size=pool.max_batch_size,
                          max_batch_tokens=pool.max_batch_tokens, chunked_prefill=pool.chunked_prefill,
                          dtype=self.dtype, device=self.device, transport=self.transport, threads=self.threads,
                          verify_kv=self.verify_kv, warm_gemm_tokens=self.warm_gemm_tokens,
                          queue_limit=self.queue_limit, host=self.host,
                          ready_path=str(self._run_dir / f"{name}.ready"), parent_pid=os.getpid())

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every process group (router first), wait up to ``timeout_s``, SIGKILL the rest. Idempotent."""
        stop_processes(self.procs, timeout_s)
        if self._run_dir is not None and not self.log_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        self._run_dir = None

    def dead(self) -> dict[str, str]:
        """{name: why} for every process of this cluster that has exited."""
        return dead_processes(self.procs)

    # ---- helpers for tests and tools -------------------------------------------------------------------------
    def pid(self, name: str) -> int:
        return self.procs[name].popen.pid

    def worker_pids(self) -> list[int]:
        return [self.pid(name) for name in self.procs if name != "router"]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process's group (e.g. to test failure handling)."""
        _signal_group(self.procs[name].popen, sig)

    def log_tail(self, name: str, lines: int = 40) -> str:
        return _tail(self.procs[name].log_path, lines)


class CpuMeter:
    """How the host's CPU was spent between construction and `read`: ``workers_cpu`` (cores' worth used by the worker
    processes ``pids``, all their threads) and ``background_cpu`` (by everything else on the cores this process may
    run on: the router, the load generator, sensors, other jobs; /proc/stat less idle and iowait). The background is
    the simulator's `sim.topology.HostCPU.background_cpu`."""

    def __init__(self, pids: Iterable[int]):
        self.pids = list(pids)
        self.cpus = os.sched_getaffinity(0)
        self.t0, self.busy0, self.work0 = time.monotonic(), host_busy_s(self.cpus), self._work()

    def _work(self) -> float:
        return sum(process_cpu_s(pid) for pid in self.pids)

    def read(self) -> dict[str, float]:
        dt = max(time.monotonic() - self.t0, 1e-9)
        busy, work = host_busy_s(self.cpus) - self.busy0, self._work() - self.work0
        return {"background_cpu": max(0.0, (busy - work) / dt), "workers_cpu": work / dt}


def host_busy_s(cpus: set[int] | None = None) -> float:
    """CPU seconds the host's ``cpus`` (default: those this process may run on) have spent busy since boot
    (/proc/stat, less idle and iowait)."""
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in fields[:8]]
                total += sum(v) - v[3] - v[4]
    return total / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_processes(procs: dict[str, Proc], timeout_s: float) -> None:
    """SIGTERM every process group (the router first), wait up to ``timeout_s`` in all, SIGKILL what is left, and
    empty ``procs``."""
    order = sorted(procs.values(), key=lambda p: p.name != "router")
    for p in order:
        _signal_group(p.popen, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in order:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %g s; killing it", p.name, timeout_s)
        _signal_group(p.popen, signal.SIGKILL, leader_gone_too=True)  # helpers it left behind (vLLM's trackers)
        p.popen.wait()
    procs.clear()


def reap_group_with(owner_pid: int, pgid: int) -> subprocess.Popen:
    """A watchdog (`sh`, its own session) that SIGKILLs process group ``pgid`` as soon as ``owner_pid`` is gone, and
    exits by itself once the group is empty. For servers such as vLLM whose helper processes (EngineCore, its
    workers) would outlive a killed launcher."""
    script = (f"while kill -0 {owner_pid} 2>/dev/null && kill -0 -{pgid} 2>/dev/null; do sleep 1; done; "
              f"kill -9 -{pgid} 2>/dev/null")
    # setsid -f: the watchdog is nobody's child (Ray kills a dead actor's children, which would take it along)
    return subprocess.Popen(["setsid", "-f", "sh", "-c", script], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dead_processes(procs: dict[str, Proc]) -> dict[str, str]:
    """{name: "exited with status N"} for the processes in ``procs`` that have exited."""
    return {n: f"exited with status {p.popen.returncode}" for n, p in procs.items() if p.popen.poll() is not None}


def _signal_group(p: subprocess.Popen, sig: int, leader_gone_too: bool = False) -> None:
    """Signal ``p``'s process group (``p`` leads it: started with start_new_session); skipped once ``p`` has exited
    unless ``leader_gone_too`` (its group can outlive it)."""
    if p.poll() is not None and not leader_gone_too:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
