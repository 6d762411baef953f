"""`Topology`: how instances are laid out — colocated (N instances x TP) or disaggregated (prefill pool + decode pool).

A pool is a set of identical instances; an instance uses ``tp`` devices of its pool's ``hardware``. The link between
pools carries KV from prefill to decode instances. KV capacity per instance is derived from device memory minus
weights (overridable with ``kv_capacity_tokens``).
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sim.hardware import get_hardware
from sim.model_spec import ModelSpec

if TYPE_CHECKING:
    from sim.cost_profile import CostProfile

ROLES = ("prefill", "decode", "colocated")
_LABEL = re.compile(r"(?:(\d+)P(\d+)D|(\d+)C)", re.IGNORECASE)


@dataclass(frozen=True)
class PoolSpec:
    """Identical instances of one role.

    ``max_batch_size``: sequences per iteration; ``max_batch_tokens``: prompt tokens per prefill batch (and the
    token budget per iteration with ``chunked_prefill``); ``block_size_tokens``: KV page size; ``kv_capacity_tokens``:
    KV cache size per instance (None = from ``hardware`` memory x ``memory_utilization`` minus weights).
    """

    role: str
    instances: int = 1
    tp: int = 1
    hardware: str | None = None
    max_batch_size: int = 256
    max_batch_tokens: int = 8192
    block_size_tokens: int = 16
    kv_capacity_tokens: int | None = None
    memory_utilization: float = 0.9
    chunked_prefill: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"pool role must be one of {ROLES}, got {self.role!r}")
        for key in ("instances", "tp", "max_batch_size", "max_batch_tokens", "block_size_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{self.role} pool: {key} must be >= 1, got {getattr(self, key)}")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < 1:
            raise ValueError(f"{self.role} pool: kv_capacity_tokens must be >= 1")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"{self.role} pool: memory_utilization must be in (0, 1]")

    @property
    def gpus(self) -> int:
        return self.instances * self.tp

    def kv_capacity(self, model: ModelSpec, memory_bytes: int | None = None) -> int:
        """KV tokens one instance holds: explicit, or (tp x device memory x utilisation - weights) / KV bytes per token.

        Raises ValueError when the weights do not fit or neither memory nor an explicit capacity is known.
        """
        if self.kv_capacity_tokens is not None:
            return self.kv_capacity_tokens
        if memory_bytes is None:
            if self.hardware is None:
                raise ValueError(f"{self.role} pool: set kv_capacity_tokens or a hardware preset to derive it from")
            memory_bytes = get_hardware(self.hardware).memory_bytes * self.tp
        free = memory_bytes * self.memory_utilization - model.weight_bytes
        if free <= 0:
            raise ValueError(f"{self.role} pool: {model.name} weights ({model.weight_bytes / 2**30:.1f} GiB) do not fit in "
                             f"{self.tp} x {self.hardware or 'device'} ({memory_bytes / 2**30:.1f} GiB at "
                             f"{self.memory_utilization:.0%}); raise tp")
        return int(free // model.kv_bytes_per_token)


@dataclass(frozen=True)
class Topology:
    """Colocated: one ``colocated`` pool. Disaggregated: a ``prefill`` and a ``decode`` pool joined by ``link``.

    ``router``: a policy name from `sim.router.POLICIES`. ``first_token`` (disaggregated): which instance produces a
    request's first output token — ``"prefill"`` (disagg's engine: the prefill step's token goes to the client at
    once) or ``"decode"`` (vLLM's P/D: the prefill instance's token is dropped, the decode instance produces every
    output token once the KV has arrived, so TTFT includes the transfer and a decode step).
    """

    kind: str
    pools: tuple[PoolSpec, ...]
    link: str = "nvlink4"
    router: str = "round_robin"
    name: str = ""
    meta: dict = field(default_factory=dict, compare=False)
    first_token: str = "prefill"

    def __post_init__(self) -> None:
        roles = sorted(p.role for p in self.pools)
        if self.kind == "colocated":
            if roles != ["colocated"]:
                raise ValueError(f"colocated topology needs exactly one colocated pool, got {roles}")
        elif self.kind == "disaggregated":
            if roles != ["decode", "prefill"]:
                raise ValueError(f"disaggregated topology needs one prefill and one decode pool, got {roles}")
        else:
            raise ValueError(f"topology kind must be 'colocated' or 'disaggregated', got {self.kind!r}")
        if self.first_token not in ("prefill", "decode"):
            raise ValueError(f"first_token must be 'prefill' or 'decode', got {self.first_token!r}")
        if not self.name:
            object.__setattr__(self, "name", self.label)

    def pool(self, role: str) -> PoolSpec:
        for p in self.pools:
            if p.role == role:
                return p
        raise KeyError(f"topology {self.name!r} has no {role} pool")

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    @property
    def label(self) -> str:
        """Short name: ``4C`` / ``4Cx2`` (instances x TP) or ``2P2D`` / ``2P(tp2)3D``."""
        def tp(p: PoolSpec) -> str:
            return f"(tp{p.tp})" if p.tp > 1 else ""
        if self.kind == "colocated":
            p = self.pools[0]
            return f"{p.instances}C{tp(p)}"
        pre, dec = self.pool("prefill"), self.pool("decode")
        return f"{pre.instances}P{tp(pre)}{dec.instances}D{tp(dec)}"

    @classmethod
    def colocated(cls, instances: int, tp: int = 1, hardware: str | None = None, router: str = "round_robin",
                  **pool_kw: object) -> Topology:
        return cls("colocated", (PoolSpec("colocated", instances, tp, hardware, **pool_kw),), router=router)  # type: ignore[arg-type]

    @classmethod
    def disaggregated(cls, prefill: int, decode: int, tp_prefill: int = 1, tp_decode: int = 1,
                      hardware: str | None = None, decode_hardware: str | None = None, link: str = "nvlink4",
                      router: str = "round_robin", **pool_kw: object) -> Topology:
        return cls("disaggregated", (PoolSpec("prefill", prefill, tp_prefill, hardware, **pool_kw),  # type: ignore[arg-type]
                                     PoolSpec("decode", decode, tp_decode, decode_hardware or hardware, **pool_kw)),  # type: ignore[arg-type]
                   link=link, router=router)

    @classmethod
    def from_label(cls, label: str, **kw: object) -> Topology:
        """``"2C"`` -> 2 colocated instances, ``"1P1D"`` -> 1 prefill + 1 decode (case-insensitive); ``kw`` go to
        `colocated` / `disaggregated` (pool settings, ``link``, ``router``). Raises ValueError on anything else."""
        m = _LABEL.fullmatch(label.strip())
        if not m or any(g is not None and int(g) < 1 for g in m.groups()):
            raise ValueError(f"topology label {label!r}: expected NC or NPMD with N, M >= 1, e.g. 2C or 1P1D")
        if m[3]:
            kw.pop("link", None)
            return cls.colocated(int(m[3]), **kw)  # type: ignore[arg-type]
        return cls.disaggregated(int(m[1]), int(m[2]), **kw)  # type: ignore[arg-type]

    def with_pool(self, role: str, **changes: object) -> Topology:
        return replace(self, pools=tuple(replace(p, **changes) if p.role == role else p for p in self.pools), name="")  # type: ignore[arg-type]


@dataclass(frozen=True)
class HostCPU:
    """Instances that share one host's CPU cores (e.g. disagg's CPU engine: every worker on one 2-core machine).

    Contention model: when an instance starts a step (a prefill batch, a mixed iteration or a decode segment), it
    counts the instances busy at that moment, itself included, adds ``background_cpu`` (cores' worth of other work on
    the host: the router, the load generator, other jobs), and if that exceeds ``cores`` the step runs
    ``(busy + background_cpu) / cores`` times slower (processor sharing). The factor is fixed for the step: busy-state
    changes in the middle of a decode segment are not seen (an approximation; segments are short).

    ``speed`` (optional): per instance name, a `SpeedTrace` of how much slower than the profile that instance's core
    ran over time (measured by `calibrate.host_speed`); each step is stretched by the factor in force when it starts,
    and a decode segment ends at the step running when the factor changes, so the next one picks up the new factor.
    ``contention=False`` keeps the speed traces and drops the contention model.

    ``pinned=True``: the workers are pinned one per core (disagg's ``Cluster(pin_cores=True)``), so no more instances
    than ``cores``, and a step never shares its core with another instance: it waits only for the background work
    that lands on its core, ``1 + core_wait * background_cpu`` times slower, where ``core_wait`` comes from the
    instance's profile (`CostProfile.core_wait`, measured per role by the serving calibration: the scheduler puts the
    background where it likes, e.g. on a 1P1D's prefill core) and is ``1 / cores`` (an even spread) for a profile
    without one. A step that starts while no other instance is mid-step waits ``core_wait_alone`` instead (when the
    profile has one): the background then has an idle core to run on (measured on 2C, each worker busy about half the
    time: steps waited 7-9 % of their CPU time with the other worker mid-step, 0.5-2 % without; processor sharing, by
    contrast, gives no wait below full load and the same to every instance).
    """

    cores: int
    background_cpu: float = 0.0
    speed: Mapping[str, SpeedTrace] = field(default_factory=dict)
    contention: bool = True
    pinned: bool = False

    def __post_init__(self) -> None:
        if self.cores < 1 or self.background_cpu < 0:
            raise ValueError(f"HostCPU needs cores >= 1 and background_cpu >= 0, got {self.cores}, {self.background_cpu}")

    def pinned_wait(self, profile: CostProfile, contended: bool = True) -> float:
        """How long a step of a pinned worker running ``profile`` waits for its core, as a fraction of its time:
        ``core_wait * background_cpu`` (``core_wait`` 1 / cores when the profile has none); for a step that starts
        while no other instance is mid-step (not ``contended``), the profile's ``core_wait_alone`` when it has one."""
        if profile.core_wait is None:
            return self.background_cpu / self.cores
        alone = profile.core_wait_alone
        return (profile.core_wait if contended or alone is None else alone) * self.background_cpu


@dataclass(frozen=True)
class SpeedTrace:
    """A piecewise-constant slowdown of one instance's steps over time, by step kind: from ``t_s[i]`` (simulation
    seconds, ascending) until the next change, prefill steps take ``prefill[i]`` and decode steps ``decode[i]`` times
    the profile's time (before ``t_s[0]`` the first factors hold). Shared hosts change speed under their tenants: on
    the 2-core machine disagg is developed on, each core's speed flips between two levels 1.3-2.8x apart for seconds
    at a time, independently per core."""

    t_s: tuple[float, ...]
    prefill: tuple[float, ...]
    decode: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.t_s)
        if not n or len(self.prefill) != n or len(self.decode) != n:
            raise ValueError(f"SpeedTrace needs equally long, non-empty t_s, prefill and decode "
                             f"(got {n}, {len(self.prefill)}, {len(self.decode)})")
        if any(b < a for a, b in zip(self.t_s, self.t_s[1:], strict=False)):
            raise ValueError("SpeedTrace.t_s must be ascending")
        if any(not (math.isfinite(f) and f > 0) for f in (*self.prefill, *self.decode)):
            raise ValueError("SpeedTrace factors must be finite and > 0")

    def at(self, kind: str, t: float) -> tuple[float, float]:
        """(factor for a ``kind`` step starting at ``t``, time of the next change or inf)."""
        i = max(0, bisect_right(self.t_s, t) - 1)
        nxt = self.t_s[i + 1] if i + 1 < len(self.t_s) else math.inf
        return (self.prefill if kind == "prefill" else self.decode)[i], nxt

