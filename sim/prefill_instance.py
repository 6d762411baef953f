"""A prefill-only instance (disaggregated mode): FCFS batches of whole prompts up to the token and size limits.

Each request's KV blocks are held from its prefill start until its KV has fully arrived at the decode instance.
A batch waits when the head request's blocks are not free. After a batch the first token of each request is sampled
(``first_token_s = prefill_end_s``); a request with one output token finishes here, the others start their KV transfer.

The queue is a deque with the event order of a ``simpy.Store`` (same simulated behaviour, ties included) and fewer
events. The Store: a put event per request; when it is processed, a waiting get takes the head and is triggered; a get
made while requests wait takes the head at once and is triggered. Here: an idle instance waits on an event that the
first request's arrival triggers (where the Store's put event would be); whenever the instance takes the head, it then
yields an immediate timeout (where the Store's get event would be) -- unless nothing else is due now, when that
timeout would be processed next anyway.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

import simpy

from sim.kv_blocks import BlockPool
from sim.running_batch import SimSeq, blocks_for

if TYPE_CHECKING:
    from sim.cost_profile import CostProfile
    from sim.simulator import SimContext
    from sim.topology import PoolSpec


class PrefillInstance:
    def __init__(self, ctx: SimContext, name: str, pool: PoolSpec, profile: CostProfile, capacity_tokens: int,
                 first_token: str = "prefill"):
        self.ctx, self.name, self.pool, self.profile = ctx, name, pool, profile
        self.decode_emits_first = first_token == "decode"  # `Topology.first_token`
        self.blocks = BlockPool(capacity_tokens // pool.block_size_tokens, pool.block_size_tokens)
        self.queue: deque[SimSeq] = deque()  # arrived, waiting for a prefill batch
        self.outstanding = 0
        self.busy_s = 0.0
        self._freed: simpy.Event | None = None
        self._getter: simpy.Event | None = None  # idle: the process waits on it for a request
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
        if self._getter is not None and not self._getter.triggered:
            self._getter.succeed()

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
        prefill_cost = self.profile.prefill
        while True:
            if not queue:
                self._getter = env.event()
                yield self._getter
                self._getter = None
            head = queue.popleft()
            if env.peek() <= env.now:  # let what else is due now run first, as the Store's get event would
                yield env.timeout(0)
            tokens = head.rec.prompt_tokens
            need = blocks_for(tokens, bs)
            while need > blocks.free:
                self._freed = env.event()
                yield self._freed
            batch, squares = [head], tokens * tokens
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
                squares += n * n
            start = env.now
            for s in batch:
                s.rec.prefill_start_s = start
            if start - self.last_sample_s >= ctx.sample_every_s:
                ctx.sample(self, len(queue), len(batch))
            dur = (prefill_cost.time_s(len(batch), float(tokens), float(squares))  # = profile.prefill_s
                   * ctx.prefill_factor(self.name, self.profile) * ctx.begin_step(self.profile))
            if ctx.speed_traces:
                dur *= ctx.speed(self.name, "prefill")[0]
            yield env.timeout(dur)
            ctx.end_step()
            self.busy_s += dur
            end = env.now
            decode_emits_first = self.decode_emits_first
            for s in batch:
                rec = s.rec
                rec.prefill_end_s = s.last_token_s = end
                s.context = rec.prompt_tokens
                if decode_emits_first:  # first_token_s is set by the decode instance's first step (RunningBatch)
                    s.remaining = rec.output_tokens
                else:
                    rec.first_token_s = end
                    s.remaining = rec.output_tokens - 1
                if s.remaining == 0:
                    self.release(s)
                    s.decode_instance.outstanding -= 1
                    ctx.finish(s, end)
                else:
                    s.decode_instance.receive(s)
            if end - self.last_sample_s >= ctx.sample_every_s:
                ctx.sample(self, len(queue), 0)
