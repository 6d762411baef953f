"""Closed-form decode batches: advance a whole batch to its next membership change in one simulator event.

Between membership changes a decode batch of B sequences runs identical steps whose cost grows linearly with the
summed context: step i (0-based) takes ``base + slope * (S0 + i * B)`` where ``S0`` is the summed context of the first
step. So k steps take ``T(k) = k * (base + slope * S0) + slope * B * k * (k - 1) / 2``, and the number of whole steps
that fit in a time span is the root of that quadratic. Per-token detail is kept as per-request aggregates: last token
time and largest inter-token gap (within a segment the last step is the longest, since slope >= 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sim.records import RequestRecord


@dataclass(slots=True, eq=False)
class SimSeq:
    """A request's mutable state inside the simulator. ``context`` = tokens in its KV cache; ``remaining`` = tokens
    still to produce; ``blocks`` = KV blocks held on the instance currently serving it."""

    rec: RequestRecord
    context: int
    remaining: int
    last_token_s: float
    blocks: int = 0  # on the decode / colocated instance
    src_blocks: int = 0  # on the prefill instance (disaggregated), until the KV has left it
    recompute: bool = False
    order: int = 0  # arrival order: the latest-arrived running sequence is preempted first
    prefill_instance: object = None
    decode_instance: object = None


def steps_time(k: int, base: float, slope: float, s0: float, batch: int) -> float:
    """T(k): time of k consecutive steps of a fixed batch (see module docstring)."""
    return k * (base + slope * s0) + slope * batch * k * (k - 1) / 2


def steps_done_by(elapsed: float, base: float, slope: float, s0: float, batch: int, k_max: int) -> int:
    """Largest k <= k_max with T(k) <= elapsed (whole steps completed after ``elapsed`` seconds)."""
    first = base + slope * s0
    qa = slope * batch / 2
    if qa <= 0:
        k = int(elapsed / first) if first > 0 else k_max
    else:
        qb = first - qa
        k = int((-qb + math.sqrt(qb * qb + 4 * qa * elapsed)) / (2 * qa))
    k = max(0, min(k, k_max))
    while k < k_max and steps_time(k + 1, base, slope, s0, batch) <= elapsed:
        k += 1
    while k > 0 and steps_time(k, base, slope, s0, batch) > elapsed:
        k -= 1
    return k


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def extra_blocks(seqs: list[SimSeq], steps: int, block_size: int) -> int:
    """New KV blocks the batch needs to run ``steps`` more steps (each step adds one token per sequence)."""
    return sum(max(0, -(-(s.context + steps) // block_size) - s.blocks) for s in seqs)


def extra_blocks_bound(batch: int, steps: int, block_size: int) -> int:
    """An upper bound of `extra_blocks` that needs no pass over the batch: each sequence crosses at most
    ``steps // block_size + 1`` block boundaries in ``steps`` steps."""
    return batch * (steps // block_size + 1)


def steps_until_out_of_blocks(seqs: list[SimSeq], free_blocks: int, block_size: int, k_max: int) -> int:
    """Largest k <= k_max whose extra block need fits in ``free_blocks`` (binary search; need grows with k)."""
    if extra_blocks_bound(len(seqs), k_max, block_size) <= free_blocks or \
            extra_blocks(seqs, k_max, block_size) <= free_blocks:
        return k_max
    lo, hi = 0, k_max  # need(lo) fits, need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if extra_blocks(seqs, mid, block_size) <= free_blocks:
            lo = mid
        else:
            hi = mid
    return lo
