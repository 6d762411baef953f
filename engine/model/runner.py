"""`ModelRunner`: runs prefill and decode steps of a Llama model over a paged KV cache, and samples tokens.

Shared by the calibration harness and the engine's prefill and decode workers. A worker owns one runner; the runner
owns the model and the cache. Scheduling (which sequences run in which step, preemption) is the caller's job; the
runner only reserves the KV blocks a step needs, raising `OutOfBlocksError` before doing any work if they do not fit.

Disaggregated flow::

    prefill worker                                   decode worker
    seq = Sequence(rid, prompt_ids, sampling)
    logits = runner.prefill([seq, ...])
    seq.token_ids.append(runner.sample(logits, [seq])[0])
    payload = runner.export_kv(seq) ───── bytes ───▶ seq = Sequence(rid, prompt_ids + [first], sampling)
    runner.free(seq)                                 runner.import_kv(seq, KVPayload.from_bytes(buf))
                                                     loop: logits = runner.decode(batch); append runner.sample(...)
                                                     runner.free(seq)

Sampling is deterministic per request and position: the token at index ``i`` of a sequence is drawn with a generator
seeded from ``(sampling.seed, i)``, so it does not matter which process samples it. Thread count is the caller's
choice (``torch.set_num_threads(1)`` per worker is fastest on the shared CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from engine.model.attention import DecodeMetadata, PrefillMetadata, decode_attention, prefill_attention
from engine.model.kv_cache import KVPayload, PagedKVCache
from engine.model.llama import Llama
from engine.model.loader import load_model

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 means greedy (argmax); > 0 samples from softmax(logits / temperature) with ``seed``."""

    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")


@dataclass
class Sequence:
    """A request's state as the runner sees it.

    ``token_ids``: prompt plus generated tokens. ``block_table``: the cache blocks holding its KV, in order.
    ``num_cached_tokens``: how many leading tokens have KV in the cache. Prefill computes
    ``token_ids[num_cached_tokens:]``; decode computes the single uncached last token.
    """

    seq_id: int
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0


def _derive_seed(seed: int, index: int) -> int:
    """Mix (seed, token index) into a 63-bit generator seed (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class ModelRunner:
    """Prefill / decode / sample for one model on one device, with a paged KV cache of ``num_blocks`` blocks.

    The cache has the model's dtype. ``block_size`` is in tokens.
    """

    def __init__(self, model: Llama, num_blocks: int, block_size: int = 16):
        self.model, self.cfg, self.device = model, model.cfg, model.device
        self.cache = PagedKVCache(self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, num_blocks,
                                  block_size, model.dtype, model.device)
        self._generator = torch.Generator(device=self.device)

    @classmethod
    def from_folder(cls, path: str | Path, num_blocks: int, block_size: int = 16, device: str = "cpu",
                    dtype: str | torch.dtype = "bf16") -> ModelRunner:
        """Load a Hugging Face Llama folder (see `engine.model.loader.load_model`) and build a runner on it."""
        return cls(load_model(path, device=device, dtype=dtype), num_blocks, block_size)

    # ---- blocks ----------------------------------------------------------------------------------------------------

    def reserve(self, seqs: list[Sequence], ends: list[int]) -> None:
        """Grow each sequence's block table to hold ``ends[i]`` tokens (prefill and decode call this themselves).

        All or nothing: raises `OutOfBlocksError` without allocating if the blocks do not all fit. A calibration run
        can reserve a long context and set ``num_cached_tokens`` to time decode steps without prefilling first.
        """
        alloc = self.cache.allocator
        need = [max(alloc.blocks_for_tokens(e) - len(s.block_table), 0) for s, e in zip(seqs, ends)]
        total = sum(need)
        if total > alloc.num_free_blocks:
            alloc.allocate(total)  # raises OutOfBlocksError with the counts
        for s, n in zip(seqs, need):
            if n:
                s.block_table.extend(alloc.allocate(n))

    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks to the cache and mark it as having no cached tokens."""
        self.cache.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def export_kv(self, seq: Sequence, out: torch.Tensor | None = None) -> KVPayload:
        """The KV of the sequence's cached tokens, ``[layers, 2, num_cached_tokens, kv_heads, head_dim]``, optionally
        gathered straight into ``out`` (see `PagedKVCache.export_kv`)."""
        return self.cache.export_kv(seq.block_table, seq.num_cached_tokens, out)

    def import_kv(self, seq: Sequence, payload: KVPayload) -> None:
        """Allocate blocks for a sequence that has none and fill them with ``payload`` (its first tokens' KV).

        Raises ``ValueError`` if the sequence already holds blocks, the payload is longer than ``seq.token_ids`` or
        does not match the cache; `OutOfBlocksError` if the cache is full.
        """
        if seq.block_table or seq.num_cached_tokens:
            raise ValueError(f"sequence {seq.seq_id} already holds KV blocks; free it before importing")
        if payload.num_tokens > len(seq.token_ids):
            raise ValueError(f"sequence {seq.seq_id}: payload has {payload.num_tokens} tokens, sequence only "
                             f"{len(seq.token_ids)}")
        self.reserve([seq], [payload.num_tokens])
        try:
            self.cache.import_kv(seq.block_table, payload)
        except ValueError:
            self.free(seq)
            raise
        seq.num_cached_tokens = payload.num_tokens

    # ---- steps -----------------------------------------------------------------------------------------------------

    def _check_tokens(self, seq: Sequence, end: int) -> None:
        if end > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence {seq.seq_id}: {end} tokens exceed the model's "
                             f"{self.cfg.max_position_embeddings}-token context")
        ids = seq.token_ids[seq.num_cached_tokens:end]
        if ids and (min(ids) < 0 or max(ids) >= self.cfg.vocab_size):
            raise ValueError(f"sequence {seq.seq_id}: token id outside [0, {self.cfg.vocab_size})")

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def prefill(self, seqs: list[Sequence], num_new_tokens: list[int] | None = None) -> torch.Tensor:
        """Compute KV for ``token_ids[num_cached_tokens:]`` of each sequence (packed, no padding) and return fp32
        logits ``[B, vocab]`` of each sequence's last computed token.

        ``num_new_tokens[i]`` limits sequence i to that many tokens (chunked prefill); a sequence with cached tokens
        attends to them. Raises ``ValueError`` on nothing to compute, a bad token id or a too-long sequence,
        `OutOfBlocksError` if the cache lacks blocks (nothing is computed or allocated then).
        """
        if not seqs:
            raise ValueError("prefill needs at least one sequence")
        news = num_new_tokens or [len(s.token_ids) - s.num_cached_tokens for s in seqs]
        ends = [s.num_cached_tokens + n for s, n in zip(seqs, news)]
        for s, n, e in zip(seqs, news, ends):
            if n <= 0 or e > len(s.token_ids):
                raise ValueError(f"sequence {s.seq_id}: cannot prefill {n} tokens from position "
                                 f"{s.num_cached_tokens} of {len(s.token_ids)}")
            self._check_tokens(s, e)
        self.reserve(seqs, ends)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        block_ids: list[torch.Tensor | None] = []
        masks: list[torch.Tensor | None] = []
        for s, e in zip(seqs, ends):
            a = s.num_cached_tokens
            ids.extend(s.token_ids[a:e])
            pos.extend(range(a, e))
            slots.extend(self.cache.slots(s.block_table, a, e))
            if a:
                keys = torch.arange(e, device=self.device)
                masks.append(keys[None, :] <= torch.arange(a, e, device=self.device)[:, None])  # [e - a, e]
                block_ids.append(self._tensor(s.block_table[:self.cache.allocator.blocks_for_tokens(e)]))
            else:
                masks.append(None)
                block_ids.append(None)
        meta = PrefillMetadata(news, [s.num_cached_tokens for s in seqs], self._tensor(slots), block_ids, masks)
        last = self._tensor([x - 1 for x in _cumsum(news)])
        logits = self.model(self._tensor(ids), self._tensor(pos), partial(prefill_attention, self.cache, meta), last)
        for s, e in zip(seqs, ends):
            s.num_cached_tokens = e
        return logits

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One decode step: compute each sequence's last (uncached) token and return fp32 logits ``[B, vocab]``.

        Raises ``ValueError`` unless every sequence has exactly one uncached token, `OutOfBlocksError` if a
        sequence needs a new block and none is free (nothing is computed then).
        """
        if not seqs:
            raise ValueError("decode needs at least one sequence")
        lens = [len(s.token_ids) for s in seqs]
        for s, n in zip(seqs, lens):
            if s.num_cached_tokens != n - 1:
                raise ValueError(f"sequence {s.seq_id}: decode needs exactly one uncached token, has "
                                 f"{n - s.num_cached_tokens} (cached {s.num_cached_tokens} of {n}); prefill first")
            self._check_tokens(s, n)
        self.reserve(seqs, lens)
        max_len = max(lens)
        blocks = self.cache.allocator.blocks_for_tokens(max_len)
        rows: list[int] = []
        slots: list[int] = []
        for s, n in zip(seqs, lens):
            row = s.block_table[:self.cache.allocator.blocks_for_tokens(n)]
            rows.extend(row + [row[0]] * (blocks - len(row)))
            slots.extend(self.cache.slots(s.block_table, n - 1, n))
        mask = None
        if min(lens) != max_len:
            mask = (torch.arange(max_len, device=self.device)[None, :] < self._tensor(lens)[:, None])[:, None, None]
        meta = DecodeMetadata(self._tensor(slots), self._tensor(rows), max_len, mask)
        ids = self._tensor([s.token_ids[-1] for s in seqs])
        logits = self.model(ids, self._tensor([n - 1 for n in lens]), partial(decode_attention, self.cache, meta))
        for s, n in zip(seqs, lens):
            s.num_cached_tokens = n
        return logits

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Next token per sequence from logits ``[B, vocab]``: argmax for temperature 0, else an exponential-race
        (Gumbel-max) draw from softmax(logits / T) seeded by ``(seed, len(token_ids))``. One host sync in total."""
        scores = logits
        if any(s.sampling.temperature > 0 for s in seqs):
            scores = logits.clone()
            for i, s in enumerate(seqs):
                t = s.sampling.temperature
                if t > 0:
                    self._generator.manual_seed(_derive_seed(s.sampling.seed, len(s.token_ids)))
                    noise = torch.empty(logits.shape[1], device=logits.device).exponential_(generator=self._generator)
                    scores[i] = torch.log_softmax(logits[i] / t, dim=-1) - noise.log()  # [vocab]
        return scores.argmax(dim=-1).tolist()


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out
