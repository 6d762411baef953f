"""disagg's router in front of vLLM OpenAI servers (``python -m engine.vllm_backend.proxy SPEC.json``).

Same client API as `engine.server` (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``,
``/v1/records``; requests parsed and validated by `engine.api.parse_request`, chunks shaped by `engine.api.chunk` with
``token_ids`` per choice and the server-side record under ``disagg.record`` in the last chunk), so `engine.loadgen`
drives either backend. Prompts are forwarded to vLLM as token ids with ``return_token_ids``.

Routing: the simulator's policies (`sim.router.POLICIES`) over the instances' outstanding counts.
  * colocated (``C*``): one streaming request to the chosen instance.
  * disaggregated (``P*`` + ``D*``, NIXL connector): a non-streaming prefill request (``max_tokens=1``,
    ``kv_transfer_params={"do_remote_decode": true}``) to P; its response's ``kv_transfer_params`` go with the
    streaming decode request to D, which pulls the prompt's KV from P over NIXL and produces every output token
    (the token P sampled is discarded: D recomputes it from the transferred KV).

Lifecycle stamps (``time.monotonic()``, taken here — vLLM's own iteration timing is not in its responses)::

    arrival_s            the HTTP request is parsed
    prefill_start_s      the prefill (colocated: the only) request is sent
    prefill_end_s        disaggregated: P's response arrived; colocated: the first token arrived
    kv_transfer_start_s  disaggregated: the decode request is sent with P's transfer parameters
    decode_start_s       == kv_transfer_start_s (disaggregated); == first token (colocated)
    kv_transfer_end_s    disaggregated: the first token arrived from D (NIXL pull + D's first step; an upper bound)
    first_token_s        the first output token arrived (disaggregated: from D, after the KV pull — so unlike the
                         built-in engine, TTFT here includes the KV transfer)
    last_token_s         the last output token arrived; finished_s == last_token_s
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine import api
from sim.records import RECORD_FIELDS, RequestRecord
from sim.router import get_policy

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Instance:
    """One vLLM server as the router sees it; satisfies `sim.router.Routable`."""

    name: str
    role: str  # prefill | decode | colocated
    url: str
    outstanding: int = 0

    @property
    def kv_load(self) -> float:
        return 0.0  # vLLM's KV usage is not polled; policies fall back to outstanding counts


class UpstreamError(Exception):
    """A vLLM instance answered with an error or not at all."""


class VllmRouter:
    """Request routing and records for vLLM instances; one asyncio loop."""

    def __init__(self, instances: list[Instance], policy: str, model: str, seed: int = 0, timeout_s: float = 600.0):
        self.pools = {r: [i for i in instances if i.role == r] for r in ("prefill", "decode", "colocated")}
        self.kind = "colocated" if self.pools["colocated"] else "disaggregated"
        if self.kind == "disaggregated" and not (self.pools["prefill"] and self.pools["decode"]):
            raise ValueError("a disaggregated vLLM topology needs prefill and decode instances")
        self.instances, self.policy, self.model = instances, get_policy(policy), model
        self.states: dict[str, dict] = {r: {} for r in self.pools}
        self.rng = np.random.default_rng(seed)
        self.records: deque[dict] = deque(maxlen=100_000)
        self.ids = itertools.count()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def pick(self, role: str) -> Instance:
        pool = self.pools[role]
        return pool[self.policy(pool, self.states[role], self.rng)]

    def _body(self, ids: list[int], max_tokens: int, gen, stream: bool) -> dict:
        body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": gen.temperature,
                "ignore_eos": gen.ignore_eos, "stream": stream, "return_token_ids": True}
        if gen.seed is not None:
            body["seed"] = gen.seed
        return body

    async def prefill(self, p: Instance, gen, rec: RequestRecord) -> dict:
        """P/D step 1: prefill on ``p`` (max_tokens=1); returns the KV transfer parameters for the decode side."""
        body = self._body(gen.prompt_ids, 1, gen, False)
        body["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                      "remote_block_ids": None, "remote_host": None, "remote_port": None}
        rec.prefill_start_s = time.monotonic()
        r = await self.client.post(f"{p.url}/v1/completions", json=body)
        rec.prefill_end_s = time.monotonic()
        if r.status_code != 200:
            raise UpstreamError(f"prefill instance {p.name}: HTTP {r.status_code}: {r.text[:300]}")
        params = r.json().get("kv_transfer_params")
        if not params:
            raise UpstreamError(f"prefill instance {p.name} returned no kv_transfer_params (is it started with the "
                                "NIXL connector?)")
        return params

    async def stream(self, inst: Instance, gen, rec: RequestRecord, kv_params: dict | None):
        """Stream ``(token_ids, finish_reason)`` from ``inst``; stamps the record's decode-side phases."""
        body = self._body(gen.prompt_ids, gen.max_tokens, gen, True)
        if kv_params is not None:
            body["kv_transfer_params"] = kv_params
        sent = time.monotonic()
        if kv_params is not None:
            rec.kv_transfer_start_s = rec.decode_start_s = sent
        else:
            rec.prefill_start_s = sent
        async with self.client.stream("POST", f"{inst.url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise UpstreamError(f"instance {inst.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    raise UpstreamError(f"instance {inst.name}: {obj['error']}")
                for ch in obj.get("choices", []):
                    ids = ch.get("token_ids") or []
                    if ids and math.isnan(rec.first_token_s):
                        now = time.monotonic()
                        rec.first_token_s = now
                        if kv_params is not None:
                            rec.kv_transfer_end_s = now
                        else:
                            rec.prefill_end_s = rec.decode_start_s = now
                    if ids or ch.get("finish_reason"):
                        yield ids, ch.get("finish_reason")

    async def generate(self, gen, client_id: str):
        """Yield ``("token", ids)`` ... then ``("done", finish_reason, record_dict)`` or ``("error", message)``."""
        rid = next(self.ids)
        rec = RequestRecord(rid, time.monotonic(), len(gen.prompt_ids), gen.max_tokens)
        if self.kind == "colocated":
            p = d = self.pick("colocated")
        else:
            p, d = self.pick("prefill"), self.pick("decode")
        rec.prefill_instance, rec.decode_instance = p.name, d.name
        for x in {p, d}:
            x.outstanding += 1
        n, times, reason, p_busy = 0, [], "length", d is not p
        try:
            kv = await self.prefill(p, gen, rec) if d is not p else None
            if p_busy:
                p.outstanding, p_busy = p.outstanding - 1, False
            async for ids, fr in self.stream(d, gen, rec, kv):
                now = time.monotonic()
                n += len(ids)
                times += [now] * len(ids)
                reason = fr or reason
                if ids:
                    yield ("token", ids)
            rec.status = "ok"
        except (UpstreamError, httpx.HTTPError) as e:
            rec.status, rec.reason = "error", f"{type(e).__name__}: {e}"
        except asyncio.CancelledError:
            rec.status, rec.reason = "cancelled", "client disconnected"
            raise
        finally:
            if p_busy:
                p.outstanding -= 1
            d.outstanding -= 1
            rec.output_tokens = n
            if times:
                rec.last_token_s = rec.finished_s = times[-1]
                gaps = np.diff(times)
                rec.max_itl_s = float(gaps.max()) if gaps.size else 0.0
            row = self._row(rec, client_id, reason)
            self.records.append(row)
        if rec.status == "ok":
            yield ("done", reason, row)
        else:
            yield ("error", rec.reason)

    @staticmethod
    def _row(rec: RequestRecord, client_id: str, reason: str) -> dict:
        d = {k: getattr(rec, k) for k in RECORD_FIELDS}
        d = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}
        d.update(client_request_id=client_id, attempts=1, finish_reason=reason)
        return d


def create_app(router: VllmRouter, info: api.ModelInfo) -> FastAPI:
    """The OpenAI-compatible front (see the module docstring)."""
    response_ids = itertools.count()
    app = FastAPI(title="disagg router (vLLM backend)", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = {}
        for i in router.instances:
            try:
                ok[i.name] = (await router.client.get(f"{i.url}/health", timeout=5.0)).status_code == 200
            except httpx.HTTPError:
                ok[i.name] = False
        good = all(ok.values())
        return JSONResponse({"status": "ok" if good else "unavailable", "workers": ok, "backend": "vllm"},
                            status_code=200 if good else 503)

    async def generate(request: Request, chat: bool):
        gen = api.parse_request(api.parse_json(await request.body()), info, chat)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{next(response_ids)}", int(time.time())
        events = router.generate(gen, request.headers.get("x-request-id", ""))
        if not gen.stream:
            ids: list[int] = []
            async for ev in events:
                if ev[0] == "token":
                    ids += ev[1]
                elif ev[0] == "error":
                    raise api.ApiError(502, ev[1], kind="server_error")
                else:
                    usage = {"prompt_tokens": len(gen.prompt_ids), "completion_tokens": len(ids),
                             "total_tokens": len(gen.prompt_ids) + len(ids)}
                    text = info.tokenizer.decode(ids)
                    return JSONResponse(api.full_response(rid, created, info.name, chat, text, ids, ev[1], usage,
                                                          {"disagg": {"record": ev[2]}}))

        async def sse():
            ids: list[int] = []
            async for ev in events:
                if ev[0] == "token":
                    before = info.tokenizer.decode(ids)
                    ids += ev[1]
                    text = info.tokenizer.decode(ids)[len(before):]
                    yield api.sse_event(api.chunk(rid, created, info.name, chat, text, ev[1], None))
                elif ev[0] == "done":
                    last = {"disagg": {"record": ev[2]}}
                    yield api.sse_event(api.chunk(rid, created, info.name, chat, "", [], ev[1], last))
                else:
                    yield api.sse_event({"error": {"message": ev[1], "type": "server_error", "code": 502}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    api.add_openai_routes(app, generate, info, lambda: router.records, owned_by="disagg+vllm")
    return app


async def _serve(spec: dict) -> None:
    import uvicorn

    from engine.server import _write_records, model_info

    insts = [Instance(**i) for i in spec["instances"]]
    router = VllmRouter(insts, spec["policy"], spec["model_name"], spec["seed"])
    app = create_app(router, model_info(spec["model_dir"], spec["model_name"], spec["capacity_tokens"]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((spec["host"], spec["port"]))
    sock.listen(1024)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    spec["_serving"] = True
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if spec.get("ready_path") and server.started:
        host, port = sock.getsockname()[:2]
        tmp = Path(spec["ready_path"] + ".tmp")
        tmp.write_text(json.dumps({"url": f"http://{host}:{port}", "pid": os.getpid()}))
        tmp.replace(spec["ready_path"])
    try:
        await task
    finally:
        await router.client.aclose()
        if spec.get("records_path"):
            _write_records(list(router.records), spec["records_path"])


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("DISAGG_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s vllm-router %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text())

    def on_signal(*_: object) -> None:  # uvicorn handles the signal while serving; see engine.server.main
        if not spec.get("_serving"):
            raise SystemExit(0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    parent = spec.get("parent_pid", 0)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if parent and os.getppid() != parent:
                os._exit(3)
    threading.Thread(target=watch, daemon=True).start()
    asyncio.run(_serve(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
