"""A time-budgeted, interleaved sweep over grid points — the part of a calibration that copes with a noisy machine.

1. Pilot round (round 0): points in ascending order of estimated work, one visit each. It warms each shape up
   (allocator, kernel selection) and measures what a visit costs. Points are admitted while the pilot plus
   ``min_rounds`` more passes over the admitted points still fit the budget; bigger shapes are dropped. The budget
   thus shapes the grid. Round-0 samples are kept in the log but never used (marked rejected).
2. Timed rounds 1, 2, ...: every round visits the admitted points in a fresh shuffled order (seeded), so a slow spell
   on the shared machine spreads over many points instead of biasing a few. The first ``min_rounds`` rounds always
   complete; after that the sweep stops at the first visit that would overrun the budget (or after ``max_rounds``).
3. Samples are divided by the machine's estimated slow-down at the time (drift, from neighbouring samples of other
   points), then each point is summarised robustly (median after MAD outlier rejection; see `calibrate.samples`).

Raises `CalibrationError` when the budget cannot buy ``min_rounds`` samples of the cheapest point, or fewer than
``min_fit_points`` fit points.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from calibrate import CalibrationError
from calibrate.grid import GridPoint
from calibrate.samples import PointSummary, SampleLog, drift_factors, outlier_mask, summarize_point

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    """Measured points with their summaries, points dropped for the budget, timed rounds started, wall seconds."""

    points: list[GridPoint]
    summaries: dict[int, PointSummary]
    dropped: list[GridPoint]
    rounds: int
    wall_s: float

    def arrays(self, heldout: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(batch, sum_tokens, sum_sq_tokens, median_s) of the fit (False) or held-out (True) points."""
        pts = [p for p in self.points if p.heldout == heldout]
        return (np.array([p.batch for p in pts], dtype=float), np.array([p.sum_tokens for p in pts], dtype=float),
                np.array([p.sum_sq_tokens for p in pts], dtype=float),
                np.array([self.summaries[p.index].median_s for p in pts]))


def _record(samples: SampleLog, p: GridPoint, rnd: int, t: float) -> None:
    samples.add(p.phase, p.index, rnd, t, num_seqs=p.num_seqs, sum_tokens=p.sum_tokens,
                sum_sq_tokens=p.sum_sq_tokens if p.phase == "prefill" else 0, max_len=p.length, split=p.split)


def sweep(points: list[GridPoint], time_point: Callable[[GridPoint], float], budget_s: float, samples: SampleLog,
          rng: np.random.Generator, *, min_rounds: int = 3, max_rounds: int = 40, min_fit_points: int = 4,
          progress: Callable[[float], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> SweepResult:
    """Measure ``points`` with ``time_point(point) -> seconds`` within ``budget_s`` wall seconds (see module doc).

    ``progress(fraction)`` is called after every visit with the fraction of the budget used.
    """
    if not points:
        raise CalibrationError("nothing to measure: the grid is empty (model context too short?)")
    phase = points[0].phase
    start = clock()
    cost: dict[int, float] = {}
    admitted: list[GridPoint] = []
    ordered = sorted(points, key=lambda p: (p.work, p.batch))
    for p in ordered:
        if admitted:
            last = admitted[-1]
            est = cost[last.index] * max(p.work / last.work, 1.0)
            if clock() - start + est * (1 + min_rounds) + sum(cost.values()) * min_rounds > budget_s:
                break
        t0 = clock()
        _record(samples, p, 0, time_point(p))
        cost[p.index] = clock() - t0
        if not admitted and cost[p.index] * (1 + min_rounds) > budget_s:
            raise CalibrationError(f"--budget-s too small for {phase}: one sample of the smallest shape takes "
                                   f"{cost[p.index]:.3g} s and the sweep needs {1 + min_rounds} per point; give the "
                                   f"{phase} sweep at least {cost[p.index] * (1 + min_rounds) * 4:.1f} s")
        admitted.append(p)
        if progress:
            progress(min((clock() - start) / budget_s, 1.0))
    dropped = [p for p in points if p.index not in cost]
    n_fit = sum(not p.heldout for p in admitted)
    if n_fit < min_fit_points:
        per_round = sum(cost.values())
        raise CalibrationError(f"--budget-s too small for {phase}: it buys only {n_fit} fit point(s), the fit needs "
                               f"{min_fit_points}; a pass over the smallest points takes {per_round:.2f} s")
    if dropped:
        level = logging.WARNING if len(dropped) > len(points) / 2 else logging.INFO
        log.log(level, "%s: the budget admits %d of %d grid points (largest %d x %d tokens); bigger shapes will be "
                "extrapolated", phase, len(admitted), len(points), admitted[-1].batch, admitted[-1].length)

    rounds = 0
    stop = False
    while not stop and rounds < max_rounds:
        rounds += 1
        for i in rng.permutation(len(admitted)):
            p = admitted[i]
            if rounds > min_rounds and clock() - start + cost[p.index] > budget_s:
                stop = True
                break
            t0 = clock()
            _record(samples, p, rounds, time_point(p))
            cost[p.index] = clock() - t0
            if progress:
                progress(min((clock() - start) / budget_s, 1.0))

    timed_rows = [r for r in samples.rows if r["phase"] == phase and r["round"] > 0]
    drift = drift_factors(np.array([r["point"] for r in timed_rows]), np.array([r["time_s"] for r in timed_rows]))
    samples.set_drift(phase, 1, drift)
    summaries = {}
    for p in admitted:
        rows = [r for r in samples.rows if r["phase"] == phase and r["point"] == p.index]
        timed = np.array([r["time_s"] / r["drift"] for r in rows if r["round"] > 0])
        keep = outlier_mask(timed)
        samples.mark(phase, p.index, np.concatenate([[False] * (len(rows) - len(timed)), keep]), p.split)
        summaries[p.index] = summarize_point(timed)
    wall = clock() - start
    log.info("%s: %d points, %d rounds, %.1f s", phase, len(admitted), rounds, wall)
    return SweepResult(admitted, summaries, dropped, rounds, wall)
