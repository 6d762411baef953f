"""Prefill worker (disaggregated): FCFS batches of whole prompts, first token sampled here, KV handed to decode.

Scheduling mirrors `sim.prefill_instance`: the queue head waits until the blocks for its prompt are free; then the
batch takes following requests in order while they fit ``max_batch_tokens`` (the head alone may exceed it),
``max_batch_size`` and the free blocks. After the batch, every request's first token goes to the router at once
(``first_token_s = prefill_end_s``). A request that is already complete (one output token, or EOS) is freed here;
the others announce their KV to their decode worker (`KVReady`) and keep their blocks until that worker pulls the
KV (`KVPull`) and the sender thread has written it to the link (into a shared-memory segment for shm: the gather
from the paged cache is the only copy). Then the blocks are freed, waking a head that waits for them.

Failure cases: a decode worker that cannot be reached, or whose link drops, fails its requests as retryable; a
cancelled request is dropped wherever it is (queue, batch, waiting for pull, being sent) and its blocks are freed.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from engine.kv_ship import body_bytes, body_shape, export_blocks
from engine.messages import Failed, KVData, KVDrop, KVMissing, KVPull, KVReady, Prefilled, Submit, peer_decoder
from engine.model.runner import SamplingParams, Sequence
from engine.transport import Channel, TransportError, connect
from engine.worker import WorkerBase, blocks_for

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5


@dataclass(eq=False)
class PSeq:
    rid: int
    seq: Sequence
    max_tokens: int
    eos_id: int | None
    decode_kv: str
    state: str = "queued"  # queued -> batch -> pending -> sending
    cancelled: bool = False
    t_start: float = 0.0


class PrefillWorker(WorkerBase):
    def __init__(self, spec, runner, secret):
        super().__init__(spec, runner, secret)
        self.cond = threading.Condition()  # guards the queue, `pending`, `seqs` and the block allocator
        self.queue: deque[PSeq] = deque()
        self.seqs: dict[int, PSeq] = {}
        self.links: dict[str, Channel] = {}
        self.link_rids: dict[str, set[int]] = {}
        self.pulls: queue.Queue = queue.Queue()
        self.counters = {"batches": 0, "prefilled": 0, "sent": 0, "sent_bytes": 0}
        self._sender = threading.Thread(target=self._send_loop, daemon=True, name="kv-sender")
        self._sender.start()

    # ---- from the router ---------------------------------------------------------------------------------------------
    def submit(self, m: Submit) -> None:
        alloc = self.runner.cache.allocator
        if blocks_for(len(m.token_ids), self.spec.block_size) > alloc.num_blocks:
            self.to_router(Failed(m.rid, f"{self.name}: prompt of {len(m.token_ids)} tokens exceeds the KV cache"))
            return
        s = PSeq(m.rid, Sequence(m.rid, list(m.token_ids), SamplingParams(m.temperature, m.seed)), m.max_tokens,
                 m.eos_id, m.decode_kv)
        with self.cond:
            if len(self.queue) >= self.spec.queue_limit:
                full = True
            else:
                full = False
                self.queue.append(s)
                self.seqs[s.rid] = s
                self.cond.notify_all()
        if full:
            self.to_router(Failed(m.rid, f"{self.name}: prefill queue full ({self.spec.queue_limit})", retryable=True))

    def cancel(self, rid: int) -> None:
        with self.cond:
            s = self.seqs.get(rid)
            if s is None:
                return
            s.cancelled = True
            if s.state == "queued":
                self.queue.remove(s)
                del self.seqs[rid]
            elif s.state == "pending":
                self._drop(s)

    def stats_values(self) -> dict[str, float]:
        with self.cond:
            pending = sum(1 for s in self.seqs.values() if s.state in ("pending", "sending"))
            return {"queue": len(self.queue), "pending_kv": pending, **self.counters, **self.kv_stats()}

    def _drop(self, s: PSeq) -> None:
        """Free a request's blocks and forget it (caller holds ``cond``)."""
        if s.seq.block_table:
            self.runner.free(s.seq)
        self.seqs.pop(s.rid, None)
        for rids in self.link_rids.values():
            rids.discard(s.rid)
        self.cond.notify_all()

    # ---- the batch loop ------------------------------------------------------------------------------------------
    def _next_batch(self) -> list[PSeq]:
        bs, alloc = self.spec.block_size, self.runner.cache.allocator
        with self.cond:
            if not self.queue:
                self.cond.wait(IDLE_WAIT_S)
                return []
            head = self.queue[0]
            need = blocks_for(len(head.seq.token_ids), bs)
            if need > alloc.num_free_blocks:
                self.cond.wait(IDLE_WAIT_S)
                return []
            batch, tokens = [], 0
            while self.queue and len(batch) < self.spec.max_batch_size:
                s = self.queue[0]
                n = len(s.seq.token_ids)
                need = blocks_for(n, bs)
                if batch and (tokens + n > self.spec.max_batch_tokens or need > alloc.num_free_blocks):
                    break
                self.queue.popleft()
                self.runner.reserve([s.seq], [n])
                s.state = "batch"
                batch.append(s)
                tokens += n
            return batch

    def run(self) -> None:
        while not self.stop.is_set():
            batch = self._next_batch()
            if batch:
                self._prefill(batch)

    def _prefill(self, batch: list[PSeq]) -> None:
        t0 = time.monotonic()
        seqs = [s.seq for s in batch]
        logits = self.runner.prefill(seqs)
        tokens = self.runner.sample(logits, seqs)
        t1 = time.monotonic()
        items, finished, handoff = [], [], []
        for s, tok in zip(batch, tokens):
            s.seq.token_ids.append(tok)
            items.append((s.rid, tok, t0))
            if s.max_tokens <= 1 or tok == s.eos_id:
                finished.append((s.rid, "length" if s.max_tokens <= 1 else "stop"))
            elif not s.cancelled:
                handoff.append(s)
        self.to_router(Prefilled(t1, items, finished))
        with self.cond:
            self.counters["batches"] += 1
            self.counters["prefilled"] += len(batch)
            for s in batch:
                if s in handoff:
                    s.state = "pending"
                else:
                    self._drop(s)
        for s in handoff:
            self._announce(s)

    # ---- KV handoff --------------------------------------------------------------------------------------------------
    def _link(self, address: str) -> Channel:
        ch = self.links.get(address)
        if ch is None or ch.closed:
            ch = connect(self.spec.transport, address, self.secret)
            self.links[address] = ch
            self.link_rids[address] = set()
            ch.start(lambda m, ch=ch: self._on_peer(ch, m), lambda exc, a=address: self._on_link_lost(a, exc),
                     decoder=peer_decoder.decode, name=address)
        return ch

    def _announce(self, s: PSeq) -> None:
        try:
            ch = self._link(s.decode_kv)
            with self.cond:
                self.link_rids[s.decode_kv].add(s.rid)
            ch.send(KVReady(s.rid, s.seq.token_ids, s.seq.num_cached_tokens, s.max_tokens - 1,
                            s.seq.sampling.temperature, s.seq.sampling.seed, s.eos_id, self.name))
        except (TransportError, ValueError) as e:
            with self.cond:
                self._drop(s)
            self.to_router(Failed(s.rid, f"{self.name}: cannot hand KV to {s.decode_kv}: {e}", retryable=True))

    def _on_peer(self, ch: Channel, msg) -> None:
        m = msg.header
        if isinstance(m, KVPull):
            self.pulls.put((ch, m.rid, msg.t_recv))
        elif isinstance(m, KVDrop):
            with self.cond:
                s = self.seqs.get(m.rid)
                if s is not None and s.state == "pending":
                    self._drop(s)

    def _on_link_lost(self, address: str, exc: BaseException | None) -> None:
        with self.cond:
            lost = [self.seqs[r] for r in self.link_rids.pop(address, set()) if r in self.seqs]
            for s in lost:
                if s.state == "pending":
                    self._drop(s)
        for s in lost:
            self.to_router(Failed(s.rid, f"{self.name}: link to decode worker {address} lost", retryable=True))

    def _send_loop(self) -> None:
        while not self.stop.is_set():
            try:
                ch, rid, t_pull = self.pulls.get(timeout=IDLE_WAIT_S)
                log.debug("%s: pull of %d waited %.3f ms", self.name, rid, (time.monotonic() - t_pull) * 1e3)
            except queue.Empty:
                continue
            with self.cond:
                s = self.seqs.get(rid)
                if s is None or s.state != "pending":
                    s = None
                else:
                    s.state = "sending"
            try:
                if s is None:
                    ch.send(KVMissing(rid))
                else:
                    self._send_kv(ch, s)
            except TransportError as e:
                log.warning("%s: KV send of %d failed: %s", self.name, rid, e)
                if s is not None:
                    self.to_router(Failed(rid, f"{self.name}: KV send failed: {e}", retryable=True))
            if s is not None:
                with self.cond:
                    self._drop(s)

    def _send_kv(self, ch: Channel, s: PSeq) -> None:
        cache = self.runner.cache
        n = s.seq.num_cached_tokens
        shape = body_shape(cache, n)
        t0 = time.monotonic()
        buf = ch.alloc(body_bytes(cache, n))
        raw = buf.view if isinstance(buf.view, torch.Tensor) else torch.frombuffer(buf.view, dtype=torch.uint8)
        export_blocks(cache, s.seq.block_table, n, raw.view(cache.dtype).view(shape))
        digest = hashlib.sha256(buf.view).hexdigest() if self.spec.verify_kv and not isinstance(buf.view, torch.Tensor) else ""
        t1 = time.monotonic()
        ch.send(KVData(s.rid, shape, str(cache.dtype).removeprefix("torch."), n, cache.block_size, t0, digest), buf)
        log.debug("%s: KV %d: gather %.3f ms, send %.3f ms", self.name, s.rid, (t1 - t0) * 1e3, (time.monotonic() - t1) * 1e3)
        self.counters["sent"] += 1
        self.counters["sent_bytes"] += buf.nbytes
