"""Paged KV cache: one preallocated tensor indexed by block, a free-list block allocator, and export/import of one
sequence's KV for shipping it between processes (prefill worker -> decode worker).

Layout: ``kv[layer, k_or_v, block, slot_in_block, kv_head, head_dim]``. A token's K (or V) for all heads is one
contiguous row, so writing a step's tokens is one ``index_copy_`` per layer, and gathering a sequence's blocks is one
``index_select`` over whole blocks (each block is ``block_size * kv_heads * head_dim`` contiguous elements); attention
then reads the gathered blocks as a strided ``[batch, kv_heads, tokens, head_dim]`` view without another copy.

Exported KV is token-granular (``[layers, 2, tokens, kv_heads, head_dim]``), so sender and receiver may use different
block sizes. Bytes on the wire are a small JSON header plus the raw tensor bytes: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAGIC = b"DKV1"


class OutOfBlocksError(RuntimeError):
    """Raised when the cache has fewer free blocks than a request needs; nothing is allocated in that case."""


class BlockAllocator:
    """Free list of KV blocks ``0 .. num_blocks - 1``. Blocks are handed out and returned in lists (block tables)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks off the free list. Raises `OutOfBlocksError` (allocating nothing) if too few."""
        if num_blocks > len(self._free):
            raise OutOfBlocksError(f"KV cache out of blocks: need {num_blocks}, {len(self._free)} free of "
                                   f"{self.num_blocks} (block_size {self.block_size} tokens)")
        blocks = [self._free.pop() for _ in range(num_blocks)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the free list. Raises ``ValueError`` on a block that is not allocated (double free)."""
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free or foreign block)")
            self._used.remove(b)
            self._free.append(b)


@dataclass(frozen=True)
class KVPayload:
    """One sequence's KV, all layers, detached from any cache: ``data [layers, 2, num_tokens, kv_heads, head_dim]``.

    ``to_bytes`` / ``from_bytes`` give an exact, pickle-free wire format (JSON header + raw little-endian tensor bytes).
    """

    data: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def raw(self) -> memoryview:
        """The tensor's bytes (copied to CPU if needed), without a further copy."""
        t = self.data.detach().contiguous().cpu()
        return memoryview(t.view(torch.uint8).reshape(-1).numpy())

    def checksum(self) -> str:
        """SHA-256 hex digest of the tensor bytes (costs a pass over the data, ~1 GB/s)."""
        return hashlib.sha256(self.raw()).hexdigest()

    def to_bytes(self) -> bytes:
        """Header (magic, JSON length, JSON with shape and dtype) followed by the raw tensor bytes."""
        header = json.dumps({"shape": list(self.data.shape), "dtype": str(self.data.dtype).removeprefix("torch.")})
        h = header.encode()
        return b"".join((_MAGIC, struct.pack("<I", len(h)), h, self.raw()))

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> KVPayload:
        """Inverse of `to_bytes`. Raises ``ValueError`` on a bad magic, header, dtype or length."""
        mv = memoryview(buf)
        if bytes(mv[:4]) != _MAGIC:
            raise ValueError("not a KV payload (bad magic)")
        (n,) = struct.unpack("<I", mv[4:8])
        try:
            header = json.loads(bytes(mv[8:8 + n]))
            dtype, shape = DTYPES[header["dtype"]], [int(s) for s in header["shape"]]
        except (ValueError, KeyError) as e:
            raise ValueError(f"bad KV payload header: {e}") from e
        body = mv[8 + n:]
        expect = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        if len(body) != expect or len(shape) != 5:
            raise ValueError(f"KV payload body is {len(body)} bytes, header {shape} {dtype} needs {expect}")
        data = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(dtype).reshape(shape)
        return cls(data)


class PagedKVCache:
    """Preallocated paged KV cache ``kv [layers, 2, num_blocks, block_size, kv_heads, head_dim]`` plus its allocator.

    Memory: ``num_blocks * block_size * 2 * layers * kv_heads * head_dim * element_size`` bytes, allocated once.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        self.layers, self.kv_heads, self.head_dim, self.block_size = layers, kv_heads, head_dim, block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.kv = torch.zeros(layers, 2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
        self._scratch = torch.empty(0, dtype=dtype, device=device)
        log.info("paged KV cache: %d blocks x %d tokens, %.1f MiB, %s on %s", num_blocks, block_size,
                 self.kv.numel() * self.kv.element_size() / 2**20, dtype, self.device)

    @staticmethod
    def blocks_for_bytes(budget_bytes: int, layers: int, kv_heads: int, head_dim: int, block_size: int,
                         dtype: torch.dtype) -> int:
        """How many blocks fit in ``budget_bytes``."""
        per_block = 2 * layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        return budget_bytes // per_block

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv.element_size()

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Flat slot ids (``block * block_size + offset``) of token positions ``start .. end - 1``."""
        bs, out = self.block_size, []
        for i in range(start // bs, -(-end // bs)):
            base = block_table[i] * bs
            out.extend(range(base + max(start - i * bs, 0), base + min(end - i * bs, bs)))
        return out

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ``[N, kv_heads, head_dim]`` of one layer at flat slots ``[N]`` (int64 on the cache device)."""
        flat = self.kv[layer].view(2, -1, self.kv_heads, self.head_dim)  # [2, num_blocks * block_size, kvh, d]
        flat[0].index_copy_(0, slots, k)
        flat[1].index_copy_(0, slots, v)

    def gather(self, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
        """Copy blocks ``[M]`` of one layer into a reused scratch buffer: ``[2, M, block_size, kv_heads, head_dim]``.

        The result is valid until the next `gather` call on this cache.
        """
        m = block_ids.shape[0]
        need = 2 * m * self.block_size * self.kv_heads * self.head_dim
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=self.dtype, device=self.device)
        out = self._scratch[:need].view(2, m, self.block_size, self.kv_heads, self.head_dim)
        return torch.index_select(self.kv[layer], 1, block_ids, out=out)

    def export_kv(self, block_table: list[int], num_tokens: int, out: torch.Tensor | None = None) -> KVPayload:
        """Copy the first ``num_tokens`` tokens' KV of a sequence (all layers) out of the cache, on the cache device.

        ``out``: an optional destination ``[layers, 2, num_tokens, kv_heads, head_dim]`` of the cache's dtype (e.g. a
        view of a shared-memory send buffer), so the gather is the only copy. Raises ``ValueError`` if the block table
        is too short for ``num_tokens`` or ``out`` has the wrong shape or dtype.
        """
        if len(block_table) * self.block_size < num_tokens:
            raise ValueError(f"block table of {len(block_table)} blocks cannot hold {num_tokens} tokens")
        shape = (self.layers, 2, num_tokens, self.kv_heads, self.head_dim)
        if out is not None and (tuple(out.shape) != shape or out.dtype != self.dtype):
            raise ValueError(f"export destination is {tuple(out.shape)} {out.dtype}, needs {shape} {self.dtype}")
        idx = torch.tensor(self.slots(block_table, 0, num_tokens), dtype=torch.long, device=self.device)
        flat = self.kv.view(self.layers, 2, -1, self.kv_heads, self.head_dim)
        if out is None:
            return KVPayload(flat.index_select(2, idx))  # [layers, 2, num_tokens, kv_heads, head_dim]
        torch.index_select(flat, 2, idx, out=out)
        return KVPayload(out)

    def import_kv(self, block_table: list[int], payload: KVPayload) -> None:
        """Write a payload's KV into the first ``payload.num_tokens`` positions of ``block_table``.

        Raises ``ValueError`` on a shape or dtype that does not match this cache, or a too-short block table.
        """
        data = payload.data
        want = (self.layers, 2, self.kv_heads, self.head_dim)
        if (data.shape[0], data.shape[1], data.shape[3], data.shape[4]) != want or data.dtype != self.dtype:
            raise ValueError(f"KV payload {tuple(data.shape)} {data.dtype} does not fit this cache "
                             f"(layers, 2, tokens, kv_heads, head_dim) = ({self.layers}, 2, *, {self.kv_heads}, "
                             f"{self.head_dim}) {self.dtype}")
        n = data.shape[2]
        if len(block_table) * self.block_size < n:
            raise ValueError(f"block table of {len(block_table)} blocks cannot hold {n} tokens")
        idx = torch.tensor(self.slots(block_table, 0, n), dtype=torch.long, device=self.device)
        flat = self.kv.view(self.layers, 2, -1, self.kv_heads, self.head_dim)
        flat.index_copy_(2, idx, data.to(self.device, non_blocking=True))


def kv_checksum(t: torch.Tensor) -> str:
    """SHA-256 hex digest of a tensor's raw bytes (dtype-exact; equal digests mean bitwise-equal contents)."""
    return KVPayload(t).checksum()
