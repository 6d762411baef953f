"""OpenAI-compatible request parsing and response shapes for the router (``/v1/completions``, ``/v1/chat/completions``).

Supported: ``model``, ``prompt`` (a string, a list of token ids, or a one-element list of either), ``messages``
(chat; rendered as ``"role: content\\n"`` lines followed by ``"assistant:"``), ``max_tokens`` /
``max_completion_tokens``, ``temperature`` (0 = greedy, default 1), ``seed``, ``stream``,
``stream_options.include_usage``, and the vLLM-style extension ``ignore_eos``. ``n``, ``best_of`` must be 1;
``top_p`` 1; ``stop``, ``logprobs``, ``echo`` and penalties must be absent or neutral. Unknown fields are ignored.

Every problem raises `ApiError` with an HTTP status and a message naming the field: malformed JSON or types (400),
an unknown model (404), a prompt plus ``max_tokens`` longer than the model's context or one instance's KV capacity
(400). Responses carry the extension field ``token_ids`` per choice (the generated ids, exact) and, on the last
chunk, ``disagg`` with the request's server-side record (see `engine.router`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request

MAX_BODY_BYTES = 8 << 20
SEED_RANGE = (-(2**63), 2**64)


class ApiError(Exception):
    """A client error: ``status`` (4xx/5xx), a message, and the offending parameter when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model and cluster (sizes in tokens)."""

    name: str
    tokenizer: Any
    vocab_size: int
    max_context_tokens: int
    capacity_tokens: int  # the smallest instance's KV capacity
    eos_id: int | None


@dataclass(frozen=True)
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int | None
    ignore_eos: bool
    stream: bool
    include_usage: bool
    chat: bool


def parse_json(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _int(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{key}' must be an integer, got {type(v).__name__}", key)
    if v < lo or (hi is not None and v >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ApiError(400, f"'{key}' must be {rng}, got {v}", key)
    return v


def _neutral(body: dict, key: str, ok: tuple) -> None:
    if key in body and body[key] not in ok:
        raise ApiError(400, f"'{key}' = {body[key]!r} is not supported (allowed: {', '.join(map(repr, ok))})", key)


def _tokens(prompt: Any, info: ModelInfo) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = info.tokenizer.encode(prompt)
        if info.tokenizer.bos_id is not None and info.vocab_size != 259:
            ids = [info.tokenizer.bos_id, *ids]
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < info.vocab_size]
        if bad:
            raise ApiError(400, f"'prompt' token id {bad[0]} is outside the vocabulary [0, {info.vocab_size})", "prompt")
    elif isinstance(prompt, list):
        raise ApiError(400, "'prompt' must be a string or a list of token ids (batched prompts are not supported)",
                       "prompt")
    else:
        raise ApiError(400, f"'prompt' must be a string or a list of token ids, got {type(prompt).__name__}", "prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty", "prompt")
    return ids


def render_chat(messages: Any) -> str:
    """Chat messages as plain text: ``"role: content\\n"`` per message, then ``"assistant:"``."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        lines.append(f"{m['role']}: {content}\n")
    return "".join(lines) + "assistant:"


def parse_request(body: dict, info: ModelInfo, chat: bool) -> GenRequest:
    """Validate a completions (``chat=False``) or chat request body. Raises `ApiError`."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (a string)", "model")
    if model != info.name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {info.name!r}", "model",
                       "model_not_found")
    if chat:
        ids = _tokens(render_chat(body.get("messages")), info)
    else:
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", "prompt")
        ids = _tokens(body["prompt"], info)
    n = len(ids)
    ctx, cap = info.max_context_tokens, info.capacity_tokens
    if n >= ctx:
        raise ApiError(400, f"prompt of {n} tokens does not fit the model's context of {ctx} tokens", "prompt")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    room = min(ctx, cap - 1) - n
    max_tokens = _int(body, key, None, 1)
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)
    if max_tokens < 1 or n + max_tokens > ctx:
        raise ApiError(400, f"prompt ({n} tokens) + {key} ({max_tokens}) = {n + max_tokens} exceeds the model's "
                       f"context of {ctx} tokens", key)
    if n + max_tokens + 1 > cap:
        raise ApiError(400, f"prompt ({n} tokens) + {key} ({max_tokens}) needs more KV than one instance holds "
                       f"({cap} tokens)", key)
    temp = body.get("temperature", 1.0)
    temp = 1.0 if temp is None else temp
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (0 <= temp <= 2 and math.isfinite(temp)):
        raise ApiError(400, f"'temperature' must be a number in [0, 2], got {temp!r}", "temperature")
    seed = _int(body, "seed", None, *SEED_RANGE)
    for key, ok in (("n", (None, 1)), ("best_of", (None, 1)), ("top_p", (None, 1, 1.0)), ("echo", (None, False)),
                    ("logprobs", (None, False, 0)), ("stop", (None, "", [])), ("frequency_penalty", (None, 0, 0.0)),
                    ("presence_penalty", (None, 0, 0.0)), ("suffix", (None, ""))):
        _neutral(body, key, ok)
    stream = body.get("stream", False)
    ignore_eos = body.get("ignore_eos", False)
    for key, v in (("stream", stream), ("ignore_eos", ignore_eos)):
        if not isinstance(v, bool) and v is not None:
            raise ApiError(400, f"'{key}' must be a boolean", key)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return GenRequest(ids, max_tokens, float(temp), seed, bool(ignore_eos), bool(stream),
                      bool(opts.get("include_usage", False)), chat)


def chunk(req_id: str, created: int, model: str, chat: bool, text: str, token_ids: list[int],
          finish_reason: str | None, extra: dict | None = None) -> dict:
    """One streaming chunk (``text_completion`` or ``chat.completion.chunk``)."""
    if chat:
        choice = {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None, "token_ids": token_ids}
        out = {"id": req_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [choice]}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None, "token_ids": token_ids}
        out = {"id": req_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if extra:
        out.update(extra)
    return out


def full_response(req_id: str, created: int, model: str, chat: bool, text: str, token_ids: list[int],
                  finish_reason: str, usage: dict, extra: dict) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None, "token_ids": token_ids}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None, "token_ids": token_ids}
        obj = "text_completion"
    return {"id": req_id, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage,
            **extra}


def sse_event(obj: dict) -> str:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def add_openai_routes(app: Any, generate: Any, info: ModelInfo, records: Any, owned_by: str = "disagg") -> None:
    """Register what both routers (built-in and vLLM backend) serve alike on a FastAPI ``app``: the `ApiError`
    handler, ``/v1/models``, ``/v1/records`` (``records()`` returns the kept server-side records) and OpenAI's
    ``/v1/completions`` and ``/v1/chat/completions``, both served by ``async generate(request, chat: bool)``."""
    import time

    from fastapi.responses import JSONResponse

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": info.name, "object": "model", "owned_by": owned_by,
                                            "max_model_len": info.max_context_tokens}]}

    @app.get("/v1/records")
    async def records_route() -> dict:
        return {"clock": "monotonic", "now": time.monotonic(), "records": list(records())}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)
