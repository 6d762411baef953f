"""Simulation config files (YAML): parsed and validated on load; errors name the file, the key and what was expected.

Example (see sim/configs/)::

    model: llama-3.1-8b                 # preset or a path to a Hugging Face config.json / folder
    hardware: h100-sxm                  # preset (roofline), a profile JSON path, or {constant: {prefill_s: .., decode_step_s: ..}}
    workload:
      trace: azure-conv                 # bundled name or a path;  or  generator: {arrival: .., prompt: .., output: ..}
      num_requests: 2000
      rate_rps: 8                       # optional: rescale arrivals to this mean rate (or rate_scale: 2.0)
    topology:
      kind: disaggregated               # or colocated (then: colocated: {instances: 4, tp: 1, ...})
      prefill: {instances: 2, tp: 1, max_batch_tokens: 8192}
      decode: {instances: 2, tp: 1, max_batch_size: 256}
      link: nvlink4
      router: round_robin
      first_token: prefill              # or decode: the decode instance produces every token (vLLM's P/D)
    slo: {ttft_ms: 2000, tpot_ms: 100, percentile: 90, attainment: 0.9}
    seed: 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sim.cost_profile import CostProfile, constant_profile, roofline_profile
from sim.hardware import HARDWARE, get_hardware
from sim.metrics import SLO
from sim.model_spec import ModelSpec, get_model
from sim.request import Workload
from sim.topology import PoolSpec, Topology


class ConfigError(ValueError):
    """A config file is wrong; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolCfg(_Strict):
    instances: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    hardware: str | None = None
    max_batch_size: int = Field(256, ge=1)
    max_batch_tokens: int = Field(8192, ge=1)
    block_size_tokens: int = Field(16, ge=1)
    kv_capacity_tokens: int | None = Field(None, ge=1)
    memory_utilization: float = Field(0.9, gt=0, le=1)
    chunked_prefill: bool = False


class TopologyCfg(_Strict):
    kind: Literal["colocated", "disaggregated"]
    colocated: PoolCfg | None = None
    prefill: PoolCfg | None = None
    decode: PoolCfg | None = None
    link: str = "nvlink4"
    router: str = "round_robin"
    first_token: Literal["prefill", "decode"] = "prefill"

    @model_validator(mode="after")
    def _pools_match_kind(self) -> TopologyCfg:
        if self.kind == "colocated" and (self.colocated is None or self.prefill or self.decode):
            raise ValueError("kind: colocated needs a 'colocated' pool and no prefill/decode pools")
        if self.kind == "disaggregated" and (self.prefill is None or self.decode is None or self.colocated):
            raise ValueError("kind: disaggregated needs 'prefill' and 'decode' pools and no colocated pool")
        return self

    def build(self) -> Topology:
        pools = tuple(PoolSpec(role, **getattr(self, role).model_dump())
                      for role in ("colocated", "prefill", "decode") if getattr(self, role) is not None)
        return Topology(self.kind, pools, link=self.link, router=self.router, first_token=self.first_token)


class WorkloadCfg(_Strict):
    trace: str | None = None
    generator: dict[str, Any] | None = None
    num_requests: int | None = Field(None, ge=1)
    rate_rps: float | None = Field(None, gt=0)
    rate_scale: float | None = Field(None, gt=0)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1)
    max_total_tokens: int | None = Field(None, ge=2)
    seed: int | None = None

    @model_validator(mode="after")
    def _one_source(self) -> WorkloadCfg:
        if (self.trace is None) == (self.generator is None):
            raise ValueError("give exactly one of 'trace' or 'generator'")
        if self.generator is not None and self.num_requests is None:
            raise ValueError("a generator needs 'num_requests'")
        if self.rate_rps is not None and self.rate_scale is not None:
            raise ValueError("give at most one of 'rate_rps' and 'rate_scale'")
        return self

    def build(self, base_dir: Path, seed: int) -> Workload:
        from sim.traces import load_trace
        from sim.workload_gen import workload_from_dict

        if self.trace is not None:
            ref = self.trace
            if not Path(ref).is_absolute() and (base_dir / ref).exists():
                ref = str(base_dir / ref)
            w = load_trace(ref)
            if self.num_requests:
                w = w.head(self.num_requests)
        else:
            w = workload_from_dict({"name": "synthetic", **(self.generator or {}), "num_requests": self.num_requests,
                                    "seed": self.seed if self.seed is not None else seed})
        if self.rate_rps:
            w = w.with_rate(self.rate_rps)
        elif self.rate_scale:
            w = w.scale_rate(self.rate_scale)
        if self.max_prompt_tokens or self.max_output_tokens or self.max_total_tokens:
            w = w.clip_lengths(self.max_prompt_tokens, self.max_output_tokens, self.max_total_tokens)
        return w


class ConstantCfg(_Strict):
    prefill_s: float = Field(ge=0)
    decode_step_s: float = Field(ge=0)
    prefill_per_token_s: float = Field(0.0, ge=0)
    decode_per_seq_s: float = Field(0.0, ge=0)


class HardwareCfg(_Strict):
    constant: ConstantCfg | None = None
    profile: str | None = None
    preset: str | None = None


class SLOCfg(_Strict):
    ttft_ms: float = Field(default=2000.0, gt=0)
    tpot_ms: float = Field(default=100.0, gt=0)
    percentile: float = Field(default=90.0, gt=0, le=100)
    attainment: float = Field(default=0.9, gt=0, le=1)

    def build(self) -> SLO:
        return SLO(self.ttft_ms / 1e3, self.tpot_ms / 1e3, self.percentile, self.attainment)


class SimConfig(_Strict):
    model: str
    hardware: str | HardwareCfg
    workload: WorkloadCfg
    topology: TopologyCfg
    slo: SLOCfg = SLOCfg()
    seed: int = 0


class LoadedConfig:
    """A validated config with its parts built: model, topology, profiles per pool role, workload, SLO, seed."""

    def __init__(self, cfg: SimConfig, path: Path):
        self.cfg, self.path = cfg, path
        base = path.parent
        try:
            mref = cfg.model if not (base / cfg.model).exists() else str(base / cfg.model)
            self.model: ModelSpec = get_model(mref)
            self.topology: Topology = cfg.topology.build()
            self.profiles: dict[str, CostProfile] = {p.role: _profile(cfg.hardware, p, self.model, base)
                                                     for p in self.topology.pools}
            for pool in self.topology.pools:  # weights must fit: fail at load, naming the pool
                prof = self.profiles[pool.role]
                pool.kv_capacity(self.model, prof.memory_bytes if pool.hardware is None else None)
            self.workload: Workload = cfg.workload.build(base, cfg.seed)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError(f"{path}: {e}") from e
        self.slo: SLO = cfg.slo.build()
        self.seed = cfg.seed


def _profile(hw: str | HardwareCfg, pool: PoolSpec, model: ModelSpec, base: Path) -> CostProfile:
    if isinstance(hw, str):
        hw = HardwareCfg(profile=hw) if hw.endswith(".json") else HardwareCfg(preset=hw)
    if hw.constant is not None:
        return constant_profile(hw.constant.prefill_s, hw.constant.decode_step_s,
                                prefill_per_token_s=hw.constant.prefill_per_token_s,
                                decode_per_seq_s=hw.constant.decode_per_seq_s)
    if hw.profile is not None:
        p = Path(hw.profile)
        return CostProfile.load(p if p.is_absolute() or not (base / p).exists() else base / p)
    name = pool.hardware or hw.preset
    if name is None or name.lower() not in HARDWARE:
        raise ValueError(f"hardware: unknown preset {name!r}; expected one of {', '.join(sorted(HARDWARE))}, "
                         "a profile .json path, or {constant: {...}}")
    return roofline_profile(model, get_hardware(name), pool.tp)


def load_config(path: str | Path) -> LoadedConfig:
    """Read and validate a YAML simulation config; raises ConfigError naming the file and key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    try:
        cfg = SimConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "str", "HardwareCfg")))
            lines.append(f"{p}: {key or '(top level)'}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    return LoadedConfig(cfg, p)
