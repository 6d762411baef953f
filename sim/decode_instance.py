"""A decode instance (disaggregated) or a colocated instance (both phases), with continuous batching over a paged KV pool.

Decode steps between batch membership changes are advanced in one event each (`sim.running_batch`). A membership
change is: a request finishes; a request joins (its KV arrived, or — colocated — a prefill is waiting: prefill-first,
vLLM-style, at the next step boundary); or the pool cannot grow every sequence by one more token, in which case the
latest-arrived running sequence is preempted (its blocks freed) and later recomputed (a prefill of its whole context
on this instance) before it rejoins.

KV blocks: the running batch holds ceil((context + 1) / block_size) per sequence; everything else (KV in flight to
this instance, prompts being prefilled here, recomputes) is ``reserved``. New work is admitted only when it leaves the
running batch room for its planned steps, so admission waits instead of preempting.

Disaggregated: a prefilled request waits in ``incoming`` until the blocks for its context are free, then its KV is
moved over the instance's ingress link; it joins the batch at the first step boundary after the last byte arrives.
Colocated with ``chunked_prefill``: each iteration carries every running sequence's next token plus prompt chunks up to
``max_batch_tokens`` (Sarathi-style); its cost is the chunk's prefill cost plus the decode step, the fixed overhead
counted once.
"""

from __future__ import annotations

import math
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, cast

import simpy
from simpy.events import URGENT

from sim.running_batch import RunningBatch, SimSeq, blocks_for, steps_done_by, steps_time

if TYPE_CHECKING:
    from sim.cost_profile import CostProfile
    from sim.link import SharedLink
    from sim.simulator import SimContext
    from sim.topology import PoolSpec


_CUT = object()  # what a decode segment's wait returns when a join cuts the segment short


class _Cut(simpy.Event):
    """Cut a decode segment short: like ``process.interrupt()`` (an URGENT event that detaches the process from the
    timeout it waits on and resumes it), in the same event order, but the process receives `_CUT` instead of having
    an exception thrown into it."""

    def __init__(self, proc: simpy.Process, waiting_on: simpy.Timeout):
        super().__init__(proc.env)
        assert waiting_on.callbacks is not None, "the segment's timeout was already processed"
        waiting_on.callbacks.remove(proc._resume)
        self.callbacks.append(proc._resume)
        self._ok, self._value = True, _CUT
        proc.env.schedule(self, URGENT)


class DecodeInstance:
    def __init__(self, ctx: SimContext, name: str, pool: PoolSpec, profile: CostProfile, capacity_tokens: int,
                 link: SharedLink | None = None):
        self.ctx, self.name, self.pool, self.profile, self.link = ctx, name, pool, profile, link
        self.colocated = pool.role == "colocated"
        self.block_size = pool.block_size_tokens
        self.kv_capacity = capacity_tokens // pool.block_size_tokens
        if self.kv_capacity < 1:
            raise ValueError(f"{name}: KV capacity {capacity_tokens} tokens is less than one block")
        self.reserved = 0  # blocks held outside the running batch
        self.kv_peak = 0
        self.batch = RunningBatch(self.block_size, profile.decode_context)
        self.incoming: deque[SimSeq] = deque()  # prefilled elsewhere, waiting for blocks before the KV transfer
        self.ready: deque[SimSeq] = deque()  # KV is here, waiting to join the batch
        self.prefill_q: deque[SimSeq] = deque()  # colocated: waiting for (the rest of) their prefill
        self.preempted: deque[SimSeq] = deque()  # evicted: need a recompute before rejoining
        self.outstanding = 0
        self.busy_s = 0.0
        self._wake: simpy.Event | None = None
        self._in_segment = self._interrupted = False
        self._segment_steps = 0
        self._segment_end: simpy.Timeout | None = None
        self._segment: tuple[float, float, float, int, int, int] = (0.0, 0.0, 0.0, 0, 0, 0)  # t0, base, slope, s0, B, k
        self._decode_context = profile.decode_context
        self._linear: dict[int, tuple[float, float]] = {}  # batch size -> profile.decode_linear(size)
        self.last_sample_s = -math.inf  # when `SimContext.sample` last sampled this instance
        self._proc = ctx.env.process(self.run())

    # --- what the router, the sampler and the other instances see --------------------------------------------------
    @property
    def kv_used(self) -> int:
        return self.reserved + self.batch.blocks()

    @property
    def kv_load(self) -> float:
        bs = self.block_size
        queued = sum(blocks_for(s.rec.prompt_tokens + 1, bs) for s in (*self.incoming, *self.prefill_q))
        return (self.kv_used + queued) / self.kv_capacity

    def submit(self, seq: SimSeq) -> None:
        """Colocated: a new request to prefill here."""
        self.outstanding += 1
        self.prefill_q.append(seq)
        self._poke()

    def receive(self, seq: SimSeq) -> None:
        """Disaggregated: a prefilled request whose KV should come here."""
        self.incoming.append(seq)
        self._start_transfers()

    # --- block accounting ----------------------------------------------------------------------------------------
    def _headroom(self, need: int) -> bool:
        """Can ``need`` more blocks be reserved and still leave the running batch room for its planned steps?

        Callers pass what the newcomer needs to run its own first step too (context + 2 tokens), so that admitting it
        never forces an immediate preemption (which would livelock: admit, preempt, recompute, admit ...)."""
        batch = self.batch
        steps = self._segment_steps if self._in_segment else 1
        return need + self.reserved + batch.blocks_at(batch.g + steps) <= self.kv_capacity

    def _reserve(self, s: SimSeq, blocks: int) -> None:
        self.reserved += blocks
        s.blocks += blocks
        self._note_peak()

    def _note_peak(self) -> None:
        used = self.reserved + self.batch.blocks()
        if used > self.kv_peak:
            self.kv_peak = used
        assert used <= self.kv_capacity, f"{self.name}: {used} KV blocks used of {self.kv_capacity}"

    def _join(self, s: SimSeq) -> None:
        """Move ``s`` (context, remaining, last_token_s set) from reserved blocks into the running batch."""
        rec = s.rec
        if rec.decode_start_s != rec.decode_start_s:  # NaN: its first join
            rec.decode_start_s = self.ctx.env.now
        self.reserved -= s.blocks
        s.blocks = 0
        self.batch.add(s)

    def _finish(self, s: SimSeq, t: float) -> None:
        self.reserved -= s.blocks
        s.blocks = 0
        self.outstanding -= 1
        self.ctx.finish(s, t)

    def _preempt_one(self) -> None:
        """Evict the latest-arrived running sequence (vLLM's recompute preemption)."""
        victim = self.batch.latest_arrived()
        self.batch.remove(victim)
        victim.rec.preemptions += 1
        self.preempted.appendleft(victim)

    # --- transfers in (disaggregated) ------------------------------------------------------------------------------
    def _speed(self, kind: str) -> float:
        """The host-speed factor for a ``kind`` step starting now (`HostCPU.speed`; 1 without one)."""
        return self.ctx.speed(self.name, kind)[0] if self.ctx.speed_traces else 1.0

    def _poke(self, direct: bool = False) -> None:
        """New work for the loop: wake it if idle, or cut the decode segment running now (at most once).

        ``direct`` (only from a link's completion callback, see `_cut_to_step_end`): move the loop's wait to the end
        of the step running now without the URGENT `_Cut` event in between."""
        if self._in_segment:  # (then the loop is not idle)
            if not self._interrupted:
                self._interrupted = True
                if not (direct and self._cut_to_step_end()):
                    _Cut(self._proc, cast("simpy.Timeout", self._segment_end))
        elif self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _cut_to_step_end(self) -> bool:
        """What `_Cut` + the segment's cut branch do, done now: the loop then waits on a timeout that ends with the
        step running now and gives it (steps done, their time). The event order is the same as with `_Cut` when
        nothing is scheduled for a later time between now and the `_Cut` event's turn (first, it is URGENT) -- true
        in a link's completion callback, whose remaining work (other arrivals on this link, prefill blocks freed)
        schedules only at ``now``. Returns False, doing nothing, when the step ends at ``now`` (that needs `_Cut`)."""
        t0, base, slope, s0, size, k = self._segment
        env = self.ctx.env
        now = env.now
        done = min(steps_done_by(now - t0, base, slope, s0, size, k) + 1, k)
        dur = steps_time(done, base, slope, s0, size)
        rest = t0 + dur - now
        if not (rest > 0 and now + rest > now):
            return False
        proc, waiting_on = self._proc, cast("simpy.Timeout", self._segment_end)
        assert waiting_on.callbacks is not None, "the segment's timeout was already processed"
        waiting_on.callbacks.remove(proc._resume)
        ev = env.timeout(rest, (done, dur))
        ev.callbacks.append(proc._resume)
        proc._target = ev
        return True

    def _start_transfers(self) -> None:
        env, bs, kvb, incoming, link = self.ctx.env, self.block_size, self.ctx.kv_bytes_per_token, self.incoming, self.link
        assert link is not None, f"{self.name}: a KV transfer to an instance without a link"
        batch = self.batch
        planned = batch.blocks_at(batch.g + (self._segment_steps if self._in_segment else 1))  # as in `_headroom`
        while incoming and not self.preempted:
            s = incoming[0]
            if -(-(s.context + 2) // bs) + self.reserved + planned > self.kv_capacity:  # no `_headroom`
                break
            incoming.popleft()
            self._reserve(s, -(-(s.context + 1) // bs))
            rec = s.rec
            rec.kv_transfer_start_s = env.now
            rec.kv_bytes = s.context * kvb
            # the link calls back from its completion event, except for an empty transfer (at once, from here)
            link.send(rec.kv_bytes, partial(self._arrived, s, rec.kv_bytes > 0))

    def _arrived(self, s: SimSeq, from_link_event: bool) -> None:
        s.rec.kv_transfer_end_s = self.ctx.env.now
        s.prefill_instance.release(s)  # type: ignore[attr-defined]
        self.ready.append(s)
        self._poke(direct=from_link_event)

    # --- the instance's loop -----------------------------------------------------------------------------------------
    def run(self):
        ctx, batch, ready, max_size = self.ctx, self.batch, self.ready, self.pool.max_batch_size
        env = ctx.env
        while True:
            if self.preempted and (yield from self._recompute()):
                continue
            while ready and batch.size < max_size:
                self._join(ready.popleft())
            if self.colocated and self.prefill_q:
                step = self._mixed_iteration if self.pool.chunked_prefill else self._prefill_batch
                if (yield from step()):
                    continue
            if not batch.size:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            # a decode segment: the batch runs until its next membership change (see `sim.running_batch`)
            size = batch.size
            k = batch.steps_fitting(self.kv_capacity - self.reserved, batch.steps_to_next_finish())
            if k == 0:
                self._preempt_one()
                continue
            s0 = batch.first_step_context(self._decode_context)
            linear = self._linear.get(size)
            if linear is None:
                linear = self._linear[size] = self.profile.decode_linear(size)
            base, slope = linear
            stretch = ctx.begin_step(self.profile)  # host CPU contention slows every step of the segment alike
            if ctx.speed_traces:  # host speed: the factor now; the segment ends with the step running at its change
                factor, change_s = ctx.speed(self.name, "decode")
                stretch *= factor
                if change_s < math.inf:
                    k = min(k, steps_done_by(change_s - env.now, base * stretch, slope * stretch, s0, size, k) + 1)
            if stretch != 1.0:
                base, slope = base * stretch, slope * stretch
            total = steps_time(k, base, slope, s0, size)
            t0 = env.now
            if t0 - self.last_sample_s >= ctx.sample_every_s:
                ctx.sample(self, len(ready) + len(self.prefill_q), size)
            self._in_segment, self._interrupted, self._segment_steps = True, False, k
            self._segment = (t0, base, slope, s0, size, k)
            self._segment_end = env.timeout(total)
            got = yield self._segment_end
            if got is None:
                done, dur = k, total
            elif got is _CUT:  # a join: stop at the end of the step running now
                done = min(steps_done_by(env.now - t0, base, slope, s0, size, k) + 1, k)
                dur = steps_time(done, base, slope, s0, size)
                rest = t0 + dur - env.now
                if rest > 0:
                    yield env.timeout(rest)
            else:  # cut by `_cut_to_step_end`: the step running then has just ended
                done, dur = got
            self._in_segment, self._segment_end = False, None
            ctx.end_step()
            self.busy_s += dur
            t_end = t0 + dur
            finished = batch.advance(done, t0 + base + slope * s0, base + slope * (s0 + (done - 1) * size), t_end)
            self._note_peak()
            self._after_segment(finished, t_end)

    def _after_segment(self, finished: list[SimSeq], t_end: float) -> None:
        if finished:
            for s in finished:
                self._finish(s, t_end)
            if self.incoming:
                self._start_transfers()

    def _recompute(self):
        bs, batch = self.block_size, []
        while self.preempted and self.batch.size + len(batch) < self.pool.max_batch_size:
            need = blocks_for(self.preempted[0].context + 1, bs)
            if not self._headroom(blocks_for(self.preempted[0].context + 2, bs)):
                break
            s = self.preempted.popleft()
            self._reserve(s, need)
            batch.append(s)
        if not batch:
            return False
        dur = self.profile.prefill_s([s.context for s in batch]) * self.ctx.begin_step(self.profile) * self._speed("prefill") \
            * self.ctx.prefill_factor(self.name, self.profile)
        yield self.ctx.env.timeout(dur)
        self.ctx.end_step()
        self.busy_s += dur
        for s in batch:
            self._join(s)
        if not self.preempted and self.incoming:
            self._start_transfers()
        return True

    def _prefill_batch(self):
        env, pool, bs = self.ctx.env, self.pool, self.block_size
        batch, tokens = [], 0
        while self.prefill_q and self.batch.size + len(batch) < pool.max_batch_size:
            s = self.prefill_q[0]
            need = blocks_for(s.rec.prompt_tokens + 1, bs)
            if (batch and tokens + s.rec.prompt_tokens > pool.max_batch_tokens) or \
                    not self._headroom(blocks_for(s.rec.prompt_tokens + 2, bs)):
                break
            self.prefill_q.popleft()
            self._reserve(s, need)
            s.rec.prefill_start_s = env.now
            batch.append(s)
            tokens += s.rec.prompt_tokens
        if not batch:
            return False
        if env.now - self.last_sample_s >= self.ctx.sample_every_s:
            self.ctx.sample(self, len(self.prefill_q), self.batch.size + len(batch))
        dur = self.profile.prefill_s([s.rec.prompt_tokens for s in batch]) * self.ctx.begin_step(self.profile) * self._speed("prefill") \
            * self.ctx.prefill_factor(self.name, self.profile)
        yield env.timeout(dur)
        self.ctx.end_step()
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

    def _mixed_iteration(self):
        env, pool, bs, batch = self.ctx.env, self.pool, self.block_size, self.batch
        while batch.size and self.reserved + batch.blocks_at(batch.g + 1) > self.kv_capacity:
            self._preempt_one()
        budget = pool.max_batch_tokens - batch.size
        chunks: list[tuple[SimSeq, int]] = []
        for s in self.prefill_q:
            if budget <= 0 or batch.size + len(chunks) >= pool.max_batch_size:
                break
            left = s.rec.prompt_tokens - s.context
            n = min(left, budget)
            need = blocks_for(s.context + n + (n == left), bs) - s.blocks
            if not self._headroom(need + (n == left)):
                break
            self._reserve(s, need)
            if math.isnan(s.rec.prefill_start_s):
                s.rec.prefill_start_s = env.now
            chunks.append((s, n))
            budget -= n
        if not chunks:
            return False
        if env.now - self.last_sample_s >= self.ctx.sample_every_s:
            self.ctx.sample(self, len(self.prefill_q), batch.size + len(chunks))
        dur = self.profile.prefill_s([n for _, n in chunks], cached=[s.context for s, _ in chunks]) * self._speed("prefill") \
            * self.ctx.prefill_factor(self.name, self.profile)
        if batch.size:
            dur += (self.profile.decode_step_s(batch.size, batch.first_step_context(self.profile.decode_context))
                    - self.profile.step_overhead_s()) * self._speed("decode")
        dur *= self.ctx.begin_step(self.profile)
        t0 = env.now
        yield env.timeout(dur)
        self.ctx.end_step()
        self.busy_s += dur
        if batch.size:
            self._after_segment(batch.advance(1, t0 + dur, dur, env.now), env.now)
            self._note_peak()
        for s, n in chunks:
            s.context += n
            if s.context >= s.rec.prompt_tokens:
                self.prefill_q.remove(s)
                self._prefilled(s, env.now)
        return True
