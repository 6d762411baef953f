"""A decode instance (disaggregated) or a colocated instance (both phases), with continuous batching over a paged KV pool.

Decode steps between batch membership changes are advanced in one event each (`sim.running_batch`). A membership
change is: a request finishes; a request joins (its KV arrived, or — colocated — a prefill is waiting: prefill-first,
vLLM-style, at the next step boundary); or the pool cannot grow every sequence by one more token, in which case the
most recently admitted sequence is preempted (its blocks freed) and later recomputed (a prefill of its whole context
on this instance) before it rejoins.

Disaggregated: a prefilled request waits in ``incoming`` until the blocks for its context are free, then its KV is
moved over the instance's ingress link; it joins the batch at the first step boundary after the last byte arrives.
Colocated with ``chunked_prefill``: each iteration carries every running sequence's next token plus prompt chunks up to
``max_batch_tokens`` (Sarathi-style); its cost is the chunk's prefill cost plus the decode step, the fixed overhead
counted once.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

import simpy

from sim.kv_blocks import BlockPool
from sim.running_batch import SimSeq, blocks_for, extra_blocks, extra_blocks_bound, steps_done_by, steps_time, steps_until_out_of_blocks

if TYPE_CHECKING:
    from sim.cost_profile import CostProfile
    from sim.link import SharedLink
    from sim.simulator import SimContext
    from sim.topology import PoolSpec


class DecodeInstance:
    def __init__(self, ctx: SimContext, name: str, pool: PoolSpec, profile: CostProfile, capacity_tokens: int,
                 link: SharedLink | None = None):
        self.ctx, self.name, self.pool, self.profile, self.link = ctx, name, pool, profile, link
        self.colocated = pool.role == "colocated"
        self.blocks = BlockPool(capacity_tokens // pool.block_size_tokens, pool.block_size_tokens)
        self.incoming: deque[SimSeq] = deque()  # prefilled elsewhere, waiting for blocks before the KV transfer
        self.ready: deque[SimSeq] = deque()  # KV is here, waiting to join the batch
        self.prefill_q: deque[SimSeq] = deque()  # colocated: waiting for (the rest of) their prefill
        self.preempted: deque[SimSeq] = deque()  # evicted: need a recompute before rejoining
        self.running: list[SimSeq] = []
        self.outstanding = 0
        self.busy_s = 0.0
        self._wake: simpy.Event | None = None
        self._in_segment = self._interrupted = False
        self._segment_steps = 0
        self._proc = ctx.env.process(self.run())

    # --- what the router and the other instances see ----------------------------------------------------------
    @property
    def kv_load(self) -> float:
        bs = self.blocks.block_size
        queued = sum(blocks_for(s.rec.prompt_tokens + 1, bs) for s in (*self.incoming, *self.prefill_q))
        return (self.blocks.used + queued) / self.blocks.capacity

    def submit(self, seq: SimSeq) -> None:
        """Colocated: a new request to prefill here."""
        self.outstanding += 1
        self.prefill_q.append(seq)
        self._poke()

    def receive(self, seq: SimSeq) -> None:
        """Disaggregated: a prefilled request whose KV should come here."""
        self.incoming.append(seq)
        self._start_transfers()

    # --- internals ---------------------------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        elif self._in_segment and not self._interrupted:
            self._interrupted = True
            self._proc.interrupt()

    def _start_transfers(self) -> None:
        env, bs, kvb = self.ctx.env, self.blocks.block_size, self.ctx.kv_bytes_per_token
        while self.incoming and not self.preempted:
            s = self.incoming[0]
            need = blocks_for(s.context + 1, bs)
            if not self._headroom(need):
                break
            self.incoming.popleft()
            self.blocks.take(need)
            s.blocks = need
            s.rec.kv_transfer_start_s = env.now
            s.rec.kv_bytes = s.context * kvb
            self.link.send(s.rec.kv_bytes, lambda s=s: self._arrived(s))  # type: ignore[union-attr]

    def _arrived(self, s: SimSeq) -> None:
        s.rec.kv_transfer_end_s = self.ctx.env.now
        s.prefill_instance.release(s)  # type: ignore[attr-defined]
        self.ready.append(s)
        self._poke()

    def _join(self, s: SimSeq) -> None:
        if math.isnan(s.rec.decode_start_s):
            s.rec.decode_start_s = self.ctx.env.now
        self.running.append(s)

    def _finish(self, s: SimSeq, t: float) -> None:
        self.blocks.give(s.blocks)
        s.blocks = 0
        self.outstanding -= 1
        self.ctx.finish(s, t)

    def _headroom(self, need: int) -> bool:
        """Can ``need`` more blocks be taken and still leave the running batch room for its next step?"""
        steps = self._segment_steps if self._in_segment else 1  # a planned segment's blocks are spoken for
        bs, free = self.blocks.block_size, self.blocks.free
        return (need + extra_blocks_bound(len(self.running), steps, bs) <= free
                or need + extra_blocks(self.running, steps, bs) <= free)

    def _preempt_one(self) -> None:
        """Evict the latest-arrived running sequence (vLLM's recompute preemption)."""
        victim = max(self.running, key=lambda s: s.order)
        self.running.remove(victim)
        self.blocks.give(victim.blocks)
        victim.blocks = 0
        victim.rec.preemptions += 1
        self.preempted.appendleft(victim)

    def _advance(self, run: list[SimSeq], done: int, first_start: float, first_step: float, last_step: float,
                 t_end: float) -> None:
        """Every sequence in ``run`` produced ``done`` tokens; the first ended at first_start + first_step."""
        bs = self.blocks.block_size
        first_end = first_start + first_step
        took = 0
        finished = []
        for s in run:
            ctx = s.context + done
            need = -(-ctx // bs) - s.blocks
            if need > 0:
                took += need
                s.blocks += need
            gap = first_end - s.last_token_s
            if done > 1 and last_step > gap:
                gap = last_step
            rec = s.rec
            if gap > rec.max_itl_s:
                rec.max_itl_s = gap
            s.context = ctx
            s.remaining -= done
            s.last_token_s = t_end
            if s.remaining <= 0:
                finished.append(s)
        self.blocks.take(took)
        if finished:
            self.running = [s for s in run if s.remaining > 0]
            for s in finished:
                self._finish(s, t_end)
            if self.incoming:
                self._start_transfers()

    def run(self):  # noqa: ANN201 - a SimPy process
        env = self.ctx.env
        while True:
            if self.preempted and (yield from self._recompute()):
                continue
            while self.ready and len(self.running) < self.pool.max_batch_size:
                self._join(self.ready.popleft())
            if self.colocated and self.prefill_q:
                step = self._mixed_iteration if self.pool.chunked_prefill else self._prefill_batch
                if (yield from step()):
                    continue
            if not self.running:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            yield from self._decode_segment()

    def _recompute(self):  # noqa: ANN202
        bs, batch = self.blocks.block_size, []
        while self.preempted and len(self.running) + len(batch) < self.pool.max_batch_size:
            need = blocks_for(self.preempted[0].context + 1, bs)
            if not self._headroom(need):
                break
            s = self.preempted.popleft()
            self.blocks.take(need)
            s.blocks = need
            batch.append(s)
        if not batch:
            return False
        dur = self.profile.prefill_s([s.context for s in batch])
        yield self.ctx.env.timeout(dur)
        self.busy_s += dur
        for s in batch:
            self._join(s)
        if not self.preempted and self.incoming:
            self._start_transfers()
        return True

    def _prefill_batch(self):  # noqa: ANN202
        env, pool, bs = self.ctx.env, self.pool, self.blocks.block_size
        batch, tokens = [], 0
        while self.prefill_q and len(self.running) + len(batch) < pool.max_batch_size:
            s = self.prefill_q[0]
            need = blocks_for(s.rec.prompt_tokens + 1, bs)
            if (batch and tokens + s.rec.prompt_tokens > pool.max_batch_tokens) or not self._headroom(need):
                break
            self.prefill_q.popleft()
            self.blocks.take(need)
            s.blocks = need
            s.rec.prefill_start_s = env.now
            batch.append(s)
            tokens += s.rec.prompt_tokens
        if not batch:
            return False
        self.ctx.sample(self, len(self.prefill_q), len(self.running) + len(batch))
        dur = self.profile.prefill_s([s.rec.prompt_tokens for s in batch])
        yield env.timeout(dur)
        self.busy_s += dur
        for s in batch:
            self._prefilled(s, env.now)
        return True

    def _prefilled(self, s: SimSeq, t: float) -> None:
        s.rec.prefill_end_s = s.rec.first_token_s = s.last_token_s = t
        s.context = s.rec.prompt_tokens
        s.remaining = s.rec.output_tokens - 1
        if s.remaining == 0:
            self._finish(s, t)
        else:
            self._join(s)

    def _mixed_iteration(self):  # noqa: ANN202
        env, pool, bs = self.ctx.env, self.pool, self.blocks.block_size
        while self.running and extra_blocks(self.running, 1, bs) > self.blocks.free:
            self._preempt_one()
        run = list(self.running)
        budget = pool.max_batch_tokens - len(run)
        chunks: list[tuple[SimSeq, int]] = []
        for s in self.prefill_q:
            if budget <= 0 or len(run) + len(chunks) >= pool.max_batch_size:
                break
            left = s.rec.prompt_tokens - s.context
            n = min(left, budget)
            need = blocks_for(s.context + n + (n == left), bs) - s.blocks
            if not self._headroom(need):
                break
            self.blocks.take(need)
            s.blocks += need
            if math.isnan(s.rec.prefill_start_s):
                s.rec.prefill_start_s = env.now
            chunks.append((s, n))
            budget -= n
        if not chunks:
            return False
        self.ctx.sample(self, len(self.prefill_q), len(run) + len(chunks))
        dur = self.profile.prefill_s([n for _, n in chunks], cached=[s.context for s, _ in chunks])
        if run:
            dur += self.profile.decode_step_s(len(run), sum(s.context + 1 for s in run)) - self.profile.step_overhead_s()
        t0 = env.now
        yield env.timeout(dur)
        self.busy_s += dur
        if run:
            self._advance(run, 1, t0, dur, dur, env.now)
        for s, n in chunks:
            s.context += n
            if s.context >= s.rec.prompt_tokens:
                self.prefill_q.remove(s)
                self._prefilled(s, env.now)
        return True

    def _decode_segment(self):  # noqa: ANN202
        env, bs = self.ctx.env, self.blocks.block_size
        run = self.running
        batch = len(run)
        k_fin = min(s.remaining for s in run)
        k = steps_until_out_of_blocks(run, self.blocks.free, bs, k_fin)
        if k == 0:
            self._preempt_one()
            return
        s0 = sum(s.context for s in run) + batch
        base, slope = self.profile.decode_linear(batch)
        total = steps_time(k, base, slope, s0, batch)
        t0 = env.now
        self.ctx.sample(self, len(self.ready) + len(self.prefill_q), batch)
        self._in_segment, self._interrupted, self._segment_steps = True, False, k
        try:
            yield env.timeout(total)
            done = k
        except simpy.Interrupt:
            done = min(steps_done_by(env.now - t0, base, slope, s0, batch, k) + 1, k)
            rest = t0 + steps_time(done, base, slope, s0, batch) - env.now
            if rest > 0:
                yield env.timeout(rest)
        self._in_segment = False
        dur = steps_time(done, base, slope, s0, batch)
        self.busy_s += dur
        self._advance(run, done, t0, base + slope * s0, base + slope * (s0 + (done - 1) * batch), t0 + dur)
