"""Attention over the paged KV cache for packed prefill batches and one-token decode batches.

Both functions first write the layer's new K/V into the cache, then attend:

- prefill: tokens of several sequences packed back to back (no padding). A sequence starting at position 0 attends
  causally over its own fresh K/V (no cache read); a sequence continuing a cached prefix (chunked prefill) gathers its
  blocks and uses an explicit causal mask offset by the prefix length.
- decode: every sequence's blocks are gathered with one ``index_select`` into a reused buffer and read as a strided
  ``[batch, kv_heads, tokens, head_dim]`` view; the query heads sharing a KV head ride along as the query-length axis
  (``[batch, kv_heads, heads_per_kv, head_dim]``), so grouped-query attention needs no K/V repetition. Padding to the
  longest context is masked only when lengths differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model.kv_cache import PagedKVCache


@dataclass(frozen=True)
class PrefillMetadata:
    """Where a packed prefill batch's tokens go. Host lists are per sequence; tensors live on the cache device.

    ``block_ids[i]`` and ``masks[i]`` (``[new_tokens, start + new_tokens]`` bool, True = attend) are only set for
    sequences with ``start_pos[i] > 0``.
    """

    seq_lens: list[int]  # new tokens per sequence
    start_pos: list[int]  # tokens of each sequence already in the cache
    slots: torch.Tensor  # [N] int64 flat cache slot of each new token
    block_ids: list[torch.Tensor | None]
    masks: list[torch.Tensor | None]


@dataclass(frozen=True)
class DecodeMetadata:
    """Where a decode batch's tokens go and which blocks each sequence reads (all tensors on the cache device)."""

    slots: torch.Tensor  # [B] int64 flat cache slot of each sequence's new token
    block_ids: torch.Tensor  # [B * max_blocks] int64 block table rows, padded with any valid block id
    max_len: int  # longest context in the batch, new token included
    mask: torch.Tensor | None  # [B, 1, 1, max_len] bool, True = attend; None when all contexts are max_len long


def prefill_attention(cache: PagedKVCache, meta: PrefillMetadata, layer: int, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
    """q ``[N, heads, d]``, k, v ``[N, kv_heads, d]`` of packed new tokens -> attention output ``[N, heads, d]``."""
    cache.write(layer, meta.slots, k, v)
    kvh, d = k.shape[1], k.shape[2]
    outs, off = [], 0
    for i, (n, start) in enumerate(zip(meta.seq_lens, meta.start_pos)):
        qi = q[off:off + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if start == 0:
            ki = k[off:off + n].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, n, d]
            vi = v[off:off + n].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
        else:
            kv = cache.gather(layer, meta.block_ids[i])  # [2, blocks, block_size, kv_heads, d]
            kv = kv.view(2, 1, -1, kvh, d)[:, :, :start + n].transpose(2, 3)  # [2, 1, kv_heads, start + n, d]
            o = F.scaled_dot_product_attention(qi, kv[0], kv[1], attn_mask=meta.masks[i], enable_gqa=True)
        outs.append(o[0].transpose(0, 1))  # [n, heads, d]
        off += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def decode_attention(cache: PagedKVCache, meta: DecodeMetadata, layer: int, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
    """q ``[B, heads, d]``, k, v ``[B, kv_heads, d]`` of one new token per sequence -> output ``[B, heads, d]``."""
    cache.write(layer, meta.slots, k, v)
    b, heads, d = q.shape
    kvh = k.shape[1]
    kv = cache.gather(layer, meta.block_ids)  # [2, B * max_blocks, block_size, kv_heads, d]
    kv = kv.view(2, b, -1, kvh, d)[:, :, :meta.max_len].transpose(2, 3)  # [2, B, kv_heads, max_len, d]
    qg = q.view(b, kvh, heads // kvh, d)  # [B, kv_heads, heads_per_kv, d]: query head h uses kv head h // group
    o = F.scaled_dot_product_attention(qg, kv[0], kv[1], attn_mask=meta.mask)  # [B, kv_heads, heads_per_kv, d]
    return o.reshape(b, heads, d)
