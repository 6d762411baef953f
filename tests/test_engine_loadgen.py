"""Open-loop load generation with merged client/server records, and the `disagg serve` / `disagg loadgen` CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.cli import parse_topology
from engine.loadgen import CLIENT_COLUMNS, make_prompt, run_load
from sim.metrics import summarize
from sim.records import RECORD_FIELDS
from sim.request import RequestSpec, Workload

pytestmark = pytest.mark.timeout(180)
DISAGG = str(Path(sys.executable).with_name("disagg"))


def _workload(n: int, rate: float, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = np.concatenate([[0.0], np.cumsum(rng.exponential(1 / rate, n - 1))])
    return Workload.from_lists(arrivals, rng.integers(4, 300, n), rng.integers(1, 16, n), name="test")


def test_run_load_merges_server_and_client_records(cluster_1p1d):
    w = _workload(12, rate=8.0)
    t = run_load(cluster_1p1d.url, w)
    assert t.column_names == RECORD_FIELDS + list(CLIENT_COLUMNS)
    rows = t.to_pylist()
    assert [r["request_id"] for r in rows] == [s.id for s in sorted(w.requests, key=lambda s: s.id)]
    for r, spec in zip(rows, sorted(w.requests, key=lambda s: s.id)):
        assert r["status"] == "ok" and r["output_tokens"] == spec.output_tokens == r["client_tokens"]
        assert r["client_send_s"] - spec.arrival_s < 0.25  # open loop: sent on schedule
        assert r["arrival_s"] >= r["client_send_s"] - 1e-3 and r["client_first_token_s"] >= r["first_token_s"]
        assert r["arrival_s"] <= r["prefill_start_s"] <= r["prefill_end_s"] == r["first_token_s"] <= r["last_token_s"]
        if spec.output_tokens > 1:
            assert r["prefill_end_s"] <= r["kv_transfer_start_s"] <= r["kv_transfer_end_s"] <= r["decode_start_s"]
            assert r["kv_bytes"] > 0 and r["max_itl_s"] > 0
    s = summarize(t)
    assert s["completed"] == 12 and s["ttft"]["p50"] > 0 and s["throughput_rps"] > 0


def test_rejections_are_recorded_not_raised(cluster_1p1d):
    w = Workload((RequestSpec(0, 0.0, 10, 2), RequestSpec(1, 0.0, 2040, 100)))
    rows = run_load(cluster_1p1d.url, w).to_pylist()
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "rejected" and rows[1]["http_status"] == 400 and "context" in rows[1]["reason"]


def test_prompts_are_deterministic():
    spec = RequestSpec(5, 0.0, 40, 3)
    assert make_prompt(spec, 1) == make_prompt(spec, 1) != make_prompt(spec, 2)
    assert len(make_prompt(spec)) == 40 and max(make_prompt(spec)) < 256


def test_topology_labels_and_files(tmp_path):
    assert parse_topology("1P2D").label == "1P2D" and parse_topology("3c").label == "3C"
    f = tmp_path / "t.yaml"
    f.write_text("topology:\n  kind: colocated\n  colocated: {instances: 2, max_batch_tokens: 512}\n  router: least_kv_load\n")
    t = parse_topology(str(f), kv_capacity_tokens=1024)
    assert t.label == "2C" and t.router == "least_kv_load" and t.pools[0].kv_capacity_tokens == 1024
    f.write_text("topology:\n  kind: colocated\n  prefill: {instances: 1}\n")
    with pytest.raises(ValueError, match="t.yaml"):
        parse_topology(str(f))


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.slow
def test_cli_serve_loadgen_and_clean_ctrl_c(tiny_model_dir, tmp_path):
    # started the way a shell starts a background job (SIGINT ignored, inherited): Ctrl-C must still stop it
    serve = subprocess.Popen([DISAGG, "serve", "--model", str(tiny_model_dir), "--topology", "1P1D", "--port", "0",
                              "--records", str(tmp_path / "server.parquet")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        url, deadline = "", time.monotonic() + 90
        while not url and time.monotonic() < deadline:
            line = serve.stdout.readline()
            m = re.search(r"http://127\.0\.0\.1:\d+", line)
            if m:
                url = m.group(0)
            assert line or serve.poll() is None, "serve exited"
        kids = _children(serve.pid)
        assert len(kids) == 3  # router, P0, D0
        out = tmp_path / "lg"
        lg = subprocess.run([DISAGG, "loadgen", "--url", url, "--num-requests", "6", "--poisson-rps", "4",
                             "--max-total-tokens", "512", "--out", str(out)], capture_output=True, text=True, timeout=120,
                            check=False)
        assert lg.returncode == 0, lg.stdout + lg.stderr
        assert "TTFT" in lg.stdout and pq.read_table(out / "records.parquet").num_rows == 6
        serve.send_signal(signal.SIGINT)
        try:
            rc = serve.wait(30)
        except subprocess.TimeoutExpired:  # say what it was doing: its output and which children are left
            left = [k for k in kids if Path(f"/proc/{k}").exists()]
            sig = [ln for ln in Path(f"/proc/{serve.pid}/status").read_text().splitlines()
                   if ln.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt", "State"))]
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
            pytest.fail(f"serve still running 30 s after Ctrl-C (children left: {left}; {sig}); its output:\n"
                        f"{serve.stdout.read()[-4000:]}")
        assert rc == 0
        assert not [k for k in kids if Path(f"/proc/{k}").exists()]
        assert pq.read_table(tmp_path / "server.parquet").num_rows == 6
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


def test_cli_errors_are_clean():
    r = subprocess.run([DISAGG, "serve", "--topology", "9Q"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "error:" in r.stdout and "Traceback" not in r.stdout + r.stderr
    r = subprocess.run([DISAGG, "loadgen", "--url", "http://127.0.0.1:9", "--out", "/tmp/x"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2 and "cannot reach the router" in r.stdout
