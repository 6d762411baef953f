"""The engine's output equals a plain single-process run, token for token, in 1P1D and 2C; KV arrives intact;
records follow the simulator's lifecycle; the OpenAI surface works with the official client."""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI, OpenAI

pytestmark = pytest.mark.timeout(180)
EOS = 257


def _prompts(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[1, 2, 15, 16, 17, 511, 512, 513], rng.integers(1, 400, n - 8)])
    return [(rng.integers(0, 256, int(k)).tolist(), int(rng.integers(1, 20))) for k in lengths]


async def _stream(client: AsyncOpenAI, prompt: list[int], max_tokens: int, **kw) -> list[int]:
    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, stream=True, **kw)
    ids: list[int] = []
    async for chunk in stream:
        for ch in chunk.choices:
            ids.extend(ch.model_extra.get("token_ids") or [])
    return ids


async def _run_all(url: str, cases, **kw) -> list[list[int]]:
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as client:
        return await asyncio.gather(*(_stream(client, p, m, **kw) for p, m in cases))


async def _both(urls, cases, **kw):
    return await asyncio.gather(*(_run_all(u, cases, **kw) for u in urls))


def test_greedy_1p1d_equals_2c_equals_single_process(cluster_1p1d, cluster_2c, reference):
    cases = _prompts(56, seed=3)
    disagg, coloc = asyncio.run(_both([cluster_1p1d.url, cluster_2c.url], cases, temperature=0))
    for i, (prompt, m) in enumerate(cases):
        want = reference(prompt, m, eos_id=EOS)
        assert disagg[i] == want, f"1P1D differs on case {i} (prompt {len(prompt)} tokens)"
        assert coloc[i] == want, f"2C differs on case {i} (prompt {len(prompt)} tokens)"


def test_seeded_sampling_is_identical_everywhere(cluster_1p1d, cluster_2c, reference):
    cases = _prompts(10, seed=4)
    kw = {"temperature": 0.9, "seed": 1234, "extra_body": {"ignore_eos": True}}
    disagg, coloc = asyncio.run(_both([cluster_1p1d.url, cluster_2c.url], cases, **kw))
    for i, (prompt, m) in enumerate(cases):
        want = reference(prompt, m, temperature=0.9, seed=1234)
        assert disagg[i] == coloc[i] == want


def test_pin_cores_pins_every_worker_thread(cluster_2c):
    import os

    cpus = sorted(os.sched_getaffinity(0))
    assert cluster_2c.worker_cpus == {"C0": cpus[0], "C1": cpus[1 % len(cpus)]}
    for name, cpu in cluster_2c.worker_cpus.items():
        pid = cluster_2c.pid(name)
        threads = os.listdir(f"/proc/{pid}/task")
        assert len(threads) > 1  # the model thread and the link threads
        assert {frozenset(os.sched_getaffinity(int(t))) for t in threads} == {frozenset({cpu})}
    assert os.sched_getaffinity(cluster_2c.pid("router")) == set(cpus)  # the router is not pinned


def test_kv_checksums_and_record_lifecycle(cluster_1p1d):
    asyncio.run(_run_all(cluster_1p1d.url, [(list(range(200)), 5), (list(range(40)), 1)], temperature=0,
                         extra_body={"ignore_eos": True}))
    recs = httpx.get(f"{cluster_1p1d.url}/v1/records").json()["records"]
    by_len = {r["prompt_tokens"]: r for r in recs[-2:]}
    r = by_len[200]
    assert r["status"] == "ok" and r["output_tokens"] == 5 and r["kv_bytes"] > 0
    assert r["kv_sha256_sent"] and r["kv_sha256_sent"] == r["kv_sha256_received"]
    t = [r[k] for k in ("arrival_s", "prefill_start_s", "prefill_end_s", "kv_transfer_start_s",
                        "kv_transfer_end_s", "decode_start_s", "last_token_s")]
    assert t == sorted(t) and r["first_token_s"] == r["prefill_end_s"] and r["finished_s"] == r["last_token_s"]
    assert (r["prefill_instance"], r["decode_instance"]) == ("P0", "D0")
    one = by_len[40]  # one output token: finishes on the prefill worker, no transfer
    assert one["status"] == "ok" and one["kv_transfer_start_s"] is None and one["last_token_s"] == one["first_token_s"]


def test_colocated_records_have_no_transfer(cluster_2c):
    asyncio.run(_run_all(cluster_2c.url, [(list(range(30)), 4)], temperature=0, extra_body={"ignore_eos": True}))
    r = httpx.get(f"{cluster_2c.url}/v1/records").json()["records"][-1]
    assert r["kv_transfer_start_s"] is None and r["prefill_instance"] == r["decode_instance"]
    assert r["decode_start_s"] >= r["prefill_end_s"] and math.isclose(r["first_token_s"], r["prefill_end_s"])


def test_text_chat_and_non_streaming(cluster_1p1d):
    client = OpenAI(base_url=f"{cluster_1p1d.url}/v1", api_key="none", max_retries=0)
    r = client.completions.create(model="tiny", prompt="Hello, disaggregated world", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6 and len(r.choices[0].model_extra["token_ids"]) == 6
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0)
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens <= 3


def test_health_models_metrics(cluster_1p1d):
    base = cluster_1p1d.url
    h = httpx.get(f"{base}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "tiny"
    m = httpx.get(f"{base}/metrics").text
    assert 'disagg_worker_alive{worker="P0",role="prefill"} 1' in m and "disagg_output_tokens_total" in m
    w = httpx.get(f"{base}/v1/workers").json()["workers"]
    assert {x["name"] for x in w} == {"P0", "D0"} and all(x["kv_capacity_blocks"] == 1024 for x in w)


@pytest.mark.slow
def test_tcp_kv_transport_end_to_end(tiny_model_dir, reference):
    from engine.cluster import Cluster
    from sim.topology import Topology

    cases = _prompts(8, seed=5)
    with Cluster(tiny_model_dir, Topology.disaggregated(1, 1, kv_capacity_tokens=8192), transport="tcp",
                 verify_kv=True, model_name="tiny", dtype="fp32") as c:
        out = asyncio.run(_run_all(c.url, cases, temperature=0))
        recs = httpx.get(f"{c.url}/v1/records").json()["records"]
    for (prompt, m), ids in zip(cases, out):
        assert ids == reference(prompt, m, eos_id=EOS)
    moved = [r for r in recs if r["kv_bytes"]]
    assert moved and all(r["kv_sha256_sent"] == r["kv_sha256_received"] != "" for r in moved)
