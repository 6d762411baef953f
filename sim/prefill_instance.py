"""A prefill-only instance (disaggregated mode): FCFS batches of whole prompts up to the token and size limits.

Each request's KV blocks are held from its prefill start until its KV has fully arrived at the decode instance.
A batch waits when the head request's blocks are not free. After a batch the first token of each request is sampled
(``first_token_s = prefill_end_s``); a request with one output token finishes here, the others start their KV transfer.

The queue is a deque with the event order of a ``simpy.Store`` (same simulated behaviour, ties included), minus the
Store's put event per request: an idle instance waits on a get event that a hand-over event triggers with the head
request (as the Store's put event would), and a busy one takes its next head through an immediate timeout (as the
Store's already-satisfied get would).
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, cast

import simpy

from sim.kv_blocks import BlockPool
from sim.running_batch import SimSeq, blocks_for

if TYPE_CHECKING:
    from sim.cost_profile import CostProfile
    from sim.simulator import SimContext
    from sim.topology import PoolSpec


class PrefillInstance:
    def __init__(self, ctx: SimContext, name: str, pool: PoolSpec, profile: CostProfile, capacity_tokens: int):
        self.ctx, self.name, self.pool, self.profile = ctx, name, pool, profile
        self.blocks = BlockPool(capacity_tokens // pool.block_size_tokens, pool.block_size_tokens)
        self.queue: deque[SimSeq] = deque()  # arrived, waiting for a prefill batch
        self.outstanding = 0
        self.busy_s = 0.0
        self._freed: simpy.Event | None = None
        self._getter: simpy.Event | None = None  # idle: the process waits on it for the next head request
        self._handing_over = False
        self.last_sample_s = -math.inf  # when `SimContext.sample` last sampled this instance
        ctx.env.process(self.run())

    @property
    def kv_used(self) -> int:
        return self.blocks.used

    @property
    def kv_capacity(self) -> int:
        return self.blocks.capacity

    @property
    def kv_peak(self) -> int:
        return self.blocks.peak

    @property
    def kv_load(self) -> float:
        queued = sum(blocks_for(s.rec.prompt_tokens, self.blocks.block_size) for s in self.queue)
        return (self.blocks.used + queued) / self.blocks.capacity

    def submit(self, seq: SimSeq) -> None:
        self.outstanding += 1
        self.queue.append(seq)
        if self._getter is not None and not self._handing_over:
            self._handing_over = True
            ev = simpy.Event(self.ctx.env)
            ev.callbacks.append(self._hand_over)
            ev.succeed()

    def _hand_over(self, _ev: simpy.Event) -> None:
        getter = cast("simpy.Event", self._getter)
        self._getter, self._handing_over = None, False
        getter.succeed(self.queue.popleft())

    def release(self, seq: SimSeq) -> None:
        """The request's KV left this instance (transfer done, or finished here)."""
        self.blocks.give(seq.src_blocks)
        seq.src_blocks = 0
        self.outstanding -= 1
        if self._freed is not None and not self._freed.triggered:
            self._freed.succeed()

    def run(self):
        env, ctx, pool, blocks, queue = self.ctx.env, self.ctx, self.pool, self.blocks, self.queue
        bs, max_size, max_tokens = blocks.block_size, pool.max_batch_size, pool.max_batch_tokens
        while True:
            if queue:
                head = yield env.timeout(0, queue.popleft())
            else:
                self._getter = env.event()
                head = yield self._getter
            tokens = head.rec.prompt_tokens
            need = blocks_for(tokens, bs)
            while need > blocks.free:
                self._freed = env.event()
                yield self._freed
            batch = [head]
            blocks.take(need)
            head.src_blocks = need
            while queue and len(batch) < max_size:
                nxt = queue[0]
                n = nxt.rec.prompt_tokens
                need = blocks_for(n, bs)
                if tokens + n > max_tokens or need > blocks.free:
                    break
                queue.popleft()
                blocks.take(need)
                nxt.src_blocks = need
                batch.append(nxt)
                tokens += n
            start = env.now
            for s in batch:
                s.rec.prefill_start_s = start
            if start - self.last_sample_s >= ctx.sample_every_s:
                ctx.sample(self, len(queue), len(batch))
            dur = self.profile.prefill_s([s.rec.prompt_tokens for s in batch]) * ctx.begin_step()
            yield env.timeout(dur)
            ctx.end_step()
            self.busy_s += dur
            end = env.now
            for s in batch:
                rec = s.rec
                rec.prefill_end_s = rec.first_token_s = s.last_token_s = end
                s.context = rec.prompt_tokens
                s.remaining = rec.output_tokens - 1
                if s.remaining == 0:
                    self.release(s)
                    s.decode_instance.outstanding -= 1
                    ctx.finish(s, end)
                else:
                    s.decode_instance.receive(s)
            if end - self.last_sample_s >= ctx.sample_every_s:
                ctx.sample(self, len(queue), 0)
