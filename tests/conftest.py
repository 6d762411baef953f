"""Shared pytest fixtures."""

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
    """Router + 2 colocated workers."""
    from engine.cluster import Cluster
    from sim.topology import Topology

    with Cluster(tiny_model_dir, Topology.colocated(2, kv_capacity_tokens=16384), model_name="tiny",
                 dtype="fp32") as c:
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
