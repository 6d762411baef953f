"""`CostProfile`: how long a prefill batch, a decode step and a KV transfer take, for one model on one device kind.

Every profile, whatever its source, answers with the same explicit formulas (times in seconds)::

    prefill(batch)      = a + b * sum(len) + c * sum(len^2) + d * num_seqs [+ e * sum(len)^2]
    decode_step(batch)  = a_p + b_p * batch + c_p * context_term       piece p: the first whose max_batch >= batch
                          context_term = sum(context)                 (decode_context "sum": paged attention)
                                       = batch * max(context)         (decode_context "padded": every sequence
                                                                       padded to the longest, as disagg's CPU runner)
    transfer(nbytes)    = latency_s + nbytes / bandwidth_bytes_per_s   (a link preset or a measured transport)
    request_overhead_s  = a fixed delay before a request can be scheduled on an instance (default 0)

``request_overhead_s`` is for servers whose requests pass through an HTTP front end and another process before the
engine sees them (vLLM: API server -> EngineCore), with the way back to the client folded in: every request pays it
at its first instance, and in disaggregated mode again at the decode instance (added to the transfer's latency). It
is a delay, not busy time: other requests keep being served meanwhile.

``prefill_dispersion`` (optional) says how measured prefill steps spread around the formula: quantiles of measured /
predicted at evenly spaced probabilities from 0 to 1, ascending, mean 1 (the trapezoid mean of the piecewise-linear
quantile function). With one, the simulator stretches each prefill step by a factor drawn from it (seeded, per
instance): one deterministic time per shape puts every request of a length at the same TTFT, and a TTFT percentile
that falls between two length groups then lands on one group's edge while the real steps blur them. Measured with the
tiny model on a shared CPU (azure-conv lengths, 2C and 1P1D, 12 runs each): simulated with step costs fitted to each
run's own steps, TTFT p50 mean |error| 16.6 % without (sim too slow in 11 of 12 runs) and 5.6 % with (other runs);
with the calibrated profile, the same 12 runs' TTFT p90 24.6 % -> 15.0 %. Decode steps keep their mean: a TPOT
averages many of them. Absent = every step takes the formula's time (roofline, imported, grid-calibrated profiles).

``core_wait`` (optional) is for workers pinned one per core on a shared host (disagg's CPU engine): the fraction of
its model-step time a step of this profile's worker waits for its core, per core's worth of other work on the host
(router, load generator, the worker's own threads, other jobs: `sim.topology.HostCPU.background_cpu`). The serving
calibration measures it (`calibrate.serving`); the simulator uses it with ``HostCPU(pinned=True)``. The scheduler
does not spread that work evenly: in a 1P1D run on 2 cores the prefill worker's steps waited 14 % of their CPU time
and the decode worker's 1 %, in 2C runs both ~10 %. Absent = even (1 / cores). Nor does it wait alike whether or not
the host's other workers are busy: when another worker is mid-step the background has no idle core to go to. Then
``core_wait`` holds for a step that starts while another instance is mid-step and ``core_wait_alone`` (optional,
absent = the same figure) for one that starts while none is. Measured in one 1P1D calibration: the prefill
worker's steps waited 17.5 % with the decode worker mid-step, 2.9 % without; in a 2C run with each worker busy about
half the time, 7-9 % and 0.5-2 %.

A chunk of ``n`` new tokens on top of ``p`` cached ones counts ``(p + n)^2 - p^2`` towards ``sum(len^2)``, so chunked
prefill costs the same attention work in total as one whole prefill. The optional ``e`` term (absent = 0) is for
devices whose per-token cost grows with the tokens packed into one batch (seen on the CPU runner: 8 x 256 tokens
cost as much as 8 separate 256-token prefills); calibrate/ fits it only when cross-validation says it helps.

Sources:
- ``constant``: fixed times (a only), for tests and hand-computed timelines.
- ``roofline``: derived from `ModelSpec` x `HardwareSpec` with the efficiency factors in `RooflineFactors` (documented there).
- ``calibrated``: coefficients fitted by calibrate/ from measurements, read from the JSON file it writes.

JSON format (``format: disagg.cost_profile``, ``version: 1``)::

    {"format": "disagg.cost_profile", "version": 1, "source": "calibrated", "name": "...", "model": {ModelSpec fields},
     "hardware": "cpu" | preset name, "tp": 1, "dtype": "bf16",
     "prefill": {"a_s": .., "b_s": .., "c_s": .., "d_s": .., "e_s": ..},     # e_s optional, written only if != 0
     "decode": [{"max_batch": 8, "a_s": .., "b_s": .., "c_s": ..}, ...],     # ascending max_batch; last covers all
     "links": {"shm": {"bandwidth_bytes_per_s": .., "latency_s": ..}, ...},  # measured transports (optional)
     "memory_bytes": int | null,  "fit": {...held-out errors...}, "environment": {...}, "meta": {...},
     "request_overhead_s": float,                                            # optional, 0 when absent
     "prefill_dispersion": [q0, ..., q1],                                    # optional, see above
     "core_wait": float, "core_wait_alone": float}                           # optional, see above
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path

from sim.hardware import HardwareSpec, LinkSpec
from sim.jsonfile import read_json
from sim.model_spec import ModelSpec

FORMAT = "disagg.cost_profile"
VERSION = 1


@dataclass(frozen=True)
class PrefillCost:
    """prefill(batch) = a_s + b_s * sum(len) + c_s * sum(len^2) + d_s * num_seqs + e_s * sum(len)^2."""

    a_s: float
    b_s: float = 0.0
    c_s: float = 0.0
    d_s: float = 0.0
    e_s: float = 0.0

    def time_s(self, num_seqs: int, sum_tokens: float, sum_sq_tokens: float) -> float:
        return (self.a_s + self.b_s * sum_tokens + self.c_s * sum_sq_tokens + self.d_s * num_seqs
                + self.e_s * sum_tokens * sum_tokens)

    def to_dict(self) -> dict:
        """JSON form; ``e_s`` only when non-zero, so profiles without it read as before."""
        d = asdict(self)
        if not d["e_s"]:
            del d["e_s"]
        return d


@dataclass(frozen=True)
class DecodePiece:
    """decode_step = a_s + b_s * batch + c_s * sum(context) for batch sizes up to ``max_batch``."""

    max_batch: int
    a_s: float
    b_s: float = 0.0
    c_s: float = 0.0


@dataclass(frozen=True)
class RooflineFactors:
    """Efficiency factors turning datasheet peaks into achievable times (roofline profiles).

    - ``hbm_efficiency`` 0.8: aiconfigurator-core's system files model achieved HBM bandwidth as 0.8 x peak.
    - ``prefill_mfu`` 0.6 / ``decode_mfu`` 0.5: fraction of peak dense bf16 FLOP/s reached by large / skinny GEMMs.
    - ``kernel_overhead_s`` 3 us per kernel and ``kernels_per_layer`` 8: aiconfigurator's ~3 us per memory-bound kernel.
    - ``allreduce_efficiency`` 0.8: measured NVLink4 all-reduce reaches ~80-83 % of spec; ``allreduce_latency_s`` 10 us.
    """

    hbm_efficiency: float = 0.8
    prefill_mfu: float = 0.6
    decode_mfu: float = 0.5
    kernel_overhead_s: float = 3e-6
    kernels_per_layer: int = 8
    allreduce_efficiency: float = 0.8
    allreduce_latency_s: float = 10e-6


@dataclass(frozen=True)
class CostProfile:
    """Step-time formulas for one model on one device kind at one tensor-parallel degree. See the module docstring."""

    name: str
    source: str
    prefill: PrefillCost
    decode: tuple[DecodePiece, ...]
    tp: int = 1
    hardware: str = ""
    dtype: str = "bf16"
    model: ModelSpec | None = None
    links: dict[str, LinkSpec] = field(default_factory=dict)
    memory_bytes: int | None = None
    decode_context: str = "sum"
    fit: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    request_overhead_s: float = 0.0
    prefill_dispersion: tuple[float, ...] = ()
    core_wait: float | None = None
    core_wait_alone: float | None = None

    def __post_init__(self) -> None:
        if self.source not in ("constant", "roofline", "calibrated", "imported"):
            raise ValueError(f"profile {self.name!r}: unknown source {self.source!r}")
        if not self.decode:
            raise ValueError(f"profile {self.name!r}: needs at least one decode piece")
        pieces = tuple(sorted(self.decode, key=lambda p: p.max_batch))
        object.__setattr__(self, "decode", pieces)
        if self.tp < 1:
            raise ValueError(f"profile {self.name!r}: tp must be >= 1")
        if not (math.isfinite(self.request_overhead_s) and self.request_overhead_s >= 0):
            raise ValueError(f"profile {self.name!r}: request_overhead_s must be a finite number >= 0, "
                             f"got {self.request_overhead_s!r}")
        if self.decode_context not in ("sum", "padded"):
            raise ValueError(f"profile {self.name!r}: decode_context must be 'sum' or 'padded', got {self.decode_context!r}")
        for key in ("core_wait", "core_wait_alone"):
            v = getattr(self, key)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"profile {self.name!r}: {key} must be a finite number >= 0, got {v!r}")
        if self.core_wait_alone is not None and self.core_wait is None:
            raise ValueError(f"profile {self.name!r}: core_wait_alone needs core_wait (the wait of a contended step)")
        q = tuple(float(x) for x in self.prefill_dispersion)
        object.__setattr__(self, "prefill_dispersion", q)
        if q and (len(q) < 2 or not all(math.isfinite(x) and x > 0 for x in q) or any(b < a for a, b in pairwise(q))):
            raise ValueError(f"profile {self.name!r}: prefill_dispersion must be >= 2 ascending positive quantiles, "
                             f"got {list(q)[:6]}{' ...' if len(q) > 6 else ''}")

    # --- the three questions -------------------------------------------------------------------------------------
    def prefill_s(self, lens: Sequence[int], cached: Sequence[int] | None = None) -> float:
        """Time of one prefill batch of sequences with ``lens`` new tokens each (on top of ``cached`` tokens each)."""
        if cached is None:
            return self.prefill.time_s(len(lens), float(sum(lens)), float(sum(n * n for n in lens)))
        sq = sum((p + n) ** 2 - p * p for n, p in zip(lens, cached, strict=True))
        return self.prefill.time_s(len(lens), float(sum(lens)), float(sq))

    def prefill_factor(self, u: float) -> float:
        """The ``prefill_dispersion`` quantile at probability ``u`` in [0, 1] (linear between the stored ones); 1
        without a dispersion. A uniform ``u`` gives a factor with the measured distribution and mean 1."""
        q = self.prefill_dispersion
        if not q:
            return 1.0
        x = min(max(u, 0.0), 1.0) * (len(q) - 1)
        i = min(int(x), len(q) - 2)
        return q[i] + (q[i + 1] - q[i]) * (x - i)

    def decode_linear(self, batch: int) -> tuple[float, float]:
        """(base_s, per_context_token_s): one decode step of ``batch`` sequences = base + per_token * sum(context)."""
        piece = self.decode[-1]
        for p in self.decode:
            if batch <= p.max_batch:
                piece = p
                break
        return piece.a_s + piece.b_s * batch, piece.c_s

    def decode_step_s(self, batch: int, sum_context: float) -> float:
        """Time of one decode step for ``batch`` sequences whose contexts add up to ``sum_context`` tokens."""
        base, per_token = self.decode_linear(batch)
        return base + per_token * sum_context

    def step_overhead_s(self) -> float:
        """The fixed per-iteration part shared by a mixed (prefill chunk + decode) iteration: counted once."""
        return min(self.prefill.a_s, self.decode[0].a_s)

    # --- JSON ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "source": self.source, "name": self.name, "hardware": self.hardware,
            "tp": self.tp, "dtype": self.dtype, "model": self.model.to_dict() if self.model else None,
            "prefill": self.prefill.to_dict(), "decode": [asdict(p) for p in self.decode],
            "links": {k: {"bandwidth_bytes_per_s": v.bandwidth_bytes_per_s, "latency_s": v.latency_s}
                      for k, v in self.links.items()},
            "memory_bytes": self.memory_bytes, "decode_context": self.decode_context, "fit": self.fit, "environment": self.environment, "meta": self.meta,
            **({"request_overhead_s": self.request_overhead_s} if self.request_overhead_s else {}),
            **({"prefill_dispersion": list(self.prefill_dispersion)} if self.prefill_dispersion else {}),
            **({"core_wait": self.core_wait} if self.core_wait is not None else {}),
            **({"core_wait_alone": self.core_wait_alone} if self.core_wait_alone is not None else {}),
        }

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False, default=_json_default) + "\n")
        return p

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> CostProfile:
        """Parse the JSON form; errors name ``where`` (the file) and the key."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: 'format' must be {FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != VERSION:
            raise ValueError(f"{where}: unsupported profile version {d.get('version')!r} (this disagg reads {VERSION})")
        try:
            prefill = PrefillCost(**{k: float(v) for k, v in d["prefill"].items()})
            decode = tuple(DecodePiece(int(p["max_batch"]), float(p["a_s"]), float(p.get("b_s", 0.0)),
                                       float(p.get("c_s", 0.0))) for p in d["decode"])
            links = {k: LinkSpec(k, float(v["bandwidth_bytes_per_s"]), float(v["latency_s"]))
                     for k, v in (d.get("links") or {}).items()}
            model = ModelSpec(**d["model"]) if d.get("model") else None
            overhead = float(d.get("request_overhead_s", 0.0))
            dispersion = tuple(float(x) for x in d.get("prefill_dispersion") or ())
            core_wait, alone = (None if d.get(k) is None else float(d[k]) for k in ("core_wait", "core_wait_alone"))
        except KeyError as e:
            raise ValueError(f"{where}: missing key {e}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad value ({e})") from e
        for key, value in [("prefill", prefill.__dict__), *((f"decode[{i}]", p.__dict__) for i, p in enumerate(decode))]:
            if any(not math.isfinite(v) for v in value.values()):
                raise ValueError(f"{where}: {key} has a non-finite coefficient")
        try:
            return cls(name=str(d.get("name", where)), source=str(d.get("source", "calibrated")), prefill=prefill,
                       decode=decode, tp=int(d.get("tp", 1)), hardware=str(d.get("hardware", "")),
                       dtype=str(d.get("dtype", "bf16")), model=model, links=links,
                       memory_bytes=d.get("memory_bytes"), decode_context=str(d.get("decode_context", "sum")),
                       fit=d.get("fit") or {}, environment=d.get("environment") or {}, meta=d.get("meta") or {},
                       request_overhead_s=overhead, prefill_dispersion=dispersion, core_wait=core_wait,
                       core_wait_alone=alone)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such cost profile")
        return cls.from_dict(read_json(p), where=str(p))


def _json_default(o: object) -> object:
    if hasattr(o, "item"):
        return o.item()  # numpy scalars
    raise TypeError(f"cannot write {type(o).__name__} to a profile")


def constant_profile(prefill_s: float, decode_step_s: float, name: str = "constant",
                     prefill_per_token_s: float = 0.0, decode_per_seq_s: float = 0.0) -> CostProfile:
    """Fixed times: every prefill batch takes ``prefill_s`` (+ per token), every decode step ``decode_step_s`` (+ per seq)."""
    if prefill_s < 0 or decode_step_s < 0:
        raise ValueError("constant profile times must be >= 0")
    return CostProfile(name=name, source="constant", prefill=PrefillCost(prefill_s, prefill_per_token_s),
                       decode=(DecodePiece(1 << 30, decode_step_s, decode_per_seq_s),))


def roofline_profile(model: ModelSpec, hw: HardwareSpec, tp: int = 1,
                     factors: RooflineFactors = RooflineFactors()) -> CostProfile:
    """Datasheet roofline for ``model`` on ``tp`` x ``hw`` (bf16 weights and KV unless the spec says otherwise).

    prefill: compute-bound, 2 x matmul params FLOPs per token + causal attention 2 x layers x heads x head_dim x len^2,
    at ``prefill_mfu``; plus weights read once and kernel launch overheads.
    decode: max(weights read at ``hbm_efficiency``, 2 x params x batch at ``decode_mfu``) + KV read per context token.
    That max is exactly two linear pieces in batch, split at the ridge batch. TP divides FLOPs and bytes by tp and adds
    two ring all-reduces per layer of (tokens x hidden x dtype) bytes over NVLink.
    """
    if tp < 1 or (model.heads % tp and tp > model.heads):
        raise ValueError(f"tp={tp} does not divide {model.name}'s {model.heads} heads")
    flops_pre = hw.bf16_flops * tp * factors.prefill_mfu
    flops_dec = hw.bf16_flops * tp * factors.decode_mfu
    bw = hw.hbm_bytes_per_s * tp * factors.hbm_efficiency
    launch = model.layers * factors.kernels_per_layer * factors.kernel_overhead_s
    ar_per_token = ar_fixed = 0.0
    if tp > 1:
        ring = 2 * (tp - 1) / tp
        ar_per_token = 2 * model.layers * ring * model.hidden_size * model.dtype_bytes / (
            hw.nvlink_bytes_per_s * factors.allreduce_efficiency)
        ar_fixed = 2 * model.layers * factors.allreduce_latency_s
    weights_s = model.weight_bytes / bw
    per_token_flops_s = 2 * model.matmul_params / flops_pre
    attn_c = 2 * model.layers * model.heads * model.head_dim / flops_pre
    prefill = PrefillCost(a_s=launch + ar_fixed + weights_s, b_s=per_token_flops_s + ar_per_token, c_s=attn_c)
    per_seq_compute = 2 * model.matmul_params / flops_dec
    kv_c = model.kv_bytes_per_token / bw
    ridge = max(1, int(weights_s / per_seq_compute))
    decode = (DecodePiece(ridge, launch + ar_fixed + weights_s, ar_per_token, kv_c),
              DecodePiece(1 << 30, launch + ar_fixed, per_seq_compute + ar_per_token, kv_c))
    return CostProfile(name=f"roofline:{model.name}@{hw.name}x{tp}", source="roofline", prefill=prefill, decode=decode,
                       tp=tp, hardware=hw.name, model=model, memory_bytes=hw.memory_bytes * tp,
                       meta={"factors": asdict(factors)})


def with_links(profile: CostProfile, links: dict[str, LinkSpec]) -> CostProfile:
    """The same profile with extra measured transports."""
    return replace(profile, links={**profile.links, **links})
