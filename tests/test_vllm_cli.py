"""``--backend vllm`` command-line errors are clear without vLLM running (no vLLM needed)."""

import os
import subprocess
import sys

import pytest


def disagg(*args, env=None):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "disagg"), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_serve_without_vllm_venv_says_how_to_build_it(tmp_path):
    r = disagg("serve", "--backend", "vllm", "--topology", "1P1D", "--port", "0",
               env={"DISAGG_VLLM_PYTHON": str(tmp_path / "missing" / "python")})
    assert r.returncode == 2
    assert "make vllm-venv" in r.stdout


@pytest.mark.parametrize("cmd", [["serve"], ["calibrate", "run"], ["validate"]])
def test_unknown_backend_is_rejected(cmd):
    r = disagg(*cmd, "--backend", "tgi")
    assert r.returncode == 2 and "--backend must be builtin or vllm" in r.stdout


def test_block_size_rounded_up_for_vllm():
    from engine.cli import parse_topology
    from engine.vllm_backend.serve import vllm_topology

    topo = vllm_topology(parse_topology("1P1D"))
    assert {p.block_size_tokens for p in topo.pools} == {32}
