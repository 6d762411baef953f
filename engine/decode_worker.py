"""Decode worker (disaggregated) and colocated worker: continuous batching over the paged KV cache.

Scheduling mirrors `sim.decode_instance.DecodeInstance`, one loop iteration per step boundary:

1. preempted requests are recomputed first (a prefill of their whole context) when there is `_headroom` for them;
2. requests whose KV has arrived (``ready``) join the batch, up to ``max_batch_size``;
3. colocated only, prefill-first: a waiting prompt batch runs now (FCFS, ``max_batch_tokens``, blocks for
   prompt + 1), or with ``chunked_prefill`` one mixed iteration carries every running request's next token plus
   prompt chunks up to the token budget (`engine.colocated_steps`);
4. otherwise one decode step for the whole batch; if the batch cannot grow by one token, the most recently admitted
   request is preempted (its blocks freed) instead.

Disaggregated KV admission: a `KVReady` queues in ``incoming`` (FIFO). Whenever there is headroom for the head
(blocks for context + 2 tokens next to the running batch's next step, as in the simulator) and nothing waits for
recompute, blocks for context + 1 tokens are reserved and the KV pulled from the prefill worker
(``kv_transfer_start_s``). The link's reader thread imports the body into the reserved blocks as it arrives
(``kv_transfer_end_s``) and the request joins at the next step boundary (``decode_start_s``). Finishing requests
free blocks and restart admission, as in the simulator.

Locking: ``lock`` guards every queue and the block allocator; model steps run outside it on blocks already
reserved. A cancel only marks a request that a step may be using; the loop frees it at the next boundary.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from engine.colocated_steps import ColocatedSteps
from engine.kv_ship import import_blocks
from engine.messages import Failed, KVArrived, KVData, KVDrop, KVMissing, KVPull, KVReady, Submit, Tokens, peer_decoder
from engine.model.kv_cache import DTYPES
from engine.model.runner import SamplingParams, Sequence
from engine.transport import Channel, TransportError, listen
from engine.worker import WorkerBase, blocks_for

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.2
RECENT_CANCELS = 10_000


@dataclass(eq=False)
class DSeq:
    rid: int
    seq: Sequence
    remaining: int  # tokens still to produce
    eos_id: int | None
    prompt_len: int
    link: Channel | None = None  # disaggregated: the prefill worker holding the KV
    order: int = 0
    cancelled: bool = False
    t_kv_start: float = 0.0
    t_prefill: float = 0.0  # colocated: start of its (first chunk's) prefill

    @property
    def context(self) -> int:
        return len(self.seq.token_ids) - 1


class DecodeWorker(ColocatedSteps, WorkerBase):
    def __init__(self, spec, runner, secret):
        WorkerBase.__init__(self, spec, runner, secret)
        import threading

        self.lock = threading.Lock()
        self.colocated = spec.role == "colocated"
        self.incoming: deque[DSeq] = deque()
        self.pulling: dict[int, DSeq] = {}
        self.ready: deque[DSeq] = deque()
        self.prefill_q: deque[DSeq] = deque()
        self.preempted: deque[DSeq] = deque()
        self.running: list[DSeq] = []
        self.cancelled: OrderedDict[int, None] = OrderedDict()
        self._order = 0
        self._joined: list[tuple[int, float]] = []
        self._preempted_now: list[int] = []
        self.counters = {"steps": 0, "tokens": 0, "finished": 0, "preemptions": 0, "kv_received": 0,
                         "kv_received_bytes": 0}
        if not self.colocated:
            self.kv_listener = listen(spec.transport, secret, self._on_prefill_link, host=spec.host)
            self.kv_address = self.kv_listener.address

    # ---- router side -------------------------------------------------------------------------------------------
    def submit(self, m: Submit) -> None:
        if not self.colocated:
            self.to_router(Failed(m.rid, f"{self.name} is a decode worker; submit to a prefill worker"))
            return
        s = DSeq(m.rid, Sequence(m.rid, list(m.token_ids), SamplingParams(m.temperature, m.seed)), m.max_tokens,
                 m.eos_id, len(m.token_ids))
        with self.lock:
            full = len(self.prefill_q) >= self.spec.queue_limit
            if not full:
                self.prefill_q.append(s)
        if full:
            self.to_router(Failed(m.rid, f"{self.name}: queue full ({self.spec.queue_limit})", retryable=True))
        self.wake.set()

    def cancel(self, rid: int) -> None:
        with self.lock:
            self.cancelled[rid] = None
            while len(self.cancelled) > RECENT_CANCELS:
                self.cancelled.popitem(last=False)
            for s in self.incoming:
                if s.rid == rid:
                    self.incoming.remove(s)
                    self._drop_at_source(s)
                    break
            for group in (self.pulling.values(), self.ready, self.running, self.preempted, self.prefill_q):
                for s in group:
                    if s.rid == rid:
                        s.cancelled = True
        self.wake.set()

    def stats_values(self) -> dict[str, float]:
        with self.lock:
            return {"queue": len(self.prefill_q), "incoming": len(self.incoming), "pulling": len(self.pulling),
                    "ready": len(self.ready), "running": len(self.running), "preempted": len(self.preempted),
                    **self.counters, **self.kv_stats()}

    # ---- KV links from prefill workers -------------------------------------------------------------------------
    def _on_prefill_link(self, ch: Channel) -> None:
        ch.start(lambda m: self._on_peer(ch, m), lambda exc: self._on_link_lost(ch, exc), decoder=peer_decoder.decode)

    def _on_peer(self, ch: Channel, msg) -> None:
        m = msg.header
        if isinstance(m, KVReady):
            s = DSeq(m.rid, Sequence(m.rid, list(m.token_ids), SamplingParams(m.temperature, m.seed)), m.max_tokens,
                     m.eos_id, m.num_tokens, link=ch)
            with self.lock:
                if m.rid in self.cancelled:
                    self._drop_at_source(s)
                else:
                    self.incoming.append(s)
                    self._start_transfers()
        elif isinstance(m, KVData):
            self._receive(ch, msg, m)
        elif isinstance(m, KVMissing):
            with self.lock:
                s = self.pulling.pop(m.rid, None)
                if s is not None:
                    self.runner.free(s.seq)
                    self._start_transfers()

    def _drop_at_source(self, s: DSeq) -> None:
        try:
            s.link.send(KVDrop(s.rid))  # type: ignore[union-attr]
        except TransportError:
            pass

    def _start_transfers(self) -> None:
        """Reserve blocks and pull KV for the incoming head while it fits (caller holds ``lock``)."""
        bs = self.spec.block_size
        while self.incoming and not self.preempted:
            s = self.incoming[0]
            if not self._headroom(blocks_for(s.context + 2, bs)):
                break
            self.incoming.popleft()
            self.runner.reserve([s.seq], [s.context + 1])
            s.t_kv_start = time.monotonic()
            self.pulling[s.rid] = s
            try:
                s.link.send(KVPull(s.rid))  # type: ignore[union-attr]
            except TransportError:
                self.pulling.pop(s.rid)
                self.runner.free(s.seq)
                self.to_router(Failed(s.rid, f"{self.name}: prefill worker unreachable for KV", retryable=True))

    def _receive(self, ch: Channel, msg, m: KVData) -> None:
        with self.lock:
            s = self.pulling.get(m.rid)
        if s is None or s.cancelled:
            ch.release(msg)
            if s is not None:
                with self.lock:
                    self.pulling.pop(m.rid, None)
                    self.runner.free(s.seq)
                    self._start_transfers()
            return
        body = msg.body
        data = body if isinstance(body, torch.Tensor) else torch.frombuffer(body, dtype=torch.uint8)
        got = hashlib.sha256(body).hexdigest() if m.sha256 and not isinstance(body, torch.Tensor) else ""
        ok = True
        try:
            import_blocks(self.runner.cache, s.seq.block_table, data.view(DTYPES[m.dtype]).view(m.shape),
                          m.num_tokens, m.block_size)
            s.seq.num_cached_tokens = m.num_tokens
        except (ValueError, RuntimeError) as e:
            ok = False
            self.to_router(Failed(s.rid, f"{self.name}: bad KV from {s.link.peer}: {e}"))  # type: ignore[union-attr]
        del data, body
        ch.release(msg)
        if m.sha256 and got != m.sha256:
            ok = False
            self.to_router(Failed(s.rid, f"{self.name}: KV checksum mismatch for request {s.rid}"))
        t_end = time.monotonic()
        with self.lock:
            self.pulling.pop(s.rid, None)
            self.counters["kv_received"] += 1
            self.counters["kv_received_bytes"] += msg.nbytes
            if ok:
                self.ready.append(s)
            else:
                self.runner.free(s.seq)
                self._start_transfers()
        if ok:
            self.to_router(KVArrived(s.rid, s.t_kv_start, t_end, msg.nbytes, m.t_export_start, msg.t_recv, m.sha256, got))
        self.wake.set()

    def _on_link_lost(self, ch: Channel, exc: BaseException | None) -> None:
        with self.lock:
            lost = [s for s in self.incoming if s.link is ch]
            for s in lost:
                self.incoming.remove(s)
            for rid, s in list(self.pulling.items()):
                if s.link is ch:
                    del self.pulling[rid]
                    self.runner.free(s.seq)
                    lost.append(s)
            self._start_transfers()
        for s in lost:
            self.to_router(Failed(s.rid, f"{self.name}: link to prefill worker {ch.peer} lost", retryable=True))

    # ---- the step loop -----------------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            self._reap_cancelled()
            if self.preempted and self._recompute():
                continue
            with self.lock:
                while self.ready and len(self.running) < self.spec.max_batch_size:
                    self._join(self.ready.popleft())
            if self.colocated and self.prefill_q:
                step = self._mixed_iteration if self.spec.chunked_prefill else self._prefill_batch
                if step():
                    continue
            if not self.running:
                self.wake.wait(IDLE_WAIT_S)
                continue
            self._decode_step()

    def growth(self) -> int:
        """Blocks the running batch still needs for its next (or in-progress) step (caller holds ``lock``)."""
        bs = self.spec.block_size
        return sum(max(0, blocks_for(len(s.seq.token_ids), bs) - len(s.seq.block_table)) for s in self.running)

    def _headroom(self, need: int) -> bool:
        """Can ``need`` blocks be taken and still leave the running batch room for its step? Admissions pass what
        the newcomer needs for its own first step too (context + 2 tokens), as `sim.decode_instance` does, so an
        admission never forces an immediate preemption (which would livelock: admit, preempt, recompute, ...)."""
        return need + self.growth() <= self.runner.cache.allocator.num_free_blocks

    def _join(self, s: DSeq) -> None:
        self._order += 1
        s.order = self._order
        self.running.append(s)
        self._joined.append((s.rid, time.monotonic()))

    def _reap_cancelled(self) -> None:
        with self.lock:
            for group in (self.ready, self.running, self.preempted, self.prefill_q):
                for s in [s for s in group if s.cancelled]:
                    group.remove(s)
                    if s.seq.block_table:
                        self.runner.free(s.seq)
            self._start_transfers()

    def _preempt_one(self) -> None:
        victim = max(self.running, key=lambda s: s.order)
        self.running.remove(victim)
        self.runner.free(victim.seq)
        self.preempted.appendleft(victim)
        log.debug("%s: preempted %d (%d tokens); %d running, %d free blocks", self.name, victim.rid,
                  len(victim.seq.token_ids), len(self.running), self.runner.cache.allocator.num_free_blocks)
        self._preempted_now.append(victim.rid)
        self.counters["preemptions"] += 1

    def _recompute(self) -> bool:
        bs, batch = self.spec.block_size, []
        with self.lock:
            while self.preempted and len(self.running) + len(batch) < self.spec.max_batch_size:
                s = self.preempted[0]
                if not self._headroom(blocks_for(s.context + 2, bs)):
                    break
                self.preempted.popleft()
                self.runner.reserve([s.seq], [s.context + 1])
                batch.append(s)
        if not batch:
            return False
        log.debug("%s: recomputing %s", self.name, [(s.rid, s.context) for s in batch])
        self.runner.prefill([s.seq for s in batch], [s.context for s in batch])
        with self.lock:
            for s in batch:
                self._join(s)
            if not self.preempted:
                self._start_transfers()
        return True

    def _decode_step(self) -> None:
        alloc, bs = self.runner.cache.allocator, self.spec.block_size
        with self.lock:
            run = list(self.running)
            need = sum(max(0, blocks_for(len(s.seq.token_ids), bs) - len(s.seq.block_table)) for s in run)
            if need > alloc.num_free_blocks:
                self._preempt_one()
                return
            self.runner.reserve([s.seq for s in run], [len(s.seq.token_ids) for s in run])
        t0 = time.monotonic()
        seqs = [s.seq for s in run]
        tokens = self.runner.sample(self.runner.decode(seqs), seqs)
        self._advance(run, tokens, t0, time.monotonic())

    def _advance(self, run: list[DSeq], tokens: list[int], t0: float, t1: float) -> None:
        """Append one token to each of ``run``, free the finished ones and report the step to the router."""
        items, finished, reasons = [], [], []
        for s, tok in zip(run, tokens):
            s.seq.token_ids.append(tok)
            s.remaining -= 1
            items.append((s.rid, tok))
            if s.remaining <= 0 or tok == s.eos_id:
                finished.append(s)
                reasons.append((s.rid, "stop" if tok == s.eos_id else "length"))
        with self.lock:
            for s in finished:
                self.running.remove(s)
                self.runner.free(s.seq)
            if finished and self.incoming:
                self._start_transfers()
            joined, self._joined = self._joined, []
            preempted, self._preempted_now = self._preempted_now, []
            self.counters["steps"] += 1
            self.counters["tokens"] += len(items)
            self.counters["finished"] += len(finished)
        self.to_router(Tokens(t0, t1, items, joined, reasons, preempted))

    def close(self) -> None:
        super().close()
        if not self.colocated:
            self.kv_listener.close()
