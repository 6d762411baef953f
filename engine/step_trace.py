"""Optional per-step trace of a worker's model steps, for checking a cost profile against the engine under load.

When ``DISAGG_STEP_TRACE`` names a folder, each worker appends one JSON line per model step to
``<folder>/<worker>.jsonl``: ``{"w": worker, "k": "prefill"|"decode", "t0": s, "t1": s, "n": [new tokens per
sequence], "c": [tokens already cached per sequence]}`` (``time.monotonic()`` seconds; ``c`` for decode is each
sequence's context before the step). Tracing wraps the runner's ``prefill`` and ``decode``; off, it costs nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TRACE_ENV = "DISAGG_STEP_TRACE"


def install(runner: object, worker: str) -> None:
    """Wrap ``runner.prefill`` / ``runner.decode`` to log every step, if ``DISAGG_STEP_TRACE`` is set."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    out = open(Path(folder) / f"{worker}.jsonl", "a", buffering=1)  # noqa: SIM115 - lives as long as the worker
    prefill, decode = runner.prefill, runner.decode  # type: ignore[attr-defined]

    def traced_prefill(seqs, num_new_tokens=None):
        cached = [s.num_cached_tokens for s in seqs]
        new = num_new_tokens or [len(s.token_ids) - c for s, c in zip(seqs, cached, strict=False)]
        t0, u0 = time.monotonic(), time.thread_time()
        logits = prefill(seqs, num_new_tokens)
        t1, u = time.monotonic(), time.thread_time() - u0
        out.write(json.dumps({"w": worker, "k": "prefill", "t0": t0, "t1": t1, "n": list(new), "c": cached, "u": u}) + "\n")
        return logits

    def traced_decode(seqs):
        ctx = [len(s.token_ids) - 1 for s in seqs]
        t0, u0 = time.monotonic(), time.thread_time()
        logits = decode(seqs)
        t1, u = time.monotonic(), time.thread_time() - u0
        out.write(json.dumps({"w": worker, "k": "decode", "t0": t0, "t1": t1, "n": [1] * len(seqs), "c": ctx, "u": u}) + "\n")
        return logits

    runner.prefill, runner.decode = traced_prefill, traced_decode  # type: ignore[attr-defined]
