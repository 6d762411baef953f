"""The router's core: worker links, routing, request state, retries, and the server-side `RequestRecord`.

At arrival a request is routed with the simulator's policy functions (`sim.router.POLICIES`, the same objects):
disaggregated picks a prefill AND a decode worker, colocated one worker. Router-side accounting mirrors the
simulator's: ``outstanding`` counts requests assigned and not finished (a prefill worker's count drops when the
request's KV has arrived at its decode worker); ``kv_load`` is the router's estimate of blocks promised / capacity.

Stamps (all ``time.monotonic()``, system-wide on one host) come from the workers: prefill start/end and the first
token from `Prefilled`, KV transfer start/end from `KVArrived`, decode start, every later token and the finish from
`Tokens`. ``arrival_s`` is stamped here when the HTTP request is parsed. The finished record is returned in the last
response chunk (``disagg.record``) and kept for ``GET /v1/records`` (absolute monotonic seconds; subtract your own
``time.monotonic()`` origin to get run-relative times, as `engine.loadgen` does).

Failure handling: a worker whose control link drops is marked dead; every unfinished attempt that depended on it
(a prefill worker: until its KV arrived; a decode or colocated worker: until the end) is cancelled elsewhere and
retried on live workers with the tokens generated so far as its prompt, which continues the same token sequence
(sampling is seeded per position). After ``max_retries`` or with no live worker it fails with a clear error.
A request older than ``request_timeout_s`` fails with 504.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from engine.api import ApiError, GenRequest
from engine.messages import Cancel, Failed, KVArrived, Prefilled, Query, Stats, Submit, Tokens, to_router_decoder
from engine.transport import Channel, TransportError, connect
from sim.records import RECORD_FIELDS, RequestRecord
from sim.router import get_policy

log = logging.getLogger(__name__)
NAN = math.nan


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(eq=False)
class WorkerState:
    """A worker as the router sees it; satisfies `sim.router.Routable`."""

    name: str
    role: str
    control: str
    kv: str
    capacity_blocks: int
    block_size: int
    link: Channel | None = None
    alive: bool = False
    outstanding: int = 0
    assigned_blocks: int = 0

    @property
    def kv_load(self) -> float:
        return self.assigned_blocks / self.capacity_blocks


@dataclass(eq=False)
class Req:
    id: int
    gen: GenRequest
    seed: int
    eos_id: int | None
    arrival: float
    client_id: str = ""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    rid: int = -1
    attempts: int = 0
    p: WorkerState | None = None
    d: WorkerState | None = None
    p_blocks: int = 0
    d_blocks: int = 0
    kv_in: bool = False
    got_first: bool = False
    early: list = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    rec: RequestRecord | None = None
    done: bool = False
    finish_reason: str = ""
    notes: list[str] = field(default_factory=list)
    kv_sha: tuple[str, str] = ("", "")
    kv_link: tuple[float, float] = (NAN, NAN)  # P began writing the KV into the link, D had all of it


class Router:
    """Routing and request state; runs on one asyncio loop (worker messages are marshalled onto it)."""

    def __init__(self, workers: list[WorkerState], policy: str, secret: bytes, max_outstanding: int = 1024,
                 max_retries: int = 2, request_timeout_s: float = 600.0, seed: int = 0, records_kept: int = 100_000):
        self.workers = {w.name: w for w in workers}
        self.pools = {role: [w for w in workers if w.role == role] for role in ("prefill", "decode", "colocated")}
        self.kind = "colocated" if self.pools["colocated"] else "disaggregated"
        self.policy, self.secret = get_policy(policy), secret
        self.states: dict[str, dict] = {role: {} for role in self.pools}
        self.rng = np.random.default_rng(seed)
        self.seed, self.max_outstanding, self.max_retries = seed, max_outstanding, max_retries
        self.request_timeout_s = request_timeout_s
        self.reqs: dict[int, Req] = {}
        self.by_rid: dict[int, Req] = {}
        self.records: deque[dict] = deque(maxlen=records_kept)
        self.counters = {"requests": 0, "ok": 0, "error": 0, "rejected": 0, "cancelled": 0, "retries": 0,
                         "tokens": 0}
        self._ids, self._rids, self._nonces = itertools.count(), itertools.count(1), itertools.count()
        self._stats_waiters: dict[int, asyncio.Future] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- links ---------------------------------------------------------------------------------------------------
    def connect_all(self, loop: asyncio.AbstractEventLoop, timeout_s: float = 30.0) -> None:
        """Connect to every worker's control address (blocking; call before serving). Raises `TransportError`."""
        self.loop = loop
        for w in self.workers.values():
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    w.link = connect("tcp", w.control, self.secret, timeout_s=5.0)
                    break
                except TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            w.alive = True
            w.link.start(lambda m, w=w: loop.call_soon_threadsafe(self._on_message, w, m.header),
                         lambda exc, w=w: loop.call_soon_threadsafe(self._on_lost, w, exc),
                         decoder=to_router_decoder.decode, name=w.name)

    def _send(self, w: WorkerState | None, msg: object) -> bool:
        if w is None or not w.alive or w.link is None:
            return False
        try:
            w.link.send(msg)
            return True
        except TransportError as e:
            log.warning("router: send to %s failed: %s", w.name, e)
            self._on_lost(w, e)
            return False

    # ---- admission and routing ---------------------------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self.reqs)

    def admit(self, gen: GenRequest, eos_id: int | None, client_id: str = "") -> Req:
        """Create and route a request. Raises `ApiError` 429 (too many in flight) or 503 (no live worker)."""
        rid = next(self._ids)
        req = Req(rid, gen, gen.seed if gen.seed is not None else (self.seed * 1_000_003 + rid) % 2**63,
                  None if gen.ignore_eos else eos_id, time.monotonic(), client_id)
        req.rec = RequestRecord(rid, req.arrival, len(gen.prompt_ids), gen.max_tokens)
        self.counters["requests"] += 1
        if len(self.reqs) >= self.max_outstanding:
            self._reject(req, f"server busy: {len(self.reqs)} requests in flight (limit {self.max_outstanding}); "
                              "retry later")
            raise ApiError(429, req.rec.reason, kind="rate_limit_exceeded")
        try:
            self._route(req)
        except ApiError as e:
            self._reject(req, e.message)
            raise
        self.reqs[req.id] = req
        return req

    def _reject(self, req: Req, reason: str) -> None:
        req.rec.status, req.rec.reason = "rejected", reason
        self.counters["rejected"] += 1
        self.records.append(self._record_dict(req))

    def _pick(self, role: str) -> WorkerState:
        cands = [w for w in self.pools[role] if w.alive]
        if not cands:
            raise ApiError(503, f"no live {role} worker", kind="service_unavailable")
        return cands[self.policy(cands, self.states[role], self.rng)]

    def _route(self, req: Req) -> None:
        ids = req.gen.prompt_ids + req.tokens
        todo = req.gen.max_tokens - len(req.tokens)
        if self.kind == "colocated":
            p = d = self._pick("colocated")
        else:
            p, d = self._pick("prefill"), self._pick("decode")
        req.rid = next(self._rids)
        req.attempts += 1
        req.p, req.d, req.kv_in, req.got_first, req.early = p, d, False, False, []
        self.by_rid[req.rid] = req
        req.p_blocks = blocks_for(len(ids), p.block_size)
        req.d_blocks = blocks_for(len(ids) + 1, d.block_size)
        p.outstanding += 1
        p.assigned_blocks += req.p_blocks
        if d is not p:
            d.outstanding += 1
            d.assigned_blocks += req.d_blocks
        req.rec.prefill_instance, req.rec.decode_instance = p.name, d.name
        msg = Submit(req.rid, ids, todo, req.gen.temperature, req.seed, req.eos_id,
                     "" if d is p else d.name, "" if d is p else d.kv)
        if not self._send(p, msg):
            raise ApiError(503, f"worker {p.name} is unreachable", kind="service_unavailable")

    def _release(self, req: Req, prefill: bool = True, decode: bool = True) -> None:
        """Drop the attempt's share of its workers' outstanding / kv_load (each side once)."""
        p, d = req.p, req.d
        if prefill and p is not None and d is not p:
            p.outstanding -= 1
            p.assigned_blocks -= req.p_blocks
            req.p = None
        if decode and d is not None:
            d.outstanding -= 1
            d.assigned_blocks -= req.d_blocks
            req.d = None
            if p is d:
                req.p = None

    # ---- messages from workers ---------------------------------------------------------------------------------
    def _on_message(self, w: WorkerState, m: object) -> None:
        if isinstance(m, Prefilled):
            ended = dict(m.finished)
            for rid, tok, t0 in m.items:
                req = self.by_rid.get(rid)
                if req is None:
                    continue
                r = req.rec
                if math.isnan(r.prefill_start_s):
                    r.prefill_start_s, r.prefill_end_s, r.first_token_s = t0, m.t_end, m.t_end
                req.got_first = True
                self._token(req, tok, m.t_end)
                for tok2, t2 in req.early:
                    self._token(req, tok2, t2)
                req.early = []
                if rid in ended:
                    self._finish(req, ended[rid])
        elif isinstance(m, Tokens):
            for rid, t in m.joined:
                req = self.by_rid.get(rid)
                if req is not None and math.isnan(req.rec.decode_start_s):
                    req.rec.decode_start_s = t
            for rid in m.preempted:
                if rid in self.by_rid:
                    self.by_rid[rid].rec.preemptions += 1
            for rid, tok in m.items:
                req = self.by_rid.get(rid)
                if req is None:
                    continue
                if req.got_first:
                    self._token(req, tok, m.t_end)
                else:
                    req.early.append((tok, m.t_end))
            for rid, reason in m.finished:
                req = self.by_rid.get(rid)
                if req is not None:
                    self._finish(req, reason)
        elif isinstance(m, KVArrived):
            req = self.by_rid.get(m.rid)
            if req is not None:
                req.rec.kv_transfer_start_s, req.rec.kv_transfer_end_s = m.t_start, m.t_end
                req.rec.kv_bytes = m.nbytes
                req.kv_sha, req.kv_in = (m.sent_sha256, m.received_sha256), True
                req.kv_link = (m.t_export_start or NAN, m.t_recv or NAN)
                self._release(req, decode=False)
        elif isinstance(m, Failed):
            req = self.by_rid.get(m.rid)
            if req is not None:
                if m.retryable:
                    self._retry(req, m.message)
                else:
                    self._fail(req, 500, m.message)
        elif isinstance(m, Stats):
            fut = self._stats_waiters.pop(m.nonce, None)
            if fut is not None and not fut.done():
                fut.set_result({"name": m.name, "role": m.role, **m.values})

    def _token(self, req: Req, tok: int, t: float) -> None:
        if req.done:
            return
        req.tokens.append(tok)
        req.times.append(t)
        self.counters["tokens"] += 1
        req.events.put_nowait(("token", tok))

    def _on_lost(self, w: WorkerState, exc: BaseException | None) -> None:
        if not w.alive:
            return
        w.alive = False
        log.error("router: worker %s (%s) is gone: %s", w.name, w.role, exc or "link closed")
        for req in list(self.reqs.values()):
            if req.done:
                continue
            if req.d is w or (req.p is w and not req.kv_in):
                self._retry(req, f"worker {w.name} died")

    def _retry(self, req: Req, why: str) -> None:
        if req.done:
            return
        old = req.rid
        for x in {req.p, req.d} - {None}:
            self._send(x, Cancel(old))
        self._release(req)
        self.by_rid.pop(old, None)
        req.notes.append(f"attempt {req.attempts}: {why}")
        if req.attempts > self.max_retries:
            self._fail(req, 503, f"{why}; gave up after {req.attempts} attempts")
            return
        if len(req.tokens) >= req.gen.max_tokens:
            self._finish(req, "length")
            return
        self.counters["retries"] += 1
        try:
            self._route(req)
        except ApiError as e:
            self._fail(req, 503, f"{why}; cannot retry: {e.message}")

    # ---- ending ------------------------------------------------------------------------------------------------
    def _finish(self, req: Req, reason: str, status: str = "ok") -> None:
        if req.done:
            return
        req.done, req.finish_reason = True, reason
        r = req.rec
        r.status, r.output_tokens = status, len(req.tokens)
        if req.times:
            r.last_token_s = r.finished_s = req.times[-1]
            gaps = np.diff(req.times)
            r.max_itl_s = float(gaps.max()) if gaps.size else 0.0
        if req.notes:
            r.reason = "; ".join(req.notes)
        self.by_rid.pop(req.rid, None)
        self._release(req)
        self.reqs.pop(req.id, None)
        self.counters[status if status in self.counters else "error"] += 1
        self.records.append(self._record_dict(req))
        if status == "ok":
            req.events.put_nowait(("done", reason))

    def _fail(self, req: Req, http_status: int, message: str, status: str = "error") -> None:
        if req.done:
            return
        req.notes.append(message)
        for x in {req.p, req.d} - {None}:
            self._send(x, Cancel(req.rid))
        self._finish(req, "error", status)
        req.events.put_nowait(("error", http_status, message))

    def abort(self, req: Req, why: str) -> None:
        """The client went away (or timed out): cancel on the workers, free their KV, record it."""
        self._fail(req, 499, why, status="cancelled")

    def expire(self) -> None:
        """Fail requests older than ``request_timeout_s`` (called periodically)."""
        now = time.monotonic()
        for req in list(self.reqs.values()):
            if now - req.arrival > self.request_timeout_s:
                self._fail(req, 504, f"request timed out after {self.request_timeout_s:g} s")

    def _record_dict(self, req: Req) -> dict:
        d = {k: getattr(req.rec, k) for k in RECORD_FIELDS}
        d = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}  # JSON has no NaN
        d.update(client_request_id=req.client_id, attempts=req.attempts, finish_reason=req.finish_reason,
                 kv_sha256_sent=req.kv_sha[0], kv_sha256_received=req.kv_sha[1],
                 kv_export_start_s=None if math.isnan(req.kv_link[0]) else req.kv_link[0],
                 kv_recv_s=None if math.isnan(req.kv_link[1]) else req.kv_link[1])
        return d

    def record(self, req: Req) -> dict:
        return self._record_dict(req)

    async def worker_stats(self, timeout_s: float = 2.0) -> list[dict]:
        """Each worker's `Stats` plus the router's view (alive, outstanding, kv_load); dead ones say so."""
        out, waits = [], []
        for w in self.workers.values():
            view = {"name": w.name, "role": w.role, "alive": w.alive, "outstanding": w.outstanding,
                    "kv_load": w.kv_load}
            fut = None
            if w.alive:
                nonce = next(self._nonces)
                fut = asyncio.get_running_loop().create_future()
                self._stats_waiters[nonce] = fut
                self._send(w, Query(nonce))
            out.append(view)
            waits.append(fut)
        for view, fut in zip(out, waits):
            if fut is None:
                continue
            try:
                view.update(await asyncio.wait_for(fut, timeout_s))
            except TimeoutError:
                view["stats_error"] = f"no answer within {timeout_s} s"
        return out
