"""Open-loop load generator: replay a `Workload` against a router and return one merged record per request.

Open loop: request ``i`` is sent at ``t0 + arrival_s[i]`` whatever the state of earlier requests. Each request is a
streaming ``/v1/completions`` call whose prompt is ``prompt_tokens`` token ids drawn from ``token_range`` with a
generator seeded by ``(seed, request id)`` (the same workload and seed give the same prompts), ``max_tokens =
output_tokens``, ``ignore_eos`` and ``temperature`` 0 by default, so every request produces exactly its tokens.

The returned table has `sim.records.RECORD_SCHEMA`'s columns, filled from the router's server-side record (returned in
the last chunk) and converted to seconds since ``t0`` (``time.monotonic()`` is system-wide, so server and client
stamps share one clock on one host): ``arrival_s`` is when the router received the request, the phases are the
workers' stamps. Client-side columns follow: ``scheduled_s`` (the workload's arrival), ``client_send_s``,
``client_first_token_s``, ``client_last_token_s``, ``client_max_itl_s``, ``client_tokens`` and ``http_status``.
The schema's metadata holds ``t0`` itself under `T0_KEY` (``repr`` of the float), to line other monotonic-clock
measurements (step traces, `calibrate.host_speed` readings) up with the records.
A request refused before streaming (4xx/5xx) is ``status="rejected"`` with the server's message as ``reason``; one
that fails mid-stream is ``status="error"``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable

import httpx
import numpy as np
import pyarrow as pa

from sim.records import RequestRecord, records_to_table
from sim.request import RequestSpec, Workload

NAN = math.nan
T0_KEY = b"disagg.t0_monotonic"
CLIENT_COLUMNS = {"scheduled_s": pa.float64(), "client_send_s": pa.float64(), "client_first_token_s": pa.float64(),
                  "client_last_token_s": pa.float64(), "client_max_itl_s": pa.float64(), "client_tokens": pa.int64(),
                  "http_status": pa.int64()}


def make_prompt(spec: RequestSpec, seed: int = 0, token_range: tuple[int, int] = (0, 256)) -> list[int]:
    """``spec.prompt_tokens`` ids in ``[lo, hi)``, deterministic in ``(seed, spec.id)``."""
    rng = np.random.default_rng([seed, spec.id])
    return rng.integers(token_range[0], token_range[1], spec.prompt_tokens).tolist()


async def _one(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec, t0: float, seed: int,
               temperature: float, token_range: tuple[int, int]) -> tuple[RequestRecord, dict]:
    body = {"model": model, "prompt": make_prompt(spec, seed, token_range), "max_tokens": spec.output_tokens,
            "temperature": temperature, "seed": seed * 1_000_003 + spec.id, "stream": True, "ignore_eos": True}
    delay = t0 + spec.arrival_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.monotonic()
    rec = RequestRecord(spec.id, sent - t0, spec.prompt_tokens, spec.output_tokens)
    client_cols = {"scheduled_s": spec.arrival_s, "client_send_s": sent - t0, "client_first_token_s": NAN,
                   "client_last_token_s": NAN, "client_max_itl_s": NAN, "client_tokens": 0, "http_status": 0}
    times: list[float] = []
    server: dict | None = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 headers={"x-request-id": str(spec.id)}) as r:
            client_cols["http_status"] = r.status_code
            if r.status_code != 200:
                raw = await r.aread()
                rec.status, rec.reason = "rejected", _error_message(raw, r.status_code)
                return rec, client_cols
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                obj = json.loads(line[6:])
                if "error" in obj:
                    rec.status, rec.reason = "error", str(obj["error"].get("message", obj["error"]))
                    break
                for ch in obj.get("choices", []):
                    times.extend([now] * len(ch.get("token_ids", [])))
                if "disagg" in obj:
                    server = obj["disagg"]["record"]
    except httpx.HTTPError as e:
        rec.status, rec.reason = "error", f"{type(e).__name__}: {e}"
    if times:
        gaps = np.diff(times)
        client_cols.update(client_first_token_s=times[0] - t0, client_last_token_s=times[-1] - t0,
                           client_max_itl_s=float(gaps.max()) if gaps.size else 0.0, client_tokens=len(times))
    if server is not None and rec.status == "pending":
        for k, v in server.items():
            if k in ("request_id", "prompt_tokens") or not hasattr(rec, k):
                continue
            if k.endswith("_s") and k != "max_itl_s":
                v = NAN if v is None else v - t0
            setattr(rec, k, NAN if v is None else v)
    elif rec.status == "pending":
        rec.status, rec.reason = "error", "stream ended without a final record"
    return rec, client_cols


def _error_message(raw: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {json.loads(raw)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {raw[:200].decode(errors='replace')}"


async def run_load_async(url: str, workload: Workload, model: str | None = None, temperature: float = 0.0,
                         seed: int = 0, timeout_s: float = 600.0, token_range: tuple[int, int] = (0, 256),
                         on_done: Callable[[int, int], None] | None = None) -> pa.Table:
    """See `run_load`."""
    url = url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits) as client:
        if model is None:
            r = await client.get(f"{url}/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        t0 = time.monotonic()
        tasks = [asyncio.create_task(_one(client, url, model, s, t0, seed, temperature, token_range))
                 for s in workload.requests]
        results = []
        for i, fut in enumerate(asyncio.as_completed(tasks)):
            results.append(await fut)
            if on_done is not None:
                on_done(i + 1, len(tasks))
    results.sort(key=lambda x: x[0].request_id)
    table = records_to_table([r for r, _ in results])
    for name, typ in CLIENT_COLUMNS.items():
        table = table.append_column(name, pa.array([c[name] for _, c in results], typ))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), T0_KEY: repr(t0).encode()})


def run_load(url: str, workload: Workload, model: str | None = None, temperature: float = 0.0, seed: int = 0,
             timeout_s: float = 600.0, token_range: tuple[int, int] = (0, 256),
             on_done: Callable[[int, int], None] | None = None) -> pa.Table:
    """Replay ``workload`` open-loop against the router at ``url``; one merged record per request (module docstring).

    ``model`` defaults to the server's first model. ``timeout_s`` bounds each request. Never raises for a failed
    request (it is recorded); raises ``httpx.HTTPError`` only if the server cannot be reached at the start.
    """
    return asyncio.run(run_load_async(url, workload, model, temperature, seed, timeout_s, token_range, on_done))
