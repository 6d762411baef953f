"""Ray: a real local two-node Ray cluster (head + a second node process with other custom resources, as two machines
would be) serving 1P1D with the roles on different nodes (greedy tokens equal a single-process run), a killed
actor handled cleanly, `disagg plan --ray` equal to the local plan, and a clear message where Ray is missing."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

if importlib.util.find_spec("ray") is None:  # not imported here: Ray reads its RAY_AUTH_* settings on import
    pytest.skip("Ray is in the [ray] extra, which make test installs", allow_module_level=True)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _greedy(url: str, prompt: list[int], n: int) -> list[int]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    ids: list[int] = []
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        for ch in chunk.choices:
            ids.extend(ch.model_extra.get("token_ids") or [])
    return ids


def test_1p1d_across_two_nodes_is_token_identical(two_nodes, tiny_model_dir, reference):
    from engine.ray_cluster import RayCluster
    from sim.topology import Topology

    with RayCluster(tiny_model_dir, Topology.disaggregated(1, 1, kv_capacity_tokens=8192), address=two_nodes,
                    role_resources={"prefill": "prefill", "decode": "decode"}, model_name="tiny", dtype="fp32",
                    verify_kv=True) as c:
        assert c.transport == "tcp"
        assert c.placement["P0"]["node_id"] != c.placement["D0"]["node_id"]  # placed by role on different nodes
        import ray

        by_node = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert "prefill" in by_node[c.placement["P0"]["node_id"]] and "decode" in by_node[c.placement["D0"]["node_id"]]
        for prompt, n in [(list(range(3, 40)), 24), ([5] * 90, 12), (list(range(200, 120, -1)), 30)]:
            assert _greedy(c.url, prompt, n) == reference(prompt, n)
        recs = httpx.get(f"{c.url}/v1/records").json()["records"]
        assert len(recs) == 3 and all(r["status"] == "ok" and r["prefill_instance"] == "P0"
                                      and r["decode_instance"] == "D0" and r["kv_bytes"] > 0 for r in recs)
        assert c.dead() == {}
    assert c.actors == {}


def test_killed_actor_is_retried_elsewhere_then_fails_fast(two_nodes, tiny_model_dir, reference):
    from engine.ray_cluster import RayCluster
    from sim.topology import Topology

    with RayCluster(tiny_model_dir, Topology.disaggregated(1, 2, kv_capacity_tokens=8192), address=two_nodes,
                    role_resources={"decode": "decode"}, model_name="tiny", dtype="fp32") as c:
        client = openai.OpenAI(base_url=f"{c.url}/v1", api_key="none", max_retries=0, timeout=120)
        prompt, ids, victim = list(range(50)), [], ""
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        for chunk in stream:
            for ch in chunk.choices:
                ids.extend(ch.model_extra.get("token_ids") or [])
            if not victim and len(ids) >= 5:
                live = httpx.get(f"{c.url}/v1/workers").json()["workers"]
                victim = next(w["name"] for w in live if w["role"] == "decode" and w["outstanding"] > 0)
                c.kill(victim)  # through Ray: ray.kill on the actor
        assert ids == reference(prompt, 200)  # retried on the other decode actor, same tokens
        rec = httpx.get(f"{c.url}/v1/records").json()["records"][-1]
        assert rec["attempts"] == 2 and "died" in rec["reason"]
        deadline = time.monotonic() + 10
        while victim not in c.dead():
            assert time.monotonic() < deadline, "Ray did not report the killed actor"
            time.sleep(0.2)
        assert c.dead()[victim].startswith("died (Ray")
        c.kill(next(n for n in ("D0", "D1") if n != victim))
        t0 = time.monotonic()
        r = httpx.post(f"{c.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and "no live decode worker" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 10


def test_plan_on_ray_equals_local_plan(two_nodes, tmp_path):
    from test_plan import colocated, toy_plan

    from sim.topology import Topology

    topos = [colocated(1), colocated(2), Topology.disaggregated(1, 1, max_batch_size=1)]
    local = toy_plan(tmp_path, topos, cache_dir=None, workers=1)
    on_ray = toy_plan(tmp_path, topos, cache_dir=None, ray_address=two_nodes)
    for ours, theirs in ((on_ray.table, local.table), (on_ray.curves, local.curves)):
        assert ours.schema == theirs.schema and ours.to_pandas().equals(theirs.to_pandas())  # NaN == NaN here
    assert json.dumps(on_ray.recommendation, default=str) == json.dumps(local.recommendation, default=str)
    assert on_ray.stats["ray"] == two_nodes


def test_without_ray_the_flags_say_how_to_install(monkeypatch):
    from disagg_cli.main import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as where it is missing
    for args in (["plan", "--model", "tiny", "--hardware", "h100-sxm", "--gpus", "1", "--no-cache", "--ray", "auto"],
                 ["serve", "--ray", "auto", "--port", "0"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code != 0 and "pip install 'disagg[ray]'" in res.output, res.output
        assert "Traceback" not in res.output


def test_too_big_for_the_cluster_fails_fast_naming_the_shortfall(two_nodes, tiny_model_dir):
    from engine.cluster import ClusterError
    from engine.ray_cluster import RayCluster
    from sim.topology import Topology

    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"need 3 decode \(the cluster has 2\)"):
        RayCluster(tiny_model_dir, Topology.disaggregated(1, 3), address=two_nodes,
                   role_resources={"decode": "decode"}).start()
    assert time.monotonic() - t0 < 10


def test_ray_flag_errors_name_the_flag():
    from disagg_cli.main import app

    res = CliRunner().invoke(app, ["serve", "--ray", "auto", "--ray-resources", "prefill"])
    assert res.exit_code != 0 and "--ray-resources: 'prefill' is not ROLE=RESOURCE" in res.output
    res = CliRunner().invoke(app, ["serve", "--ray-resources", "prefill=p"])
    assert res.exit_code != 0 and "only apply with --ray" in res.output
