"""A sequence's KV as whole cache blocks, for shipping between workers: the gather on the sender and the scatter on
the receiver each move contiguous block rows (``block_size * kv_heads * head_dim`` elements per layer and K/V),
which runs near memory-copy speed, instead of one small row per token.

Body layout: ``[layers, 2, blocks * block_size, kv_heads, head_dim]`` in the cache dtype, i.e. token-major like
`engine.model.kv_cache.KVPayload`, padded past ``num_tokens`` to a whole block. Padding lands in the receiver's
slots past the sequence's length, which are never read before they are written. A receiver with another block size
imports the first ``num_tokens`` tokens token by token instead.
"""

from __future__ import annotations

import torch

from engine.model.kv_cache import KVPayload, PagedKVCache


def body_shape(cache: PagedKVCache, num_tokens: int) -> list[int]:
    """Shape of the shipped body for ``num_tokens`` tokens (whole blocks)."""
    blocks = -(-num_tokens // cache.block_size)
    return [cache.layers, 2, blocks * cache.block_size, cache.kv_heads, cache.head_dim]


def body_bytes(cache: PagedKVCache, num_tokens: int) -> int:
    s = body_shape(cache, num_tokens)
    return s[0] * s[1] * s[2] * s[3] * s[4] * cache.kv.element_size()


def export_blocks(cache: PagedKVCache, block_table: list[int], num_tokens: int, out: torch.Tensor) -> None:
    """Gather the blocks holding the first ``num_tokens`` tokens into ``out`` (shape `body_shape`, cache dtype).

    Raises ValueError when the block table is too short or ``out`` does not match.
    """
    shape = body_shape(cache, num_tokens)
    nb = shape[2] // cache.block_size
    if len(block_table) < nb:
        raise ValueError(f"block table of {len(block_table)} blocks cannot hold {num_tokens} tokens")
    if list(out.shape) != shape or out.dtype != cache.dtype:
        raise ValueError(f"export buffer is {list(out.shape)} {out.dtype}, needs {shape} {cache.dtype}")
    rows = cache.kv.view(cache.layers * 2, cache.num_blocks, -1)  # [layers*2, blocks, block_size*kvh*d]
    idx = torch.tensor(block_table[:nb], dtype=torch.long, device=cache.device)
    torch.index_select(rows, 1, idx, out=out.view(cache.layers * 2, nb, -1))


def import_blocks(cache: PagedKVCache, block_table: list[int], data: torch.Tensor, num_tokens: int,
                  src_block_size: int) -> None:
    """Scatter a shipped body into ``block_table`` (already reserved for at least ``num_tokens`` tokens).

    Raises ValueError when shapes, dtype or the block table do not fit.
    """
    if data.shape[2] < num_tokens:
        raise ValueError(f"KV body holds {data.shape[2]} tokens, header says {num_tokens}")
    if src_block_size != cache.block_size or data.shape[2] % cache.block_size:
        cache.import_kv(block_table, KVPayload(data[:, :, :num_tokens]))
        return
    want = [cache.layers, 2, data.shape[2], cache.kv_heads, cache.head_dim]
    if list(data.shape) != want or data.dtype != cache.dtype:
        raise ValueError(f"KV body {list(data.shape)} {data.dtype} does not fit this cache ({want} {cache.dtype})")
    nb = data.shape[2] // cache.block_size
    if len(block_table) < nb:
        raise ValueError(f"block table of {len(block_table)} blocks cannot take {nb} shipped blocks")
    rows = cache.kv.view(cache.layers * 2, cache.num_blocks, -1)
    idx = torch.tensor(block_table[:nb], dtype=torch.long, device=cache.device)
    rows.index_copy_(1, idx, data.reshape(cache.layers * 2, nb, -1))
