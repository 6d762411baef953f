"""A worker killed mid-stream: its requests are retried on a live worker and still produce exactly the
single-process tokens; with no worker of a role left, requests fail fast with a clear error. Never a hang."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from engine.cluster import Cluster
from sim.topology import Topology

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _busy(url: str, role: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for w in httpx.get(f"{url}/v1/workers").json()["workers"]:
            if w["role"] == role and w["alive"] and w["outstanding"] > 0:
                return w["name"]
        time.sleep(0.05)
    raise AssertionError(f"no busy {role} worker")


def _stream_with_kill(cluster: Cluster, role: str, prompt: list[int], n: int) -> list[int]:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    ids: list[int] = []
    killed = False
    for chunk in stream:
        for ch in chunk.choices:
            ids.extend(ch.model_extra.get("token_ids") or [])
        if not killed and len(ids) >= 5:
            cluster.kill(_busy(cluster.url, role))
            killed = True
    assert killed
    return ids


def test_colocated_worker_killed_mid_stream(tiny_model_dir, reference):
    with Cluster(tiny_model_dir, Topology.colocated(2, kv_capacity_tokens=8192), model_name="tiny",
                 dtype="fp32") as c:
        prompt = list(range(60))
        ids = _stream_with_kill(c, "colocated", prompt, 300)
        assert ids == reference(prompt, 300)
        rec = httpx.get(f"{c.url}/v1/records").json()["records"][-1]
        assert rec["status"] == "ok" and rec["attempts"] == 2 and "died" in rec["reason"]
        health = httpx.get(f"{c.url}/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["live_workers"] == {"colocated": 1}
        r = httpx.post(f"{c.url}/v1/completions", json={"model": "tiny", "prompt": "still there?", "max_tokens": 4})
        assert r.status_code == 200


def test_decode_workers_killed(tiny_model_dir, reference):
    with Cluster(tiny_model_dir, Topology.disaggregated(1, 2, kv_capacity_tokens=8192), model_name="tiny",
                 dtype="fp32") as c:
        prompt = list(range(100, 180))
        ids = _stream_with_kill(c, "decode", prompt, 250)
        assert ids == reference(prompt, 250), "a retried request must continue the same token sequence"
        client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="none", max_retries=0, timeout=60)
        t0 = time.monotonic()
        with pytest.raises(openai.APIError, match="died"):
            _stream_with_kill(c, "decode", prompt, 250)  # the last decode worker dies: a clear error, no hang
        assert time.monotonic() - t0 < 30
        with pytest.raises(openai.InternalServerError, match="no live decode worker"):
            client.completions.create(model="tiny", prompt="x", max_tokens=3)
        health = httpx.get(f"{c.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
