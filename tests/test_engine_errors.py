"""Bad input gets a 4xx with a message; a full router answers 429; a client that leaves frees its KV everywhere."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from engine.cluster import Cluster
from sim.topology import Topology

pytestmark = pytest.mark.timeout(120)

BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "tiny"}, 400, "'prompt' is required"),
    ({"prompt": "x"}, 400, "'model' is required"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**12}, 400, "exceeds the model's context"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "must be an integer"),
    ({"model": "tiny", "prompt": [1] * 3000}, 400, "does not fit the model's context"),
    ({"model": "tiny", "prompt": [1, 999]}, 400, "outside the vocabulary"),
    ({"model": "tiny", "prompt": []}, 400, "'prompt' is empty"),
    ({"model": "tiny", "prompt": [[1], [2]]}, 400, "batched prompts"),
    ({"model": "tiny", "prompt": 5}, 400, "must be a string or a list"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "'n'"),
    ({"model": "tiny", "prompt": "x", "stop": ["a"]}, 400, "'stop'"),
    ({"model": "tiny", "prompt": "x", "seed": 2**70}, 400, "'seed'"),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "'stream' must be a boolean"),
]


@pytest.mark.parametrize("body,status,text", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_completion_requests(cluster_1p1d, body, status, text):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{cluster_1p1d.url}/v1/completions", content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert text in r.json()["error"]["message"]


def test_bad_chat_request_and_openai_client_error(cluster_1p1d):
    r = httpx.post(f"{cluster_1p1d.url}/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and "'messages'" in r.json()["error"]["message"]
    client = openai.OpenAI(base_url=f"{cluster_1p1d.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
        client.completions.create(model="tiny", prompt="hello", max_tokens=100_000)
    assert httpx.get(f"{cluster_1p1d.url}/health").status_code == 200  # still serving


def _workers(url: str) -> dict:
    return {w["name"]: w for w in httpx.get(f"{url}/v1/workers").json()["workers"]}


def test_client_disconnect_frees_kv_on_both_sides(cluster_1p1d):
    url = cluster_1p1d.url
    body = {"model": "tiny", "prompt": list(range(250)), "max_tokens": 1500, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines, seen = r.iter_lines(), 0  # keep the iterator alive: closing it would close the connection
        while seen < 4:
            seen += next(lines).startswith("data: ")
        busy = _workers(url)
        assert busy["D0"]["kv_used_blocks"] > 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        w = _workers(url)
        if all(x["kv_used_blocks"] == 0 and x["outstanding"] == 0 for x in w.values()):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"KV not freed after the client left: {w}")
    rec = httpx.get(f"{url}/v1/records").json()["records"][-1]
    assert rec["status"] == "cancelled" and "disconnected" in rec["reason"]


@pytest.fixture(scope="module")
def small_cluster(tiny_model_dir):
    """One colocated worker with 1024 KV tokens; at most 3 requests in flight."""
    with Cluster(tiny_model_dir, Topology.colocated(1, kv_capacity_tokens=1024), max_outstanding=3,
                 model_name="tiny") as c:
        yield c


def test_full_router_answers_429_and_the_rest_complete(small_cluster):
    url = f"{small_cluster.url}/v1/completions"
    body = {"model": "tiny", "prompt": [5] * 20, "max_tokens": 120, "temperature": 0, "ignore_eos": True}

    def post(_):
        return httpx.post(url, json=body, timeout=60)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(post, range(10)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 3 and 429 in codes and set(codes) <= {200, 429}, codes
    busy = next(r for r in results if r.status_code == 429).json()["error"]
    assert "server busy" in busy["message"] and "limit 3" in busy["message"]
    done = [r.json() for r in results if r.status_code == 200]
    assert all(d["usage"]["completion_tokens"] == 120 for d in done)
    after = post(0)
    assert after.status_code == 200


def test_request_larger_than_an_instance_kv_is_refused(small_cluster):
    r = httpx.post(f"{small_cluster.url}/v1/completions",
                   json={"model": "tiny", "prompt": [1] * 600, "max_tokens": 600})
    assert r.status_code == 400 and "more KV than one instance holds (1024 tokens)" in r.json()["error"]["message"]


def test_vllm_instance_ports_come_from_below_the_ephemeral_range(tmp_path):
    """`free_port` for vLLM's servers and NIXL side channels: bindable, and never where bind(0) and outgoing
    connections take ports from in the meantime; the plain bind(0) port when the range leaves no room below."""
    import socket

    from engine.vllm_backend.cluster import LOW_PORT, free_port

    rng_file = tmp_path / "range"
    rng_file.write_text("32768\t60999\n")
    ports = {free_port(ephemeral_file=str(rng_file)) for _ in range(20)}
    assert all(LOW_PORT <= p < 32768 for p in ports) and len(ports) > 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # it was free
    rng_file.write_text("1024 60999\n")
    assert free_port(ephemeral_file=str(rng_file)) >= 1024
    assert free_port(ephemeral_file=str(tmp_path / "missing")) > 0
