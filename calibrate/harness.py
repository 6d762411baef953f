"""`run`: calibrate a model on this machine — measure, fit, write the `CostProfile` JSON and the raw samples.

Order of a run (all inside ``budget_s`` wall seconds, a target the grid is shaped to, overshooting by a visit or so):

    load model ─ ceilings (copy, GEMM) ─ warm-up ─ prefill sweep ─ decode sweep ─ transfer sweep ─ fit ─ write
                                                   45 % of rest    40 % of rest   15 % (if any)

Files (``out`` = ``profiles/NAME.json``): the profile at ``out`` and every raw sample at ``profiles/NAME.samples.parquet``
(see `calibrate.samples`). Nothing is written when ``out`` is None.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from calibrate import CalibrationError
from calibrate.grid import GridLimits, build_grid
from calibrate.model_source import resolve_model
from calibrate.samples import SampleLog
from calibrate.sweep import SweepResult, sweep
from sim.cost_profile import CostProfile
from sim.hardware import LinkSpec

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
_SHARES = {"prefill": 0.45, "decode": 0.40, "transfer": 0.15}


@dataclass(frozen=True)
class CalibrationResult:
    """The fitted profile, where it and its samples were written (None without ``out``), and the run's wall time."""

    profile: CostProfile
    profile_path: Path | None
    samples_path: Path | None
    wall_s: float


def samples_path_for(profile_path: str | Path) -> Path:
    """``profiles/NAME.json`` -> ``profiles/NAME.samples.parquet``."""
    p = Path(profile_path)
    return p.with_name(p.stem + ".samples.parquet")


def run(model: str = "tiny", device: str = "cpu", dtype: str = "bf16", budget_s: float = 120.0,
        out: str | Path | None = None, *, name: str | None = None, seed: int = 0, threads: int | None = 1,
        transports: list[str] | None = None, limits: GridLimits | None = None,
        progress: Progress | None = None) -> CalibrationResult:
    """Measure prefill and decode step times of ``model`` on ``device`` and KV-transfer times of the engine's
    transports, fit them, and return (and write, with ``out``) a calibrated `CostProfile`.

    ``model``: ``tiny`` (random weights, created in a temporary folder from ``seed``) or a Hugging Face folder.
    ``threads``: torch threads on CPU (1 is fastest on a shared CPU; None keeps torch's setting); restored after.
    ``transports``: transport kinds to sweep (None = all the engine has, [] = none). ``limits`` overrides the grid's
    bounds. ``progress(task, fraction)`` follows the run. Raises `CalibrationError` on bad input (see the package).
    """
    if not (isinstance(budget_s, (int, float)) and math.isfinite(budget_s) and budget_s > 0):
        raise CalibrationError(f"--budget-s must be a positive number of seconds, got {budget_s!r}")
    if out is not None and Path(out).suffix != ".json":
        raise CalibrationError(f"--out {out}: the profile is a JSON file; name it like profiles/NAME.json")
    import torch

    from calibrate import ceilings, transfer
    from calibrate import device as dev_mod
    from calibrate.steps import StepBench, cache_blocks_for, cuda_cache_tokens
    from engine.model.loader import load_model
    from engine.model.runner import ModelRunner

    started = time.perf_counter()
    dev = dev_mod.resolve_device(device)
    dev_mod.check_dtype(dtype, dev)
    prev_threads = torch.get_num_threads()
    if threads is not None and dev.type == "cpu":
        torch.set_num_threads(threads)
    report = progress or (lambda task, frac: None)
    rng = np.random.default_rng(seed)
    try:
        with tempfile.TemporaryDirectory(prefix="disagg-calibrate-") as tmp:
            folder, spec = resolve_model(model, dtype, Path(tmp), seed)
            report("loading model", 0.0)
            try:
                weights = load_model(folder, device=dev, dtype=dtype)
            except (FileNotFoundError, ValueError) as e:
                raise CalibrationError(f"cannot load model {model!r}: {e}") from e
        cache_tokens = cuda_cache_tokens(spec.kv_bytes_per_token) if dev.type == "cuda" else None
        limits = limits or GridLimits.for_device(dev.type, weights.cfg.max_position_embeddings, cache_tokens)
        grids = {ph: build_grid(ph, limits, rng) for ph in ("prefill", "decode")}
        blocks = cache_blocks_for(max(limits.max_decode_tokens, limits.max_prefill_tokens),
                                  max(limits.max_decode_batch, limits.max_prefill_batch), 16)
        runner = ModelRunner(weights, num_blocks=blocks, block_size=16)
        env = dev_mod.environment(dev, dtype)
        report("ceilings", 0.0)
        ceil = {"copy": ceilings.copy_bandwidth(dev), "gemm": ceilings.gemm_flops(dev, dtype)}
        bench = StepBench(runner, dev_mod.StepTimer(dev), seed)
        bench.warm_up(grids["prefill"] + grids["decode"])

        kinds = transfer.available_kinds(dev) if transports is None else transfer.check_kinds(transports, dev)
        shares = dict(_SHARES) if kinds else {"prefill": 0.53, "decode": 0.47}
        samples = SampleLog()
        results: dict[str, SweepResult] = {}
        for phase in ("prefill", "decode"):
            budget = _phase_budget(budget_s, started, shares, phase)
            try:
                results[phase] = sweep(grids[phase], bench, budget, samples, rng,
                                       progress=partial(_phase_progress, report, f"{phase} sweep"))
            except CalibrationError as e:
                raise CalibrationError(f"{e} (--budget-s {budget_s:g} left {budget:.1f} s for it after "
                                       f"{time.perf_counter() - started:.1f} s of setup and earlier phases)") from e
        links: dict[str, LinkSpec] = {}
        link_fit: dict = {}
        if kinds:
            links, link_fit = transfer.sweep_links(kinds, dev, _phase_budget(budget_s, started, shares, "transfer"),
                                                   samples, seed, progress=lambda f: report("transfer sweep", f))
        report("fitting", 1.0)
        from calibrate.profile_fit import build_profile

        wall = time.perf_counter() - started
        profile = build_profile(name or _default_name(model, dev.type, dtype), spec, dev, dtype, results, links,
                                link_fit, ceil, env, meta={"budget_s": budget_s, "wall_s": round(wall, 2),
                                                           "seed": seed, "model_arg": str(model),
                                                           "grid": asdict(limits)})
    finally:
        torch.set_num_threads(prev_threads)
    profile_path = samples_file = None
    if out is not None:
        profile_path = Path(out)
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        samples_file = samples.write(samples_path_for(profile_path))
        profile = _with_meta(profile, samples_file=samples_file.name)
        profile.save(profile_path)
    wall = time.perf_counter() - started
    log.info("calibration of %s took %.1f s (budget %.0f s)", model, wall, budget_s)
    return CalibrationResult(profile, profile_path, samples_file, wall)


def _phase_budget(budget_s: float, started: float, shares: dict[str, float], phase: str) -> float:
    """This phase's share of what is left of the budget (3 % kept for fitting); unspent time flows to later phases."""
    names = list(shares)
    later = names[names.index(phase):]
    left = budget_s * 0.97 - (time.perf_counter() - started)
    return max(left, 0.0) * shares[phase] / sum(shares[k] for k in later)


def _phase_progress(report: Progress, task: str, fraction: float) -> None:
    report(task, fraction)


def _default_name(model: str, device_type: str, dtype: str) -> str:
    return f"{Path(model).name if Path(model).exists() else model}-{device_type}-{dtype}"


def _with_meta(profile: CostProfile, **extra: object) -> CostProfile:
    return replace(profile, meta={**profile.meta, **extra})
