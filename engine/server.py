"""The router process: FastAPI app over `engine.router.Router`, run by uvicorn (``python -m engine.server SPEC``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming and not), ``GET /v1/models``,
``GET /health`` (status ok / degraded when a worker died / unavailable = 503 when a role has no live worker), ``GET /metrics`` (Prometheus text), ``GET /v1/records``
(server-side records, absolute ``time.monotonic()`` seconds), ``GET /v1/workers`` (live per-worker stats).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400/404/413 bad input, 429 too many
requests in flight, 503 no live worker, 504 timed out. A failure after streaming began arrives as an SSE event with
an ``error`` object (the openai client raises it). A client that disconnects has its request cancelled on the
workers, which free its KV.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from engine.api import (
    ApiError,
    ModelInfo,
    add_openai_routes,
    chunk,
    full_response,
    parse_json,
    parse_request,
    sse_event,
)
from engine.router import Req, Router, WorkerState

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5


class Detokenizer:
    """Incremental text: each call returns the new suffix, holding back an incomplete UTF-8 tail (U+FFFD)."""

    def __init__(self, tokenizer: object):
        self.tok, self.sent = tokenizer, 0

    def delta(self, ids: list[int], final: bool = False) -> str:
        text = self.tok.decode(ids)  # type: ignore[attr-defined]
        end = len(text) if final else len(text.rstrip("\ufffd"))
        out = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


async def _next_event(req: Req, request: Request | None) -> tuple:
    """The request's next event; raises ConnectionAbortedError if the client left meanwhile (non-streaming only)."""
    while True:
        try:
            return await asyncio.wait_for(req.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if request is not None and await request.is_disconnected():
                raise ConnectionAbortedError from None


def create_app(router: Router, info: ModelInfo) -> FastAPI:
    app = FastAPI(title="disagg router", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        live = {role: sum(w.alive for w in ws) for role, ws in router.pools.items() if ws}
        serving = all(n > 0 for n in live.values())
        every = all(w.alive for w in router.workers.values())
        status = "ok" if every else "degraded" if serving else "unavailable"
        return JSONResponse({"status": status, "live_workers": live,
                             "workers": {w.name: w.alive for w in router.workers.values()}},
                            status_code=200 if serving else 503)

    @app.get("/v1/workers")
    async def workers() -> dict:
        return {"workers": await router.worker_stats()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lines = [f"disagg_requests_total{{status=\"{k}\"}} {v}" for k, v in router.counters.items() if k != "tokens"]
        lines.append(f"disagg_output_tokens_total {router.counters['tokens']}")
        lines.append(f"disagg_requests_in_flight {router.in_flight()}")
        for w in router.workers.values():
            lab = f'worker="{w.name}",role="{w.role}"'
            lines += [f"disagg_worker_alive{{{lab}}} {int(w.alive)}",
                      f"disagg_worker_outstanding{{{lab}}} {w.outstanding}",
                      f"disagg_worker_kv_load{{{lab}}} {w.kv_load:.6f}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def generate(request: Request, chat: bool):
        gen = parse_request(parse_json(await request.body()), info, chat)
        req = router.admit(gen, info.eos_id, request.headers.get("x-request-id", ""))
        try:
            first = await _next_event(req, request)
        except (ConnectionAbortedError, asyncio.CancelledError):
            router.abort(req, "client disconnected before the first token")
            raise
        if first[0] == "error":
            raise ApiError(first[1], first[2], kind="server_error" if first[1] >= 500 else "invalid_request_error")
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{req.id}", int(time.time())
        detok = Detokenizer(info.tokenizer)
        if not gen.stream:
            ev = first
            try:
                while ev[0] == "token":
                    ev = await _next_event(req, request)
            except (ConnectionAbortedError, asyncio.CancelledError):
                router.abort(req, "client disconnected")
                raise
            if ev[0] == "error":
                raise ApiError(ev[1], ev[2], kind="server_error")
            usage = _usage(req)
            return JSONResponse(full_response(rid, created, info.name, chat, detok.delta(req.tokens, True),
                                              req.tokens, ev[1], usage, {"disagg": {"record": router.record(req)}}))

        async def sse():
            ev, n = first, 0
            try:
                while True:
                    if ev[0] == "token":
                        n += 1
                        text = detok.delta(req.tokens[:n])
                        yield sse_event(chunk(rid, created, info.name, chat, text, [ev[1]], None))
                    elif ev[0] == "done":
                        tail = detok.delta(req.tokens, True)
                        extra = {"disagg": {"record": router.record(req)}}
                        yield sse_event(chunk(rid, created, info.name, chat, tail, [], ev[1], extra))
                        if gen.include_usage:
                            yield sse_event({"id": rid, "object": "text_completion", "created": created,
                                        "model": info.name, "choices": [], "usage": _usage(req)})
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        yield sse_event({"error": {"message": ev[2], "type": "server_error", "code": ev[1]}})
                        yield "data: [DONE]\n\n"
                        return
                    ev = await req.events.get()
            finally:
                if not req.done:
                    router.abort(req, "client disconnected")

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-disagg-request-id": str(req.id)})

    add_openai_routes(app, generate, info, lambda: router.records, owned_by="disagg")
    return app


def _usage(req: Req) -> dict:
    n, m = len(req.gen.prompt_ids), len(req.tokens)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def model_info(model_dir: str, name: str, capacity_tokens: int) -> ModelInfo:
    """Read the served model's vocabulary, context and EOS from its folder (no torch import)."""
    from engine.model.tokenizer import load_tokenizer

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    tok = load_tokenizer(model_dir)
    eos = cfg.get("eos_token_id", tok.eos_id)
    eos = eos[0] if isinstance(eos, list) else eos
    return ModelInfo(name, tok, int(cfg["vocab_size"]), int(cfg.get("max_position_embeddings", 2048)),
                     capacity_tokens, eos)


async def _serve(spec: dict) -> None:
    import uvicorn

    from engine.transport import secret_from_env

    workers = [WorkerState(**w) for w in spec["workers"]]
    router = Router(workers, spec["policy"], secret_from_env(), spec["max_outstanding"], spec["max_retries"],
                    spec["request_timeout_s"], spec["seed"])
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, router.connect_all, loop)
    cap = min(w.capacity_blocks * w.block_size for w in workers)
    app = create_app(router, model_info(spec["model_dir"], spec["model_name"], cap))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((spec["host"], spec["port"]))
    sock.listen(1024)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                                           timeout_keep_alive=30))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    spec["_serving"] = True

    async def janitor() -> None:
        while True:
            await asyncio.sleep(1.0)
            router.expire()
    jan = asyncio.create_task(janitor())
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
        jan.cancel()
        if spec.get("records_path"):
            _write_records(list(router.records), spec["records_path"])


def _write_records(rows: list[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sim.records import RECORD_SCHEMA

    nan = float("nan")
    cols = {f.name: pa.array([nan if r[f.name] is None and f.type == pa.float64() else r[f.name] for r in rows], f.type)
            for f in RECORD_SCHEMA}
    extra = {k: pa.array([r.get(k) for r in rows]) for k in ("client_request_id", "attempts", "finish_reason")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({**cols, **extra}), path)
    log.info("wrote %d server-side records to %s (monotonic clock)", len(rows), path)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if parent_pid and os.getppid() != parent_pid:
            os._exit(3)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("DISAGG_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    # uvicorn handles SIGINT/SIGTERM while serving and re-raises them afterwards; a no-op handler here lets the
    # shutdown path (writing the records) finish instead of dying on the re-raised signal
    def on_signal(*_: object) -> None:
        if not spec.get("_serving"):
            raise SystemExit(0)  # still starting up: just leave
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    threading.Thread(target=_watch_parent, args=(spec.get("parent_pid", 0),), daemon=True).start()
    asyncio.run(_serve(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
