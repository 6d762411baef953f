"""Fit `CostProfile` formulas to measured step times, weighted by relative error, and score them on held-out points.

Formulas (seconds; see `sim.cost_profile`)::

    prefill = a + b * sum(len) + c * sum(len^2) [+ d * num_seqs] [+ e * sum(len)^2]
    decode  = a_p + b_p * batch + c_p * sum(context)          piece p: the first whose max_batch >= batch

``sum(context)`` of a decode step is the simulator's convention: per sequence, tokens already cached + 1 (the step's
attention length). Coefficients are constrained to be >= 0 (each term is work that costs time). The objective is the
relative residual ``pred / measured - 1``, so a 1 ms step and a 300 ms step count the same; a soft-L1 loss (scale 2 %)
keeps a stray slow point from dragging the fit. Model variants (prefill with or without the batch term d and the
packed-tokens term e; 1-3 decode pieces split at measured batch sizes) are chosen by 5-fold cross-validated MAPE on
the fit points only; a more complex variant must win by >= 10 % relative and 0.3 points. Held-out points never take
part in fitting or choosing.

Pure numpy/scipy: no torch, so synthetic tests and the aiconfigurator import share it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, lsq_linear

from sim.cost_profile import DecodePiece, PrefillCost

log = logging.getLogger(__name__)

LAST_PIECE_MAX_BATCH = 1 << 30
WARN_HELDOUT_MAPE = 0.10
_FOLDS = 5
_MIN_PIECE_POINTS = 4


def fit_linear_relative(x: np.ndarray, y: np.ndarray, robust: bool = True) -> np.ndarray:
    """Non-negative ``coef`` minimising sum(rho(x @ coef / y - 1)); ``x`` ``[n, k]`` features, ``y`` ``[n]`` > 0 times.

    Raises ``ValueError`` on non-positive or non-finite times or fewer points than coefficients.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 2 or len(y) != len(x):
        raise ValueError(f"features {x.shape} and times {y.shape} do not match")
    if len(y) < x.shape[1]:
        raise ValueError(f"need at least {x.shape[1]} points to fit {x.shape[1]} coefficients, got {len(y)}")
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("step times must be finite and > 0")
    scale = np.maximum(np.abs(x).max(axis=0), 1e-300)  # columns of O(1) for conditioning
    a = x / scale / y[:, None]  # rows divided by y: relative residuals
    coef = lsq_linear(a, np.ones(len(y)), bounds=(0, np.inf), method="bvls").x
    if robust and len(y) > x.shape[1]:
        res = least_squares(lambda c: a @ c - 1.0, np.maximum(coef, 1e-12), bounds=(0, np.inf), loss="soft_l1",
                            f_scale=0.02, method="trf")
        coef = res.x
    return coef / scale


def relative_errors(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """|pred - actual| / actual, element-wise."""
    actual = np.asarray(actual, dtype=float)
    return np.abs(np.asarray(pred, dtype=float) - actual) / actual


def error_summary(pred: np.ndarray, actual: np.ndarray) -> dict:
    """{"points", "mape", "max_err"} with errors as fractions (0.05 = 5 %); NaNs when there are no points."""
    if len(actual) == 0:
        return {"points": 0, "mape": float("nan"), "max_err": float("nan")}
    err = relative_errors(pred, actual)
    return {"points": len(err), "mape": float(err.mean()), "max_err": float(err.max())}


def _prefill_features(num_seqs: np.ndarray, sum_tokens: np.ndarray, sum_sq: np.ndarray) -> np.ndarray:
    """``[n, 5]`` columns for a, b, c, d (num_seqs), e (sum(len)^2)."""
    return np.column_stack([np.ones_like(sum_tokens), sum_tokens, sum_sq, num_seqs, sum_tokens * sum_tokens]).astype(float)


def _prefill_columns(terms: str) -> list[int]:
    """Feature columns fitted for optional ``terms`` (a, b, c always)."""
    return [0, 1, 2] + ([3] if "d" in terms else []) + ([4] if "e" in terms else [])


def _folds(n: int) -> list[np.ndarray]:
    """Deterministic interleaved folds (point i in fold i % k) so every fold spans the grid."""
    k = min(_FOLDS, n)
    return [np.arange(i, n, k) for i in range(k)]


def _cv_mape(n: int, fit_predict) -> float:
    """Mean held-in-fold relative error: ``fit_predict(train_idx, test_idx) -> (pred, actual)``."""
    errs = []
    for test in _folds(n):
        train = np.setdiff1d(np.arange(n), test)
        try:
            pred, actual = fit_predict(train, test)
        except ValueError:
            return float("inf")
        errs.append(relative_errors(pred, actual))
    return float(np.concatenate(errs).mean())


def _better(new: float, old: float) -> bool:
    return new < old * 0.9 and new < old - 0.003


@dataclass(frozen=True)
class PrefillFit:
    """A fitted prefill cost and how it scored: ``cv_mape`` on fit points, ``terms`` the optional terms fitted
    ("" or any of "d" = batch term, "e" = packed-tokens term)."""

    cost: PrefillCost
    cv_mape: float
    terms: str

    def predict(self, num_seqs: np.ndarray, sum_tokens: np.ndarray, sum_sq: np.ndarray) -> np.ndarray:
        c, s1 = self.cost, np.asarray(sum_tokens, dtype=float)
        return (c.a_s + c.b_s * s1 + c.c_s * np.asarray(sum_sq) + c.d_s * np.asarray(num_seqs) + c.e_s * s1 * s1)


def fit_prefill(num_seqs, sum_tokens, sum_sq, time_s, terms: str | None = None) -> PrefillFit:
    """Fit ``a + b*sum(len) + c*sum(len^2) [+ d*num_seqs] [+ e*sum(len)^2]`` to per-point median times (seconds).

    ``terms`` None chooses the optional terms by cross-validation (simplest first); "", "d", "e" or "de" forces them.
    Raises ``ValueError`` with fewer than 4 points or bad times.
    """
    n_s, s1, s2, y = (np.asarray(v, dtype=float) for v in (num_seqs, sum_tokens, sum_sq, time_s))
    if len(y) < 4:
        raise ValueError(f"prefill fit needs at least 4 measured points, got {len(y)}")

    feats = _prefill_features(n_s, s1, s2)

    def cv(t: str) -> float:
        x = feats[:, _prefill_columns(t)]
        return _cv_mape(len(y), lambda tr, te: (x[te] @ fit_linear_relative(x[tr], y[tr]), y[te]))

    if terms is None:
        terms, score = "", cv("")
        for one in ("d", "e"):  # best single term first, then both
            s = cv(one)
            if _better(s, score) and (terms == "" or s < cv(terms)):
                terms, score = one, s
        if terms:
            both = cv("de")
            if _better(both, score):
                terms, score = "de", both
    else:
        score = cv(terms)
    cols = _prefill_columns(terms)
    coef = np.zeros(5)
    coef[cols] = fit_linear_relative(feats[:, cols], y)
    return PrefillFit(PrefillCost(*(float(c) for c in coef)), score, terms)


@dataclass(frozen=True)
class DecodeFit:
    """Fitted decode pieces (ascending ``max_batch``; the last covers all batches) and their cross-validated MAPE."""

    pieces: tuple[DecodePiece, ...]
    cv_mape: float

    def predict(self, batch: np.ndarray, sum_context: np.ndarray) -> np.ndarray:
        batch, ctx = np.asarray(batch), np.asarray(sum_context, dtype=float)
        out = np.empty(len(batch))
        for i, (b, c) in enumerate(zip(batch, ctx)):
            p = next((p for p in self.pieces if b <= p.max_batch), self.pieces[-1])
            out[i] = p.a_s + p.b_s * b + p.c_s * c
        return out


def _fit_pieces(batch: np.ndarray, ctx: np.ndarray, y: np.ndarray, splits: tuple[int, ...]) -> tuple[DecodePiece, ...]:
    """One linear fit per batch range; ``splits`` are the last batch sizes of all but the last piece."""
    bounds = (*splits, LAST_PIECE_MAX_BATCH)
    pieces, lo = [], 0
    for hi in bounds:
        sel = (batch > lo) & (batch <= hi)
        if sel.sum() < 3:
            raise ValueError(f"decode piece for batch {lo + 1}..{hi} has {sel.sum()} points")
        x = np.column_stack([np.ones(sel.sum()), batch[sel], ctx[sel]]).astype(float)
        a, b, c = fit_linear_relative(x, y[sel])
        pieces.append(DecodePiece(int(hi), float(a), float(b), float(c)))
        lo = hi
    return tuple(pieces)


def fit_decode(batch, sum_context, time_s, max_pieces: int = 3) -> DecodeFit:
    """Fit piecewise-in-batch ``a + b*batch + c*sum(context)`` to per-point median decode step times (seconds).

    Splits are tried at measured batch sizes, each piece needing >= 2 distinct batch sizes and >= 4 points; the number
    of pieces is chosen by cross-validation. Raises ``ValueError`` with fewer than 4 points or bad times.
    """
    b, c, y = np.asarray(batch, dtype=float), np.asarray(sum_context, dtype=float), np.asarray(time_s, dtype=float)
    if len(y) < 4:
        raise ValueError(f"decode fit needs at least 4 measured points, got {len(y)}")
    sizes = np.unique(b)

    def valid(splits: tuple[int, ...]) -> bool:
        edges = (0, *splits, np.inf)
        return all(len(np.unique(b[(b > lo) & (b <= hi)])) >= 2 and ((b > lo) & (b <= hi)).sum() >= _MIN_PIECE_POINTS
                   for lo, hi in itertools.pairwise(edges))

    def cv(splits: tuple[int, ...]) -> float:
        def fp(tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            fit = DecodeFit(_fit_pieces(b[tr], c[tr], y[tr], splits), 0.0)
            return fit.predict(b[te], c[te]), y[te]
        return _cv_mape(len(y), fp)

    best_splits: tuple[int, ...] = ()
    best = cv(())
    for k in range(1, max_pieces):
        cands = [s for s in itertools.combinations(sizes[:-1].astype(int).tolist(), k) if valid(s)]
        scored = [(cv(s), s) for s in cands]
        if scored:
            score, splits = min(scored)
            if _better(score, best):
                best, best_splits = score, splits
    log.debug("decode pieces split after batch %s (cv MAPE %.3f)", best_splits, best)
    return DecodeFit(_fit_pieces(b, c, y, best_splits), best)


def check_heldout(phase: str, summary: dict) -> None:
    """Log a loud warning when held-out MAPE exceeds `WARN_HELDOUT_MAPE` (10 %)."""
    if summary.get("points", 0) and summary["mape"] > WARN_HELDOUT_MAPE:
        log.warning("%s fit is poor: held-out MAPE %.1f %% (max %.1f %%) exceeds %.0f %%; the profile's %s times are "
                    "unreliable (noisy machine? too small a budget?)", phase, 100 * summary["mape"],
                    100 * summary["max_err"], 100 * WARN_HELDOUT_MAPE, phase)
