"""The colocated worker's prompt iterations (mixed into `engine.decode_worker.DecodeWorker`), as in
`sim.decode_instance`: prefill-first batches of whole prompts, or Sarathi-style mixed iterations with chunked prefill.

Prefill-first: at a step boundary with prompts waiting, take them FCFS while the batch stays within
``max_batch_size`` (running requests included), ``max_batch_tokens`` prompt tokens (the first prompt always fits)
and the headroom (blocks for prompt + 2 tokens next to the running batch's next step, as in the simulator;
prompt + 1 are reserved); run one prefill; the first tokens go to the router at once and the
requests join the running batch (``decode_start_s = prefill_end_s``).

Chunked: first preempt (LIFO) until every running request can grow by one token; then the iteration carries each
running request's next token plus prompt chunks from the queue head, ``max_batch_tokens - len(running)`` tokens in
all; a prompt whose last chunk ran samples its first token and joins. The step is one decode pass over the running
requests followed by one chunked prefill pass.
"""

from __future__ import annotations

import time

from engine.messages import Prefilled
from engine.worker import blocks_for


class ColocatedSteps:
    """Needs the `DecodeWorker` attributes: spec, runner, lock, running, prefill_q, _join, _advance, to_router."""

    def _prefill_batch(self) -> bool:
        bs, spec = self.spec.block_size, self.spec
        batch, tokens = [], 0
        with self.lock:
            while self.prefill_q and len(self.running) + len(batch) < spec.max_batch_size:
                s = self.prefill_q[0]
                n = s.prompt_len
                if (batch and tokens + n > spec.max_batch_tokens) or not self._headroom(blocks_for(n + 2, bs)):
                    break
                self.prefill_q.popleft()
                self.runner.reserve([s.seq], [n + 1])
                batch.append(s)
                tokens += n
        if not batch:
            return False
        t0 = time.monotonic()
        seqs = [s.seq for s in batch]
        first = self.runner.sample(self.runner.prefill(seqs), seqs)
        for s in batch:
            s.t_prefill = t0
        self._prefilled(batch, first, time.monotonic())
        return True

    def _prefilled(self, done: list, first: list[int], t1: float) -> None:
        items, finished = [], []
        for s, tok in zip(done, first):
            s.seq.token_ids.append(tok)
            s.remaining -= 1
            items.append((s.rid, tok, s.t_prefill))
            if s.remaining <= 0 or tok == s.eos_id:
                finished.append((s.rid, "stop" if tok == s.eos_id else "length"))
        ended = {rid for rid, _ in finished}
        self.to_router(Prefilled(t1, items, finished))
        with self.lock:
            for s in done:
                if s.rid in ended:
                    self.runner.free(s.seq)
                else:
                    self._join(s)

    def _mixed_iteration(self) -> bool:
        alloc, bs, spec = self.runner.cache.allocator, self.spec.block_size, self.spec

        def growth(seqs: list) -> int:
            return sum(max(0, blocks_for(len(s.seq.token_ids), bs) - len(s.seq.block_table)) for s in seqs)

        chunks: list[tuple[object, int]] = []
        with self.lock:
            while self.running and growth(self.running) > alloc.num_free_blocks:
                self._preempt_one()
            run = list(self.running)
            grow = self.growth()
            budget = spec.max_batch_tokens - len(run)
            now = time.monotonic()
            for s in self.prefill_q:
                if budget <= 0 or len(run) + len(chunks) >= spec.max_batch_size:
                    break
                cached = s.seq.num_cached_tokens
                left = s.prompt_len - cached
                n = min(left, budget)
                end = cached + n + (1 if n == left else 0)
                if blocks_for(end, bs) - len(s.seq.block_table) + (n == left) + grow > alloc.num_free_blocks:
                    break
                self.runner.reserve([s.seq], [end])
                if not s.t_prefill:
                    s.t_prefill = now
                chunks.append((s, n))
                budget -= n
            if not chunks:
                return False
            if run:
                self.runner.reserve([s.seq for s in run], [len(s.seq.token_ids) for s in run])
        t0 = time.monotonic()
        dec = self.runner.sample(self.runner.decode([s.seq for s in run]), [s.seq for s in run]) if run else []
        seqs = [s.seq for s, _ in chunks]
        logits = self.runner.prefill(seqs, [n for _, n in chunks])
        t1 = time.monotonic()
        if run:
            self._advance(run, dec, t0, t1)
        rows = [i for i, (s, _) in enumerate(chunks) if s.seq.num_cached_tokens >= s.prompt_len]
        if rows:
            done = [chunks[i][0] for i in rows]
            first = self.runner.sample(logits[rows], [s.seq for s in done])
            with self.lock:
                for s in done:
                    self.prefill_q.remove(s)
            self._prefilled(done, first, t1)
        return True
