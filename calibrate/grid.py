"""The shapes a calibration times: prefill (batch x prompt length) and decode (batch x context) grid points.

Fit points form a geometric grid: batch sizes 1, 2, 4, ...; prompt lengths x2 apart from 32 (prefill), contexts x4
apart from 16 (decode: the step is linear in context, so fewer contexts and more repeats each), each length jittered
down by up to 12 %. Held-out points sit between grid lines (a random length inside a cell; batch sizes 1, 2, 4 ...
or 3, 6, 12, ...), so the held-out error measures interpolation to shapes the fit never saw. Every point's
sequences have the same length, so for a point of batch ``b`` and length ``L``::

    prefill:  num_seqs = b, sum(len) = b * L, sum(len^2) = b * L^2      (L prompt tokens each, nothing cached)
    decode:   batch = b,    sum(context) = b * L                          (L - 1 tokens cached + the new one, each)

`GridLimits` bounds the grid (tokens per prefill batch, KV tokens per decode step, the model's context); the time
budget then decides how much of it is measured (see `calibrate.sweep`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class GridPoint:
    """One shape to time: ``batch`` sequences of ``length`` tokens each (prompt for prefill, context for decode)."""

    phase: str
    index: int
    batch: int
    length: int
    heldout: bool

    @property
    def split(self) -> str:
        return "heldout" if self.heldout else "fit"

    @property
    def num_seqs(self) -> int:
        return self.batch

    @property
    def sum_tokens(self) -> int:
        """sum(len) for prefill, sum(context) for decode."""
        return self.batch * self.length

    @property
    def sum_sq_tokens(self) -> int:
        return self.batch * self.length * self.length

    @property
    def work(self) -> float:
        """A rough cost proxy used only to order the first (pilot) round: tokens plus a quadratic attention share."""
        return self.sum_tokens + (self.sum_sq_tokens / 2048 if self.phase == "prefill" else 0)


@dataclass(frozen=True)
class GridLimits:
    """Bounds of the grid: ``max_prefill_tokens`` per prefill batch, ``max_prefill_batch``, ``max_decode_batch``,
    ``max_decode_tokens`` = sum(context) of one decode step (bounded by the KV cache), ``max_len`` tokens per sequence
    (the model's context), ``min_len`` the shortest sequence."""

    max_prefill_tokens: int = 2048
    max_prefill_batch: int = 8
    max_decode_batch: int = 128
    max_decode_tokens: int = 65536
    max_len: int = 2048
    min_len: int = 16

    def __post_init__(self) -> None:
        if self.min_len < 2 or self.max_len < 2 * self.min_len:
            raise ValueError(f"grid needs max_len >= 2 x min_len >= 4, got min_len {self.min_len}, max_len {self.max_len}")
        for key in ("max_prefill_tokens", "max_prefill_batch", "max_decode_batch", "max_decode_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"grid limit {key} must be >= 1")

    @classmethod
    def for_device(cls, device_type: str, max_len: int, cache_tokens: int | None = None) -> GridLimits:
        """Defaults for ``cpu`` (small shapes; a step should take milliseconds) or ``cuda`` (serving shapes).

        ``max_len``: the model's longest sequence; ``cache_tokens``: KV tokens the device can hold for the decode sweep.
        """
        if device_type == "cuda":
            lim = cls(max_prefill_tokens=16384, max_prefill_batch=32, max_decode_batch=256, max_decode_tokens=1 << 20,
                      max_len=min(max_len, 8192), min_len=16)
        else:
            lim = cls(max_len=min(max_len, 2048))
        if cache_tokens is not None:
            lim = cls(lim.max_prefill_tokens, lim.max_prefill_batch, lim.max_decode_batch,
                      max(min(lim.max_decode_tokens, cache_tokens), lim.min_len), lim.max_len, lim.min_len)
        return lim


_START_LEN = {"prefill": 32, "decode": 16}
_LEN_RATIO = {"prefill": 2, "decode": 4}


def _geometric(lo: int, hi: int, ratio: int) -> list[int]:
    """lo, lo*ratio, ... <= hi, plus hi itself when the last step falls short of it."""
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= ratio
    if out and out[-1] < hi:
        out.append(hi)
    return out


def _between(lo: int, hi: int, rng: np.random.Generator) -> int:
    """A random length strictly between ``lo`` and ``hi``, log-uniform (lo + 1 if they are adjacent)."""
    x = round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    return min(max(x, lo + 1), hi - 1) if hi - lo > 1 else lo + 1


def build_grid(phase: str, limits: GridLimits, rng: np.random.Generator, heldout_fraction: float = 0.35) -> list[GridPoint]:
    """All candidate points of ``phase``: the geometric fit grid plus a seeded random subset of in-between held-out
    shapes (about ``heldout_fraction`` as many as fit points). Raises ``ValueError`` for an unknown phase.

    Lengths are not kept on round numbers: a fit point's length is its grid value minus a random 0-12 %, a held-out
    point's a random length inside its cell. Step time is not smooth in the length (measured on this CPU: a 184-token
    prefill took 31 ms, 176 and 192 tokens 23-25 ms), and real prompts have arbitrary lengths, so the fit must
    average over such shapes and the held-out error must include them.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    max_batch = limits.max_prefill_batch if phase == "prefill" else limits.max_decode_batch
    max_tokens = limits.max_prefill_tokens if phase == "prefill" else limits.max_decode_tokens
    lens = _geometric(max(limits.min_len, min(_START_LEN[phase], limits.max_len // 2)), limits.max_len,
                      _LEN_RATIO[phase])
    batches = _geometric(1, max_batch, 2)
    fit = [(b, n) for b in batches for n in lens if b * n <= max_tokens]
    cells = list(itertools.pairwise(lens))
    between_batches = [b * 3 // 2 for b in batches[1:-1]] if len(batches) > 2 else []
    cands = [(b, cell) for b in batches for cell in cells if b * cell[1] <= max_tokens]
    cands += [(b, cell) for b in between_batches for cell in cells if b * cell[1] <= max_tokens]
    n_held = min(len(cands), max(6, round(heldout_fraction * len(fit))))
    held = [cands[i] for i in sorted(rng.choice(len(cands), size=n_held, replace=False))] if cands else []
    shapes = [(b, max(limits.min_len, n - int(rng.integers(0, n // 8 + 1))), False) for b, n in fit]
    shapes += [(b, _between(lo, hi, rng), True) for b, (lo, hi) in held]
    return [GridPoint(phase, i, b, n, h) for i, (b, n, h) in enumerate(shapes)]
