"""Calibrate a `CostProfile` for vLLM from vLLM's own per-iteration stats (``--enable-logging-iteration-details``).

With that flag (and stat logging on, the default) vLLM 0.32's engine core times every step and its logging stat
logger writes one INFO line per iteration::

    Iteration(17): 0 context requests, 0 context tokens, 4 generation requests, 4 generation tokens,
                   iteration elapsed time: 12.34 ms, ...

``elapsed`` is the engine core's schedule + model execution + output update for that step (its own process; no HTTP
or detokenisation). `sweep` starts one vLLM server (`engine.vllm_backend.cluster.VllmCluster`, colocated, eager),
sends controlled bursts straight to it — B prompts of L random token ids in ONE completions request, so they enter
the same iteration — and reads the lines each burst produced (log offsets before/after):

  * prefill bursts ``(B, L)``, ``max_tokens=1``: each pure-context line with n requests (n*L tokens) is one sample
    of ``prefill(num_seqs=n, sum=n*L, sum_sq=n*L^2)`` (vLLM may split a burst's admission over iterations);
  * decode bursts ``(B, L)``, ``max_tokens=T``: each pure-generation line is one sample of ``decode(batch, sum(context))``
    with the context replayed from the burst's lines (`burst_samples`; the simulator's convention: cached + 1).

Every round visits the points in a new shuffled order (seeded). A point's time is the median of its samples; points
are split deterministically into fit (3 of 4) and held-out (1 of 4), fitted with `calibrate.fit` exactly like the
built-in engine's sweep, and scored on the held-out ones. Raw samples are returned (and written next to the profile).

``elapsed`` leaves out what a served request also waits for, so `probe_overheads` measures it from the client side on
the same server after the sweep: the per-step overhead (streamed inter-token interval minus the logged decode step;
measured ~2 ms here) is added to every formula's fixed term, and the per-request overhead (HTTP, API server, engine
hand-off and the way back; ~7 ms here) becomes the profile's ``request_overhead_s``. The server runs without prefix
caching (the sweep's prompts are random anyway; the simulator has none).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np

from calibrate.fit import error_summary, fit_decode, fit_prefill
from sim.cost_profile import CostProfile

log = logging.getLogger(__name__)
ITERATION = re.compile(r"Iteration\((\d+)\): (\d+) context requests, (\d+) context tokens, (\d+) generation "
                       r"requests, (\d+) generation tokens, iteration elapsed time: ([0-9.]+) ms(?! \(dummy\))")
PREFILL_SHAPES = [(b, n) for b in (1, 2, 4) for n in (16, 64, 160, 320, 480)]
DECODE_SHAPES = [(b, n) for b in (1, 2, 4, 8, 16) for n in (32, 192, 448)]
DECODE_TOKENS = 12


@dataclass(frozen=True)
class Iteration:
    """One engine step as vLLM logged it."""

    index: int
    ctx_requests: int
    ctx_tokens: int
    gen_requests: int
    gen_tokens: int
    elapsed_s: float


def parse_iterations(text: str) -> list[Iteration]:
    """Every (non-dummy) iteration line in ``text``, in order."""
    return [Iteration(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), float(m[6]) / 1e3)
            for m in ITERATION.finditer(text)]


def burst_samples(its: list[Iteration], kind: str, batch: int, length: int, max_tokens: int) -> list[dict]:
    """The samples one burst of ``batch`` prompts of ``length`` tokens yields (module docstring).

    vLLM may admit the burst's prompts over several iterations (the first alone, the rest together with its first
    decode step), so the burst is replayed line by line: context requests join with one token generated, generation
    requests are the oldest live ones (``context = length + generated``); a request leaves after ``max_tokens``.
    Pure-context lines are prefill samples, pure-generation lines decode samples, mixed lines are skipped. A line
    that does not fit this replay (a chunked prompt, a stray request) ends the burst's samples.
    """
    out: list[dict] = []
    live: list[int] = []  # tokens generated so far, per live request, oldest first
    for it in its:
        if it.gen_requests > len(live) or it.ctx_tokens != it.ctx_requests * length:
            break
        ctx = sum(length + g for g in live[:it.gen_requests])
        if it.ctx_requests and not it.gen_requests and kind == "prefill":
            out.append({"phase": "prefill", "num_seqs": it.ctx_requests, "sum_tokens": it.ctx_tokens,
                        "sum_sq_tokens": it.ctx_requests * length * length, "time_s": it.elapsed_s})
        elif it.gen_requests and not it.ctx_requests and kind == "decode":
            out.append({"phase": "decode", "num_seqs": it.gen_requests, "sum_tokens": ctx, "sum_sq_tokens": 0,
                        "time_s": it.elapsed_s})
        live = [g + 1 for g in live[:it.gen_requests]] + live[it.gen_requests:] + [1] * it.ctx_requests
        live = [g for g in live if g < max_tokens]
    return out


def _wait_quiet(path: Path, quiet_s: float = 0.3, timeout_s: float = 10.0) -> int:
    """The log's size once it has not grown for ``quiet_s`` (the stat logger writes after responses return)."""
    size, since, deadline = path.stat().st_size, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.05)
        now = path.stat().st_size
        if now != size:
            size, since = now, time.monotonic()
    return size


def _iterations_since(log_path: Path, offset: int) -> list[Iteration]:
    """The iterations vLLM logged after byte ``offset`` of its log, once the log has gone quiet."""
    _wait_quiet(log_path)
    with open(log_path, "rb") as f:
        f.seek(offset)
        return parse_iterations(f.read().decode(errors="replace"))


def sweep(url: str, model_name: str, log_path: Path, rounds: int, seed: int = 0, vocab: int = 256,
          prefill_shapes: list[tuple[int, int]] | None = None, decode_shapes: list[tuple[int, int]] | None = None,
          decode_tokens: int = DECODE_TOKENS, budget_s: float | None = None) -> list[dict]:
    """Drive the bursts against the vLLM server at ``url`` whose log is ``log_path``; returns raw samples (dicts with
    phase, num_seqs, sum_tokens, sum_sq_tokens, time_s, round, length). Round 0 is a warm-up and is dropped.
    Stops early (after a complete round) when ``budget_s`` is spent. Raises RuntimeError if vLLM logged nothing."""
    import httpx

    rng = np.random.default_rng(seed)
    points = [("prefill", b, n) for b, n in (prefill_shapes or PREFILL_SHAPES)]
    points += [("decode", b, n) for b, n in (decode_shapes or DECODE_SHAPES)]
    samples: list[dict] = []
    started, seen_any = time.monotonic(), False
    with httpx.Client(timeout=300) as client:
        for rnd in range(rounds + 1):
            for i in rng.permutation(len(points)):
                kind, b, n = points[i]
                prompts = rng.integers(0, vocab, (b, n)).tolist()
                before = _wait_quiet(log_path)
                r = client.post(f"{url}/v1/completions", json={
                    "model": model_name, "prompt": prompts, "temperature": 0, "ignore_eos": True,
                    "max_tokens": 1 if kind == "prefill" else decode_tokens})
                r.raise_for_status()
                its = _iterations_since(log_path, before)
                seen_any |= bool(its)
                if rnd:
                    mt = 1 if kind == "prefill" else decode_tokens
                    samples += [{**s, "round": rnd, "length": n} for s in burst_samples(its, kind, b, n, mt)]
            if not seen_any:
                raise RuntimeError(f"vLLM logged no iteration details in {log_path} (needs "
                                   "--enable-logging-iteration-details and INFO logging)")
            if budget_s is not None and rnd and time.monotonic() - started > budget_s:
                break
    return samples


def probe_overheads(url: str, model_name: str, log_path: Path, rounds: int = 6, seed: int = 1, vocab: int = 256,
                    length: int = 64, batches: tuple[int, ...] = (1, 4), tokens: int = 24) -> dict:
    """What a request and a step cost beyond the logged iteration times (vLLM's ``elapsed`` covers the model step only:
    not the scheduling and output handling around it in the engine core, nor the API server and HTTP).

    * step: ``B`` prompts streamed together for ``tokens`` tokens; the client's inter-token interval (median over the
      streams' chunks after their first) minus the median logged time of the same pure-decode iterations;
    * request: one ``length``-token prompt with ``max_tokens=1``, not streamed; client latency minus its logged
      prefill iteration and minus the step overhead (that one is counted in the step).

    Returns ``{"step_s", "request_s", "probes"}`` (medians over ``rounds`` of each, clipped at 0)."""
    import json

    import httpx

    rng = np.random.default_rng(seed)
    step, request = [], []
    with httpx.Client(timeout=300) as client:
        for _ in range(rounds):
            for b in batches:
                prompts = rng.integers(0, vocab, (b, length)).tolist()
                before = _wait_quiet(log_path)
                times: dict[int, list[float]] = {}
                body = {"model": model_name, "prompt": prompts, "temperature": 0, "ignore_eos": True,
                        "max_tokens": tokens, "stream": True}
                with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            now = time.perf_counter()
                            for ch in json.loads(line[6:]).get("choices", []):
                                times.setdefault(int(ch["index"]), []).append(now)
                its = _iterations_since(log_path, before)
                dec = [x["time_s"] for x in burst_samples(its, "decode", b, length, tokens)]
                gaps = [t1 - t0 for ts in times.values() for t0, t1 in pairwise(ts[1:])]
                if dec and gaps:
                    step.append(float(np.median(gaps)) - float(np.median(dec)))
            before = _wait_quiet(log_path)
            t0 = time.perf_counter()
            client.post(f"{url}/v1/completions", json={"model": model_name, "prompt": rng.integers(
                0, vocab, length).tolist(), "temperature": 0, "max_tokens": 1}).raise_for_status()
            latency = time.perf_counter() - t0
            its = _iterations_since(log_path, before)
            pre = [x["time_s"] for x in burst_samples(its, "prefill", 1, length, 1)]
            if pre:
                request.append(latency - pre[0])
    if not step or not request:
        raise RuntimeError(f"vLLM logged no iterations for the overhead probes in {log_path}")
    step_s = max(0.0, float(np.median(step)))
    return {"step_s": step_s, "request_s": max(0.0, float(np.median(request)) - step_s),
            "probes": {"step": len(step), "request": len(request)}}


def _points(samples: list[dict], phase: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-point medians: ``keys [n, 3]`` (num_seqs, sum_tokens, sum_sq_tokens) and ``times [n]`` seconds.

    A prefill point is one exact shape. A decode point is (batch, prompt length): its T-1 steps differ only by a few
    context tokens, so they are pooled (median time, median sum(context)) — single ~10 ms steps are too noisy here.
    """
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        if s["phase"] == phase:
            key = (s["num_seqs"], s["length"]) if phase == "decode" else (s["num_seqs"], s["sum_tokens"])
            groups.setdefault(key, []).append(s)
    keys = sorted(groups)
    rows = [(k[0], float(np.median([s["sum_tokens"] for s in groups[k]])),
             float(np.median([s["sum_sq_tokens"] for s in groups[k]]))) for k in keys]
    return np.array(rows, dtype=float).reshape(-1, 3), np.array([np.median([s["time_s"] for s in groups[k]])
                                                                 for k in keys])


def fit_profile(samples: list[dict], name: str, spec, env: dict, meta: dict,
                overheads: dict | None = None) -> CostProfile:
    """Fit prefill and decode formulas to the samples' point medians (held-out: every 4th point), as a CostProfile.
    ``overheads`` (`probe_overheads`): the step overhead is added to every formula's fixed term (each iteration pays
    it), the request overhead becomes the profile's ``request_overhead_s``; the fit errors are those of the logged
    times. Raises ValueError when a phase has too few points."""
    fit_info = {}
    pk, py = _points(samples, "prefill")
    dk, dy = _points(samples, "decode")
    if len(py) < 6 or len(dy) < 6:
        raise ValueError(f"too few clean points to fit (prefill {len(py)}, decode {len(dy)}); raise the budget")
    held_p, held_d = np.arange(len(py)) % 4 == 3, np.arange(len(dy)) % 4 == 3
    pre = fit_prefill(pk[~held_p, 0], pk[~held_p, 1], pk[~held_p, 2], py[~held_p])
    dec = fit_decode(dk[~held_d, 0], dk[~held_d, 1], dy[~held_d])
    for phase, pred, y, held in (
            ("prefill", pre.predict(pk[:, 0], pk[:, 1], pk[:, 2]), py, held_p),
            ("decode", dec.predict(dk[:, 0], dk[:, 1]), dy, held_d)):
        h, f = error_summary(pred[held], y[held]), error_summary(pred[~held], y[~held])
        fit_info[phase] = {"fit_points": int((~held).sum()), "heldout_points": h["points"], "fit_mape": f["mape"],
                           "heldout_mape": h["mape"], "heldout_max_err": h["max_err"],
                           "samples": sum(s["phase"] == phase for s in samples),
                           "source": "vLLM iteration details (engine-core step time)"}
    fit_info["prefill"].update(formula="a + b*sum(len) + c*sum(len^2)", terms=pre.terms, cv_mape=pre.cv_mape)
    fit_info["decode"].update(formula="a_p + b_p*batch + c_p*sum(context)", pieces=len(dec.pieces),
                              cv_mape=dec.cv_mape)
    prefill, decode, request_s = pre.cost, dec.pieces, 0.0
    if overheads:
        fit_info["overheads"] = overheads
        step_s, request_s = overheads["step_s"], overheads["request_s"]
        prefill = replace(prefill, a_s=prefill.a_s + step_s)
        decode = tuple(replace(p, a_s=p.a_s + step_s) for p in decode)
    return CostProfile(name=name, source="calibrated", prefill=prefill, decode=decode, tp=1, hardware="cpu",
                       dtype="bf16", model=spec, decode_context="sum", fit=fit_info, environment=env,
                       meta={"backend": "vllm", **meta}, request_overhead_s=request_s)


def calibrate_vllm(model: str = "tiny", budget_s: float = 120.0, rounds: int = 4, seed: int = 0,
                   out: Path | None = None, name: str | None = None, log_dir: Path | None = None) -> CostProfile:
    """Start one eager vLLM instance with iteration details, sweep (module docstring), fit, optionally save ``out``
    (and ``NAME.samples.parquet`` beside it). Raises `engine.cluster.ClusterError` / FileNotFoundError when vLLM
    cannot start, ValueError when the fit has too few points."""
    import json
    import os
    import subprocess
    import tempfile

    from engine.cluster import resolve_model
    from engine.vllm_backend.cluster import VllmCluster, vllm_python
    from sim.model_spec import from_hf_config
    from sim.topology import Topology

    folder = resolve_model(model)
    spec = from_hf_config(folder)
    cfg = json.loads((folder / "config.json").read_text())
    logs = Path(log_dir or tempfile.mkdtemp(prefix="disagg-vllm-cal-"))
    topo = Topology.colocated(1, block_size_tokens=32, max_batch_size=32, max_batch_tokens=4096)
    t0 = time.monotonic()
    with VllmCluster(folder, topo, model_name="cal", iteration_details=True, log_dir=logs, seed=seed, prefix_caching=False,
                     max_model_len=min(int(cfg.get("max_position_embeddings", 2048)), 1024)) as c:
        samples = sweep(c.instances[0]["url"], "cal", logs / "C0.log", rounds, seed, min(256, spec.vocab_size),
                        budget_s=max(10.0, budget_s - (time.monotonic() - t0)))
        overheads = probe_overheads(c.instances[0]["url"], "cal", logs / "C0.log", seed=seed + 1,
                                    vocab=min(256, spec.vocab_size))
    version = subprocess.run([str(vllm_python()), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, timeout=120).stdout.strip()
    env = {"backend": "vllm", "vllm_version": version, "device": "cpu", "threads": 1, "enforce_eager": True,
           "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    profile = fit_profile(samples, name or f"vllm-{Path(str(model)).name}-cpu-bf16", spec, env,
                          {"budget_s": budget_s, "wall_s": round(time.monotonic() - t0, 1), "seed": seed}, overheads)
    if out is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        profile.save(out)
        pq.write_table(pa.Table.from_pylist(samples), Path(out).with_suffix("").with_suffix(".samples.parquet"))
    return profile
