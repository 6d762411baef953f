"""`import_aic`: a `CostProfile` for a GPU you do not have, composed from aiconfigurator-core's measured kernels.

A step's time is the sum of its kernels, per layer (x ``layers``) plus once per step, for a Llama-family model at
tensor parallelism ``tp`` (heads, KV heads and the MLP split over ``tp`` GPUs; ``T`` = tokens in the step)::

    per layer:  qkv GEMM [T x h] @ [h x (heads + 2 kv_heads) d / tp]    attention (prefill: batch x prompt length,
                o GEMM   [T x heads d / tp] @ [.. x h]                   causal; decode: batch x context)
                gate+up GEMM [T x h] @ [h x 2 i / tp]                    down GEMM [T x i / tp] @ [.. x h]
                2 x add+RMSNorm, SiLU*mul: memory-bound (below)          2 x all-reduce of T x h elements (tp > 1)
    per step:   embedding gather, final norm (memory-bound), LM head GEMM [rows x h] @ [h x vocab / tp] for one row
                per sequence (its last token)

Memory-bound ops take ``bytes / (mem_bw x mem_bw_empirical_scaling_factor) + mem_empirical_constant_latency`` with
the figures of the GPU's system YAML (0.8 and 3 us for the Hopper files). Tables: `calibrate.aic_tables`.

The composed times are computed on the same kind of grid a measured calibration uses (`calibrate.grid`, GPU
bounds), the same formulas are fitted (`calibrate.fit`), and the fit is scored on the in-between held-out shapes:
``fit.prefill`` / ``fit.decode`` report how well the closed forms follow the kernel sums.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from calibrate import CalibrationError
from calibrate import aic_tables as at
from calibrate.fit import DecodeFit, PrefillFit, check_heldout, error_summary, fit_decode, fit_prefill
from calibrate.grid import GridLimits, build_grid
from sim.cost_profile import CostProfile
from sim.hardware import HARDWARE, LinkSpec
from sim.model_spec import PRESETS, ModelSpec, from_hf_config

log = logging.getLogger(__name__)


def resolve_model(model: str) -> ModelSpec:
    """A sim preset, a Hugging Face folder / config.json, or a config bundled with aiconfigurator-core
    (``meta-llama/Meta-Llama-3.1-8B``). Mixture-of-experts configs are refused (not a Llama-family dense model)."""
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]
    path = Path(model)
    if not path.exists():
        bundled = at.systems_dir().parent / "model_configs" / (model.replace("/", "--") + "_config.json")
        if not bundled.is_file():
            raise CalibrationError(f"unknown model {model!r}: expected a preset ({', '.join(sorted(PRESETS))}), a "
                                   f"Hugging Face folder, or a config bundled with {at.PACKAGE} "
                                   "(e.g. meta-llama/Meta-Llama-3.1-8B)")
        path = bundled
    cfg_path = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(cfg_path.read_text())
        spec = from_hf_config(cfg_path, name=model)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"model {model!r}: {e}") from e
    if any(k in cfg for k in ("num_local_experts", "n_routed_experts", "num_experts")):
        raise CalibrationError(f"model {model!r} is a mixture-of-experts model; import-aic composes dense "
                               "Llama-family models only")
    return spec


class StepComposer:
    """Sums kernel times for prefill and decode steps of ``model`` at ``tp`` on ``gpu`` (see the module doc)."""

    def __init__(self, model: ModelSpec, gpu: str, tp: int, framework: str = "vllm", version: str | None = None):
        if tp < 1 or model.heads % tp:
            raise CalibrationError(f"tp={tp} must be >= 1 and divide {model.name}'s {model.heads} attention heads")
        self.m, self.tp = model, tp
        self.system = at.system_spec(gpu)
        self.gemm_dir = at.table_folder(gpu, "gemm", framework, version)
        self.attn_dir = at.table_folder(gpu, "attention", framework, version)
        self.gemm = at.GemmTable(self.gemm_dir)
        kvh = max(model.kv_heads // tp, 1)
        self.ctx_attn, self.gen_attn, self.kernels = at.attention_tables(self.attn_dir, model.heads // tp, kvh,
                                                                         model.head_dim)
        self.allreduce = None
        if tp > 1:
            self.allreduce, self.kernels["allreduce"] = at.allreduce_curve(gpu, framework, version, tp)
        g = self.system["gpu"]
        self.mem_bw = g["mem_bw"] * g.get("mem_bw_empirical_scaling_factor", 1.0)
        self.mem_lat = g.get("mem_empirical_constant_latency", 0.0)

    def _mem(self, nbytes: float) -> float:
        return nbytes / self.mem_bw + self.mem_lat

    def _layers_and_head(self, tokens: float, rows: float, attention_s: float) -> float:
        m, tp, b = self.m, self.tp, self.m.dtype_bytes
        h, d, i = m.hidden_size, m.head_dim, m.intermediate_size
        qkv = (m.heads / tp + 2 * max(m.kv_heads // tp, 1)) * d  # KV heads are replicated when tp > kv_heads
        layer = (self.gemm(tokens, qkv, h) + self.gemm(tokens, h, m.heads * d / tp)
                 + self.gemm(tokens, 2 * i / tp, h) + self.gemm(tokens, h, i / tp) + attention_s
                 + 2 * self._mem(tokens * 4 * h * b) + self._mem(tokens * 3 * i / tp * b))
        if self.allreduce is not None:
            layer += 2 * self.allreduce(tokens * h)
        head = self._mem(tokens * h * b) + self._mem(rows * 2 * h * b) + self.gemm(rows, m.vocab_size / tp, h)
        if self.allreduce is not None:
            head += self.allreduce(tokens * h)  # vocab-parallel embedding
        return m.layers * layer + head

    def prefill_s(self, batch: int, length: int) -> float:
        """One prefill of ``batch`` prompts of ``length`` tokens each (seconds)."""
        return self._layers_and_head(batch * length, batch, self.ctx_attn(batch, length))

    def decode_s(self, batch: int, context: int) -> float:
        """One decode step of ``batch`` sequences attending over ``context`` tokens each (seconds)."""
        return self._layers_and_head(batch, batch, self.gen_attn(batch, context))


def import_aic(gpu: str = "h200_sxm", model: str = "llama-3.1-8b", tp: int = 1, framework: str = "vllm",
               version: str | None = None, seed: int = 0) -> CostProfile:
    """Compose and fit a profile for ``model`` on ``tp`` x ``gpu`` from aiconfigurator-core's ``framework`` tables
    (newest ``version`` by default). Raises `CalibrationError` when the package is missing or lacks the GPU,
    framework, version, head layout or TP degree."""
    spec = resolve_model(model).with_dtype("bf16")
    comp = StepComposer(spec, gpu, tp, framework, version)
    limits = GridLimits(max_prefill_tokens=32768, max_prefill_batch=32, max_decode_batch=512,
                        max_decode_tokens=1 << 22, max_len=min(spec.max_context_tokens, 16384), min_len=16)
    rng = np.random.default_rng(seed)
    info: dict[str, dict] = {}
    pre: PrefillFit | None = None
    dec: DecodeFit | None = None
    for phase in ("prefill", "decode"):
        pts = build_grid(phase, limits, rng)
        t = np.array([comp.prefill_s(p.batch, p.length) if phase == "prefill" else comp.decode_s(p.batch, p.length)
                      for p in pts])
        held = np.array([p.heldout for p in pts])
        b = np.array([p.batch for p in pts], dtype=float)
        s1 = np.array([p.sum_tokens for p in pts], dtype=float)
        s2 = np.array([p.sum_sq_tokens for p in pts], dtype=float)
        if phase == "prefill":
            pre = fit_prefill(b[~held], s1[~held], s2[~held], t[~held])
            pred, cv = pre.predict(b, s1, s2), pre.cv_mape
        else:
            dec = fit_decode(b[~held], s1[~held], t[~held])
            pred, cv = dec.predict(b, s1), dec.cv_mape
        h = error_summary(pred[held], t[held])
        check_heldout(f"imported {phase}", h)
        info[phase] = {"fit_points": int((~held).sum()), "heldout_points": h["points"], "cv_mape": cv,
                       "fit_mape": error_summary(pred[~held], t[~held])["mape"], "heldout_mape": h["mape"],
                       "heldout_max_err": h["max_err"],
                       "largest_shape": [int(b.max()), int(max(p.length for p in pts))]}
    assert pre is not None and dec is not None
    node = comp.system.get("node", {})
    links = {}
    if node.get("intra_node_bw"):
        links["aic-intra-node"] = LinkSpec("aic-intra-node", float(node["intra_node_bw"]),
                                           float(node.get("p2p_latency", 0)))
    if node.get("inter_node_bw"):
        links["aic-inter-node"] = LinkSpec("aic-inter-node", float(node["inter_node_bw"]),
                                           float(node.get("p2p_latency", 0)))
    preset = gpu.replace("_", "-")
    return CostProfile(
        name=f"aic:{spec.name}@{gpu}x{tp}", source="imported", prefill=pre.cost,
        decode=dec.pieces, tp=tp, hardware=preset if preset in HARDWARE else gpu, dtype="bf16", model=spec,
        links=links, memory_bytes=int(comp.system["gpu"]["mem_capacity"]) * tp,
        fit={**info, "source": {"package": at.PACKAGE, "package_version": _package_version(), "gpu": gpu,
                                "framework": framework, "gemm_tables": comp.gemm_dir.name,
                                "attention_tables": comp.attn_dir.name, "kernels": comp.kernels}},
        meta={"composition": "per-layer GEMMs + attention + memory-bound ops (+ all-reduce); see calibrate.aic_import"})


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(at.PACKAGE)
    except PackageNotFoundError:
        return "unknown"
