"""Shared pytest fixtures."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face folder with the tiny preset's shapes and random weights (seed 0), created once per session."""
    from engine.model.loader import create_random_model
    from sim.model_spec import PRESETS

    return create_random_model(tmp_path_factory.mktemp("tiny_model"), PRESETS["tiny"], seed=0)


# ---- engine fixtures: real clusters of processes on 127.0.0.1 (stopped, process groups killed, at teardown) ----------

@pytest.fixture(scope="session")
def cluster_1p1d(tiny_model_dir):
    """Router + 1 prefill + 1 decode worker over shm, KV checksummed on both sides. fp32: bf16 matmuls on CPU are not
    batch-invariant (a batched run's greedy tokens differ from one-at-a-time ones), fp32 ones are."""
    from engine.cluster import Cluster
    from sim.topology import Topology

    with Cluster(tiny_model_dir, Topology.disaggregated(1, 1, kv_capacity_tokens=16384), verify_kv=True,
                 model_name="tiny", dtype="fp32") as c:
        yield c


@pytest.fixture(scope="session")
def cluster_2c(tiny_model_dir):
    """Router + 2 colocated workers, pinned to CPUs (``pin_cores``, as validation runs them)."""
    from engine.cluster import Cluster
    from sim.topology import Topology

    with Cluster(tiny_model_dir, Topology.colocated(2, kv_capacity_tokens=16384), model_name="tiny",
                 dtype="fp32", pin_cores=True) as c:
        yield c


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    """``generate(prompt_ids, max_tokens, eos_id=None, temperature=0, seed=0) -> ids``: a plain single-process run
    (one sequence at a time: prefill, then decode steps) on the same weights, fp32."""
    import torch

    from engine.model.runner import ModelRunner, SamplingParams, Sequence

    torch.set_num_threads(1)
    runner = ModelRunner.from_folder(tiny_model_dir, num_blocks=256, dtype="fp32")

    def generate(prompt, max_tokens, eos_id=None, temperature=0.0, seed=0):
        seq = Sequence(0, list(prompt), SamplingParams(temperature, seed))
        out = []
        try:
            logits = runner.prefill([seq])
            while True:
                tok = runner.sample(logits, [seq])[0]
                seq.token_ids.append(tok)
                out.append(tok)
                if len(out) >= max_tokens or tok == eos_id:
                    return out
                logits = runner.decode([seq])
        finally:
            runner.free(seq)

    return generate


# ---- Ray: a local two-node cluster (tests/test_ray.py, and vLLM on Ray in tests/test_vllm_backend.py) ---------------

RAY = str(Path(sys.executable).parent / "ray")
RAY_TOKEN = secrets.token_hex(32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str) -> None:
    out = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})  # with this process's RAY_AUTH_*
    assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture(scope="module")
def two_nodes():
    """A head node with the ``prefill`` resource and a second node with ``decode``, two logical CPUs each (this
    machine has two cores in all); both on this machine. Yields the address; stops both (and disconnects this
    process) afterwards."""
    # Ray's token authentication, with a token both nodes and this driver share (as real nodes would); set before
    # this process first imports ray, which reads it once: one token for the whole test session.
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN)
    import ray
    port = _free_port()
    common = ["--num-cpus", "2", "--object-store-memory", str(80 * 2**20), "--disable-usage-stats"]
    _ray("start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
         "--resources", json.dumps({"prefill": 2}), *common)
    address = f"127.0.0.1:{port}"
    try:
        _ray("start", "--address", address, "--node-ip-address", "127.0.0.1", "--resources",
             json.dumps({"decode": 2}), *common)
        from sim.ray_jobs import connect

        connect(address)
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(0.5)
        yield address
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
