"""`BlockPool`: a paged KV cache's block accounting for one simulated instance (counts only, no contents)."""

from __future__ import annotations


class BlockPool:
    """``capacity`` blocks of ``block_size`` tokens. Every take is matched by a give; the pool asserts conservation."""

    __slots__ = ("block_size", "capacity", "peak", "used")

    def __init__(self, capacity_blocks: int, block_size: int):
        if capacity_blocks < 1:
            raise ValueError(f"KV pool needs at least one block, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self.block_size = block_size
        self.used = 0
        self.peak = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def take(self, n: int) -> None:
        assert 0 <= n <= self.free, f"taking {n} blocks with {self.free} free"
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def give(self, n: int) -> None:
        assert 0 <= n <= self.used, f"giving back {n} blocks with {self.used} in use"
        self.used -= n
