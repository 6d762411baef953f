"""Closed-form decode batches: advance a whole batch to its next membership change in one simulator event.

Between membership changes a decode batch of B sequences runs identical steps whose cost grows linearly with the
summed context: step i (0-based) takes ``base + slope * (S0 + i * B)`` where ``S0`` is the summed attention length of
the first step. So k steps take ``T(k) = k * (base + slope * S0) + slope * B * k * (k - 1) / 2``, and the number of
whole steps that fit in a time span is the root of that quadratic.

`RunningBatch` stores each member relative to a step counter ``g`` (steps the batch has run), so advancing k steps is
O(1) and every per-batch question is O(log B) or O(block_size), never O(B):
- context of a member = ``base + g``; it finishes when ``g`` reaches its ``finish_g`` (a heap);
- KV blocks held by a member = ceil((context + 1) / block_size) (its tokens plus room for the next one); summed over
  the batch that is ``sum(Q) + B * floor(g / bs) + #{r >= bs - g % bs}`` with ``base + bs = bs * Q + r``;
- a member's largest inter-token gap = max(its own first gap after joining, the largest step of every later segment),
  the latter from a suffix-max stack over segments.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from dataclasses import dataclass

from sim.records import RequestRecord


@dataclass(slots=True, eq=False)
class SimSeq:
    """A request's mutable state in the simulator. Outside a batch, ``context`` = tokens in its KV cache and
    ``remaining`` = tokens still to produce; inside one, the batch holds them (``base``, ``finish_g``)."""

    rec: RequestRecord
    context: int
    remaining: int
    last_token_s: float
    blocks: int = 0  # reserved on the decode / colocated instance while not in the batch
    src_blocks: int = 0  # on the prefill instance (disaggregated), until the KV has left it
    recompute: bool = False
    order: int = 0  # arrival order: the latest-arrived running sequence is preempted first
    prefill_instance: object = None
    decode_instance: object = None
    base: int = 0
    finish_g: int = 0
    joined_seg: int = 0
    member: bool = False


def steps_time(k: int, base: float, slope: float, s0: float, batch: int) -> float:
    """T(k): time of k consecutive steps of a fixed batch (see module docstring)."""
    return k * (base + slope * s0) + slope * batch * k * (k - 1) / 2


def steps_done_by(elapsed: float, base: float, slope: float, s0: float, batch: int, k_max: int) -> int:
    """Largest k <= k_max with T(k) <= elapsed (whole steps completed after ``elapsed`` seconds)."""
    first = base + slope * s0
    sb = slope * batch
    qa = sb / 2
    if qa <= 0:
        k = int(elapsed / first) if first > 0 else k_max
    else:
        qb = first - qa
        k = int((-qb + math.sqrt(qb * qb + 4 * qa * elapsed)) / (2 * qa))
    k = max(0, min(k, k_max))
    # T(k) as `steps_time` computes it, term for term (the same floats)
    while k < k_max and (k + 1) * first + sb * (k + 1) * k / 2 <= elapsed:
        k += 1
    while k > 0 and k * first + sb * k * (k - 1) / 2 > elapsed:
        k -= 1
    return k


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class RunningBatch:
    """The sequences decoding together on one instance (see the module docstring for the representation)."""

    def __init__(self, block_size: int, decode_context: str = "sum"):
        self.bs = block_size
        self._padded = decode_context == "padded"  # the longest context matters (else its heap is not kept)
        self.g = 0
        self.size = 0
        self.sum_base = 0
        self._q_sum = 0
        self._r_count = [0] * block_size
        self._heap: list[tuple[int, int, SimSeq]] = []
        self._members: dict[int, SimSeq] = {}
        self.last_token_s = -math.inf  # when the members present at the last segment end produced a token
        self._seg = 0  # segments run so far
        self._stack_idx: list[int] = []  # suffix-max stack over segments: indices ascending, values descending
        self._stack_val: list[float] = []
        self._new: list[SimSeq] = []  # joined since the last segment: their first gap is their own
        self._max_heap: list[tuple[int, int, SimSeq]] = []  # (-base, order, seq): the longest context
        self._blocks = 0  # blocks_at(g), kept up to date

    # --- membership ------------------------------------------------------------------------------------------------
    def add(self, s: SimSeq) -> None:
        """``s`` (context, remaining, last_token_s set) joins; it holds ceil((context + 1) / bs) blocks from now."""
        g, bs = self.g, self.bs
        s.base = base = s.context - g
        s.finish_g = g + s.remaining
        s.joined_seg = self._seg
        s.member = True
        q, r = divmod(base + bs, bs)
        self._q_sum += q
        self._r_count[r] += 1
        self._blocks += -(-(s.context + 1) // bs)
        self.sum_base += base
        self.size += 1
        self._members[id(s)] = s
        self._new.append(s)
        heapq.heappush(self._heap, (s.finish_g, s.order, s))
        if self._padded:
            heap = self._max_heap
            if len(heap) > 2 * self.size + 64:  # drop the entries of members gone (it is only cleaned lazily)
                heap[:] = [e for e in heap if e[2].member and e[2].base == -e[0]]
                heapq.heapify(heap)
            heapq.heappush(heap, (-base, s.order, s))

    def remove(self, s: SimSeq) -> None:
        """``s`` leaves (finished or preempted): its context, remaining and max gap are written back to it."""
        g, bs, base = self.g, self.bs, s.base
        s.context = base + g
        s.remaining = s.finish_g - g
        if s.joined_seg < self._seg:  # it ran at least one segment here
            s.rec.max_itl_s = max(s.rec.max_itl_s, self._suffix_max(s.joined_seg + 2))
            s.last_token_s = self.last_token_s
        s.member = False
        q, r = divmod(base + bs, bs)
        self._q_sum -= q
        self._r_count[r] -= 1
        self._blocks -= -(-(s.context + 1) // bs)
        self.sum_base -= base
        self.size -= 1
        del self._members[id(s)]

    def members(self) -> list[SimSeq]:
        return list(self._members.values())

    def latest_arrived(self) -> SimSeq:
        return max(self._members.values(), key=lambda s: s.order)

    # --- questions -------------------------------------------------------------------------------------------------
    def steps_to_next_finish(self) -> int:
        heap = self._heap
        while heap and not heap[0][2].member:
            heapq.heappop(heap)
        return heap[0][0] - self.g

    def blocks_at(self, g: int) -> int:
        """KV blocks the members hold when the counter reads ``g``."""
        bs = self.bs
        return self._q_sum + self.size * (g // bs) + sum(self._r_count[bs - g % bs:])

    def blocks(self) -> int:
        """KV blocks the members hold now."""
        return self._blocks

    def steps_fitting(self, free_for_batch: int, k_max: int) -> int:
        """Largest k <= k_max such that the batch, k steps on, holds at most ``free_for_batch`` blocks."""
        g, bs = self.g, self.bs
        if self._q_sum + self.size * ((g + k_max) // bs + 1) <= free_for_batch or \
                self.blocks_at(g + k_max) <= free_for_batch:
            return k_max
        lo, hi = 0, k_max
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.blocks_at(g + mid) <= free_for_batch:
                lo = mid
            else:
                hi = mid
        return lo

    def first_step_context(self, mode: str = "sum") -> int:
        """The next step's context term: summed attention length (every member's context + 1) for ``"sum"``, or
        batch x the longest attention length for ``"padded"``. Either grows by exactly ``size`` per step."""
        if mode == "sum":
            return self.sum_base + self.size * (self.g + 1)
        assert self._padded, "first_step_context('padded') on a batch not made with decode_context='padded'"
        heap = self._max_heap
        while heap and not (heap[0][2].member and heap[0][2].base == -heap[0][0]):
            heapq.heappop(heap)
        return self.size * (-heap[0][0] + self.g + 1) if heap else 0

    # --- time ------------------------------------------------------------------------------------------------------
    def advance(self, done: int, first_end: float, last_step: float, t_end: float) -> list[SimSeq]:
        """Every member produced ``done`` tokens; the first of them at ``first_end``, the last step took ``last_step``.
        Returns the members that finished (already removed, their records' max gap set)."""
        seg_gap = first_end - self.last_token_s  # the continuing members' gap into this segment
        if done > 1 and last_step > seg_gap:
            seg_gap = last_step
        if self._new:
            for s in self._new:  # joined since the last segment: the gap since its own last token
                if s.member:
                    if s.rec.first_token_s != s.rec.first_token_s:  # NaN: its first token is this segment's first
                        s.rec.first_token_s = first_end  # (`Topology.first_token` "decode"); not an inter-token gap
                        if done > 1 and last_step > s.rec.max_itl_s:
                            s.rec.max_itl_s = last_step
                        continue
                    gap = first_end - s.last_token_s
                    if done > 1 and last_step > gap:
                        gap = last_step
                    if gap > s.rec.max_itl_s:
                        s.rec.max_itl_s = gap
            self._new.clear()
        self._seg += 1
        vals, idx = self._stack_val, self._stack_idx  # push (seg, seg_gap) on the suffix-max stack
        while vals and vals[-1] <= seg_gap:
            vals.pop()
            idx.pop()
        idx.append(self._seg)
        vals.append(seg_gap)
        self.g = g = self.g + done
        self._blocks = self.blocks_at(g)
        self.last_token_s = t_end
        finished = []
        heap = self._heap
        while heap and (heap[0][0] <= g or not heap[0][2].member):
            s = heapq.heappop(heap)[2]
            if s.member:
                self.remove(s)
                finished.append(s)
        return finished

    def _suffix_max(self, start: int) -> float:
        i = bisect_left(self._stack_idx, start)
        return self._stack_val[i] if i < len(self._stack_val) else 0.0
