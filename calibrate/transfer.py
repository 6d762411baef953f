"""KV-transfer sweep: time the engine's transports over message sizes and fit ``latency + bytes / bandwidth``.

Measurement is the engine's own helper, `engine.transport.bench.measure` (a real receiver process, one transfer in
flight, one-way time from the start of the body write to the receiver holding the whole body); this module only plans
the sizes for the budget, interleaves them, summarises and fits. Sizes run from 4 KiB up to 256 MiB in steps of 4x;
each round visits them in a new shuffled order (one receiver process per kind, ``repeats`` timed transfers per visit
after the helper's untimed warm-up). The largest sizes are dropped first when the budget is short.

The ceiling: `engine.transport.bench.copy_samples` (a same-process copy of 64 MiB), measured in the same run; the
fastest of 9 copies, as for every ceiling (`calibrate.ceilings`).
A transport that fails (e.g. ``cuda`` without NCCL) is logged and reported in ``fit.links[kind].error``; it gets no
`LinkSpec`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from calibrate import CalibrationError
from calibrate.fit import error_summary, fit_linear_relative
from calibrate.samples import SampleLog, outlier_mask, summarize_point
from sim.hardware import LinkSpec

log = logging.getLogger(__name__)

SIZES = [4096 * 4**i for i in range(9)]  # 4 KiB ... 256 MiB
_REPEATS = 2
_MIN_ROUNDS = 2
_MAX_ROUNDS = 6
_SPAWN_S = 1.0  # starting a receiver process
_FILL_BYTES_PER_S = 4e8  # the helper draws each visit's random body with numpy


def available_kinds(device) -> list[str]:
    """Transport kinds the engine has for ``device`` (``shm``, ``tcp``; plus ``cuda`` on a GPU); [] if the engine's
    transport package is not importable."""
    try:
        from engine.transport import KINDS
        from engine.transport.bench import measure  # noqa: F401
    except ImportError as e:
        log.warning("engine.transport is not available (%s): no KV-transfer sweep", e)
        return []
    return [k for k in KINDS if k != "cuda" or device.type == "cuda"]


def check_kinds(kinds: list[str], device) -> list[str]:
    """Validate requested transport kinds. Raises `CalibrationError` for an unknown kind, ``cuda`` without a CUDA
    device, or any kind when the engine's transport package is missing."""
    if not kinds:
        return []
    have = available_kinds(device)
    if not have:
        raise CalibrationError("transports asked for, but engine.transport is not available")
    from engine.transport import KINDS

    for k in kinds:
        if k not in KINDS:
            raise CalibrationError(f"unknown transport {k!r}; expected one of {', '.join(KINDS)} (or none)")
        if k not in have:
            raise CalibrationError(f"transport {k!r} needs a CUDA device; calibrate with --device cuda")
    return list(dict.fromkeys(kinds))


def plan_sizes(budget_s: float, kinds: int, copy_bytes_per_s: float) -> tuple[list[int], int]:
    """The sizes and rounds that fit ``budget_s`` for ``kinds`` transports, assuming a transfer runs at about a third
    of the copy bandwidth (a pessimistic guess: two copies plus protocol). At least the four smallest sizes."""
    def visit_s(n: int) -> float:
        return n / _FILL_BYTES_PER_S + (1 + _REPEATS) * (2e-4 + 3 * n / copy_bytes_per_s)

    per_kind = budget_s / max(kinds, 1) - _SPAWN_S
    for top in range(len(SIZES), 3, -1):
        sizes = SIZES[:top]
        rounds = int(per_kind // sum(visit_s(n) for n in sizes))
        if rounds >= _MIN_ROUNDS:
            return sizes, min(rounds, _MAX_ROUNDS)
    return SIZES[:4], _MIN_ROUNDS


def fit_link(kind: str, nbytes: np.ndarray, seconds: np.ndarray) -> tuple[LinkSpec, dict]:
    """Fit ``latency_s + nbytes / bandwidth`` to per-size median times; returns the link and its fit report."""
    bw_inv = fit_linear_relative(np.column_stack([np.ones(len(nbytes)), nbytes]), seconds)
    latency, per_byte = float(bw_inv[0]), float(bw_inv[1])
    if per_byte <= 0:  # every size took the same time: bandwidth from the largest message
        per_byte = float(seconds[-1] / nbytes[-1])
    link = LinkSpec(kind, 1.0 / per_byte, latency)
    err = error_summary(latency + nbytes * per_byte, seconds)
    return link, {"sizes": [int(n) for n in nbytes], "median_s": [float(s) for s in seconds], "mape": err["mape"],
                  "max_err": err["max_err"], "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
                  "latency_s": latency, "largest_bytes_per_s": float(nbytes[-1] / seconds[-1])}


def sweep_links(kinds: list[str], device, budget_s: float, samples: SampleLog, seed: int = 0,
                progress: Callable[[float], None] | None = None) -> tuple[dict[str, LinkSpec], dict]:
    """Measure and fit each transport in ``kinds`` within about ``budget_s`` seconds.

    Returns (links by kind, fit report with ``copy_ceiling_bytes_per_s`` and one entry per kind). Raw samples go to
    ``samples`` as phase ``transfer:<kind>`` (point = size index, round = visit round); the copy ceiling's samples
    as phase ``copy``.
    """
    from engine.transport import TransportError
    from engine.transport.bench import copy_samples, measure

    ceiling_n = 64 << 20
    copy_t = np.array(copy_samples(ceiling_n, repeats=9))
    for i, t in enumerate(copy_t):
        samples.add("copy", 0, i, float(t), nbytes=ceiling_n)
    copy_bw = ceiling_n / float(copy_t.min())  # a ceiling: the best of the run (see calibrate.ceilings)
    sizes, rounds = plan_sizes(budget_s, len(kinds), copy_bw)
    rng = np.random.default_rng(seed)
    links: dict[str, LinkSpec] = {}
    report: dict = {"copy_ceiling_bytes_per_s": copy_bw, "sizes": sizes, "rounds": rounds}
    for k, kind in enumerate(kinds):
        order = [int(sizes[i]) for _ in range(rounds) for i in rng.permutation(len(sizes))]
        try:
            raw = measure(kind, order, repeats=_REPEATS)
        except (TransportError, RuntimeError, OSError, ValueError) as e:  # reported, not fatal
            log.warning("transport %s: measurement failed: %s", kind, e)
            report[kind] = {"error": f"{type(e).__name__}: {e}"}
            continue
        phase = f"transfer:{kind}"
        visit = -1
        for j, r in enumerate(raw):
            visit += r["repeat"] == 0
            samples.add(phase, sizes.index(r["nbytes"]), visit // len(sizes), r["seconds"], nbytes=r["nbytes"])
        med = []
        for i, n in enumerate(sizes):
            t = np.array([r["seconds"] for r in raw if r["nbytes"] == n])
            samples.mark(phase, i, outlier_mask(t), "fit")
            med.append(summarize_point(t).median_s)
        links[kind], report[kind] = fit_link(kind, np.array(sizes, dtype=float), np.array(med))
        report[kind]["vs_copy"] = report[kind]["bandwidth_bytes_per_s"] / copy_bw
        if progress:
            progress((k + 1) / len(kinds))
    return links, report
