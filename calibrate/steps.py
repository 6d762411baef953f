"""Timed prefill and decode steps of a real `ModelRunner`, one grid point per call.

- prefill point (b, L): b fresh sequences of L random prompt tokens; the timed call is ``runner.prefill(seqs)``
  (block reservation, the forward pass over b x L packed tokens, logits of the last tokens). Blocks are freed after.
- decode point (b, L): b sequences whose first L - 1 tokens count as cached (blocks reserved untimed with
  ``runner.reserve``; their KV content is whatever the cache holds, which does not change the work); the timed call
  is one ``runner.decode(seqs)`` that attends over L tokens per sequence. No prefill is needed, so a decode point at
  long context costs one step, not a prompt's worth of prefill.

Token ids are drawn once per point from a seeded generator, so reruns time identical inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from calibrate.device import StepTimer
from calibrate.grid import GridPoint
from engine.model.runner import ModelRunner, Sequence


class StepBench:
    """Times grid points on ``runner``: ``seconds = bench(point)``. ``seed`` fixes the token ids."""

    def __init__(self, runner: ModelRunner, timer: StepTimer, seed: int = 0):
        self.runner, self.timer = runner, timer
        self.vocab = runner.cfg.vocab_size
        self.seed = seed
        self._tokens: dict[tuple[str, int], list[list[int]]] = {}
        self._next_id = 0

    def _ids(self, p: GridPoint) -> list[list[int]]:
        key = (p.phase, p.index)
        if key not in self._tokens:
            rng = np.random.default_rng([self.seed, p.index, 0 if p.phase == "prefill" else 1])
            self._tokens[key] = rng.integers(0, self.vocab, size=(p.batch, p.length)).tolist()
        return self._tokens[key]

    def _seqs(self, p: GridPoint) -> list[Sequence]:
        seqs = []
        for ids in self._ids(p):
            seqs.append(Sequence(self._next_id, list(ids)))
            self._next_id += 1
        return seqs

    def __call__(self, p: GridPoint) -> float:
        seqs = self._seqs(p)
        try:
            if p.phase == "prefill":
                return self.timer(lambda: self.runner.prefill(seqs))
            for s in seqs:
                s.num_cached_tokens = p.length - 1
            self.runner.reserve(seqs, [p.length] * p.batch)
            return self.timer(lambda: self.runner.decode(seqs))
        finally:
            for s in seqs:
                self.runner.free(s)

    def warm_up(self, points: list[GridPoint], repeats: int = 2) -> None:
        """Run the smallest few points untimed (thread pools, allocator, first-call kernel selection)."""
        for p in sorted(points, key=lambda q: q.work)[:3]:
            for _ in range(repeats):
                self(p)


def cache_blocks_for(limits_tokens: int, max_batch: int, block_size: int) -> int:
    """KV blocks a runner needs to hold ``limits_tokens`` context tokens spread over up to ``max_batch`` sequences
    (one partly filled block per sequence of slack)."""
    return -(-limits_tokens // block_size) + max_batch + 1


def cuda_cache_tokens(kv_bytes_per_token: int, fraction: float = 0.5) -> int:
    """KV tokens that fit in ``fraction`` of the current CUDA device's free memory (after the weights are loaded)."""
    free, _ = torch.cuda.mem_get_info()
    return int(free * fraction) // kv_bytes_per_token
