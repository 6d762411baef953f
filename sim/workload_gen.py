"""Seeded synthetic workloads: an arrival process plus prompt/output length distributions.

Arrival processes (``sample(rng, n)`` returns ``n`` arrival times in seconds, the first at 0):

- ``Poisson(rate_rps)``: exponential inter-arrival gaps, mean ``1 / rate_rps``.
- ``Gamma(rate_rps, cv)``: gamma gaps with mean ``1 / rate_rps`` and coefficient of variation ``cv``
  (std / mean of the gaps). ``cv = 1`` is Poisson; ``cv > 1`` is burstier, ``cv < 1`` more regular.
- ``Constant(rate_rps)``: one arrival every ``1 / rate_rps`` seconds.

Length distributions (``sample(rng, n)`` returns ``n`` integer token counts, each >= 1):

- ``Fixed(tokens)``; ``Uniform(low_tokens, high_tokens)``, both ends inclusive;
- ``LogNormal(mean_tokens, sigma, max_tokens=None)``: ``exp(N(mu, sigma))`` with ``mu`` chosen so that the
  *unclipped* continuous distribution has mean ``mean_tokens``; samples are rounded and clipped to
  ``[1, max_tokens]`` (so the sample mean drops a little when ``max_tokens`` cuts the tail).
  ``LogNormal.from_mean_p99`` solves ``sigma`` from a target mean and 99th percentile.

``Empirical`` resamples (prompt, output) *pairs* jointly, with replacement, from a trace, keeping
their correlation; pass it as ``lengths=`` instead of ``prompt=``/``output=``.

Every dataclass here can be built from a plain dict (a YAML config): the keys are ``kind`` plus the
field names, e.g. ``{"kind": "lognormal", "mean_tokens": 1000, "sigma": 1.0, "max_tokens": 8192}``.
Bad input raises ``ValueError`` naming the key and value.

Determinism: ``generate`` splits its seed into independent streams for arrivals, prompts and outputs,
so the same inputs and seed give identical workloads, and changing one distribution leaves the
others' samples unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from statistics import NormalDist
from typing import Any, ClassVar, cast

import numpy as np

from sim.request import RequestSpec, Workload

Seed = int | np.random.Generator


def _check_number(kind: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{kind}: {name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{kind}: {name} must be > 0, got {value!r}")


def _check_tokens(kind: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{kind}: {name} must be an integer >= 1, got {value!r}")


def _arrivals_from_gaps(gaps: np.ndarray) -> np.ndarray:
    """``n - 1`` gaps → ``n`` arrival times starting at 0."""
    return np.concatenate(([0.0], np.cumsum(gaps)))


@dataclass(frozen=True)
class Poisson:
    """Poisson arrivals at ``rate_rps`` requests per second."""

    kind: ClassVar[str] = "poisson"
    rate_rps: float

    def __post_init__(self) -> None:
        _check_number(self.kind, "rate_rps", self.rate_rps)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return _arrivals_from_gaps(rng.exponential(1.0 / self.rate_rps, max(n - 1, 0)))[:n]


@dataclass(frozen=True)
class Gamma:
    """Renewal arrivals with gamma gaps: mean rate ``rate_rps``, gap coefficient of variation ``cv``."""

    kind: ClassVar[str] = "gamma"
    rate_rps: float
    cv: float

    def __post_init__(self) -> None:
        _check_number(self.kind, "rate_rps", self.rate_rps)
        _check_number(self.kind, "cv", self.cv)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        shape = 1.0 / self.cv**2
        return _arrivals_from_gaps(rng.gamma(shape, 1.0 / (self.rate_rps * shape), max(n - 1, 0)))[:n]


@dataclass(frozen=True)
class Constant:
    """Evenly spaced arrivals, ``1 / rate_rps`` seconds apart (uses no randomness)."""

    kind: ClassVar[str] = "constant"
    rate_rps: float

    def __post_init__(self) -> None:
        _check_number(self.kind, "rate_rps", self.rate_rps)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.float64) / self.rate_rps


@dataclass(frozen=True)
class Fixed:
    """Every request has exactly ``tokens`` tokens."""

    kind: ClassVar[str] = "fixed"
    tokens: int

    def __post_init__(self) -> None:
        _check_tokens(self.kind, "tokens", self.tokens)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.tokens, dtype=np.int64)


@dataclass(frozen=True)
class Uniform:
    """Integer token counts uniform on ``[low_tokens, high_tokens]`` (both inclusive)."""

    kind: ClassVar[str] = "uniform"
    low_tokens: int
    high_tokens: int

    def __post_init__(self) -> None:
        _check_tokens(self.kind, "low_tokens", self.low_tokens)
        _check_tokens(self.kind, "high_tokens", self.high_tokens)
        if self.high_tokens < self.low_tokens:
            raise ValueError(f"uniform: high_tokens ({self.high_tokens}) must be >= low_tokens ({self.low_tokens})")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low_tokens, self.high_tokens, n, endpoint=True, dtype=np.int64)


@dataclass(frozen=True)
class LogNormal:
    """Log-normal token counts with continuous mean ``mean_tokens`` and log-space std ``sigma``.

    Samples are rounded to integers and clipped to ``[1, max_tokens]`` (no upper bound when ``None``).
    """

    kind: ClassVar[str] = "lognormal"
    mean_tokens: float
    sigma: float
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_number(self.kind, "mean_tokens", self.mean_tokens)
        _check_number(self.kind, "sigma", self.sigma)
        if self.max_tokens is not None:
            _check_tokens(self.kind, "max_tokens", self.max_tokens)

    @classmethod
    def from_mean_p99(cls, mean_tokens: float, p99_tokens: float, max_tokens: int | None = None) -> LogNormal:
        """The log-normal with this mean and 99th percentile (the smaller of the two ``sigma`` that fit).

        Raises ``ValueError`` when no log-normal fits (``p99_tokens`` must exceed ``mean_tokens`` and
        ``ln(p99 / mean)`` must be at most ``z99² / 2`` ≈ 2.71).
        """
        _check_number(cls.kind, "mean_tokens", mean_tokens)
        _check_number(cls.kind, "p99_tokens", p99_tokens)
        z = NormalDist().inv_cdf(0.99)
        # ln p99 = mu + z·sigma and mu = ln mean − sigma²/2  ⇒  sigma²/2 − z·sigma + ln(p99/mean) = 0
        disc = z * z - 2.0 * math.log(p99_tokens / mean_tokens)
        if p99_tokens <= mean_tokens or disc < 0:
            raise ValueError(f"lognormal: no log-normal has mean_tokens={mean_tokens} and p99_tokens={p99_tokens}")
        return cls(mean_tokens, z - math.sqrt(disc), max_tokens)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = math.log(self.mean_tokens) - self.sigma**2 / 2
        x = np.rint(rng.lognormal(mu, self.sigma, n))
        return np.clip(x, 1, self.max_tokens if self.max_tokens is not None else np.inf).astype(np.int64)


@dataclass(frozen=True)
class Empirical:
    """Joint (prompt, output) token pairs, resampled uniformly with replacement."""

    kind: ClassVar[str] = "empirical"
    prompt_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    source: str = "empirical"

    def __post_init__(self) -> None:
        if not self.prompt_tokens or len(self.prompt_tokens) != len(self.output_tokens):
            raise ValueError(f"empirical {self.source!r}: need equally many (>= 1) prompt and output lengths, got "
                             f"{len(self.prompt_tokens)} and {len(self.output_tokens)}")
        if min(self.prompt_tokens) < 1 or min(self.output_tokens) < 1:
            raise ValueError(f"empirical {self.source!r}: token counts must be >= 1")

    @classmethod
    def from_workload(cls, workload: Workload) -> Empirical:
        return cls(tuple(r.prompt_tokens for r in workload), tuple(r.output_tokens for r in workload), workload.name)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (prompt, output) pairs as two int64 arrays."""
        idx = rng.integers(0, len(self.prompt_tokens), n)
        return (np.asarray(self.prompt_tokens, dtype=np.int64)[idx],
                np.asarray(self.output_tokens, dtype=np.int64)[idx])


Arrival = Poisson | Gamma | Constant
Length = Fixed | Uniform | LogNormal
ARRIVALS: dict[str, type] = {c.kind: c for c in (Poisson, Gamma, Constant)}
LENGTHS: dict[str, type] = {c.kind: c for c in (Fixed, Uniform, LogNormal)}


def _from_dict(what: str, d: Any, kinds: Mapping[str, type]) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"{what}: expected a mapping with a 'kind' key, got {d!r}")
    kind = d.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(f"{what}: unknown kind {kind!r}; expected one of {sorted(kinds)}")
    cls = kinds[kind]
    allowed = [f.name for f in fields(cls)]
    for key in d:
        if key != "kind" and key not in allowed:
            raise ValueError(f"{what} {kind}: unexpected key {key!r}; expected keys {allowed}")
    for key in (f.name for f in fields(cls) if f.default is MISSING):
        if key not in d:
            raise ValueError(f"{what} {kind}: missing key {key!r}")
    return cls(**{k: v for k, v in d.items() if k != "kind"})


def arrival_from_dict(d: Mapping[str, Any]) -> Arrival:
    """``{"kind": "poisson"|"gamma"|"constant", "rate_rps": ..., ["cv": ...]}`` → an arrival process."""
    return _from_dict("arrival", d, ARRIVALS)


def length_from_dict(d: Mapping[str, Any]) -> Length | Empirical:
    """A length distribution from a dict.

    Kinds: ``fixed`` (tokens), ``uniform`` (low_tokens, high_tokens), ``lognormal`` (mean_tokens and
    either sigma or p99_tokens, optional max_tokens), ``empirical`` (trace: a bundled trace name or a
    path, optional limit: first N rows) — the last samples joint pairs, for ``lengths=`` only.
    """
    if isinstance(d, Mapping) and d.get("kind") == "empirical":
        from sim.traces import load_trace  # here, not at the top: traces are only needed for this kind
        unknown = set(d) - {"kind", "trace", "limit"}
        if unknown or "trace" not in d:
            bad = f"unexpected key {min(unknown)!r}" if unknown else "missing key 'trace'"
            raise ValueError(f"length empirical: {bad}; expected keys ['trace', 'limit']")
        return Empirical.from_workload(load_trace(d["trace"], limit=d.get("limit")))
    if isinstance(d, Mapping) and d.get("kind") == "lognormal" and "p99_tokens" in d:
        if "sigma" in d:
            raise ValueError("length lognormal: give either 'sigma' or 'p99_tokens', not both")
        rest = {k: v for k, v in d.items() if k != "p99_tokens"}
        _from_dict("length", {**rest, "sigma": 1.0}, LENGTHS)  # validates the remaining keys
        return LogNormal.from_mean_p99(d["mean_tokens"], d["p99_tokens"], d.get("max_tokens"))
    return _from_dict("length", d, LENGTHS)


def _describe(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Empirical):
        return {"kind": obj.kind, "source": obj.source, "pairs": len(obj.prompt_tokens)}
    return {"kind": obj.kind, **{f.name: getattr(obj, f.name) for f in fields(obj)}}


def generate(num_requests: int, arrival: Arrival, prompt: Length | None = None, output: Length | None = None,
             *, lengths: Empirical | None = None, seed: Seed = 0, name: str = "synthetic") -> Workload:
    """A ``Workload`` of ``num_requests`` requests with ids ``0..n-1``, first arrival at 0 s.

    Give either both ``prompt`` and ``output`` (independent marginals) or ``lengths`` (joint pairs).
    ``seed`` is an int or a ``numpy.random.Generator`` (a Generator is advanced by spawning from it).
    ``meta`` records the distributions and the int seed. Raises ``ValueError`` on a bad combination.
    """
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 0:
        raise ValueError(f"num_requests must be an integer >= 0, got {num_requests!r}")
    if isinstance(prompt, Empirical) or isinstance(output, Empirical):
        raise ValueError("Empirical samples (prompt, output) pairs jointly: pass it as lengths=")
    marginals = (prompt is not None, output is not None)
    if (lengths is not None and any(marginals)) or (lengths is None and not all(marginals)):
        raise ValueError("give either both prompt= and output= length distributions, or lengths= (joint), not both")
    root = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    rng_arrival, rng_prompt, rng_output = root.spawn(3)
    times = arrival.sample(rng_arrival, num_requests)
    if lengths is not None:
        prompts, outputs = lengths.sample(rng_prompt, num_requests)
    else:
        assert prompt is not None and output is not None
        prompts, outputs = prompt.sample(rng_prompt, num_requests), output.sample(rng_output, num_requests)
    reqs = tuple(RequestSpec(i, a, p, o) for i, (a, p, o)
                 in enumerate(zip(times.tolist(), prompts.tolist(), outputs.tolist(), strict=True)))
    meta = {"generator": {"arrival": _describe(arrival),
                          **({"lengths": _describe(lengths)} if lengths is not None
                             else {"prompt": _describe(prompt), "output": _describe(output)})},
            "seed": seed if isinstance(seed, int) else None}
    return Workload(reqs, name, meta)


def workload_from_dict(d: Mapping[str, Any]) -> Workload:
    """``{"num_requests", "seed", "arrival": {...}, "prompt": {...}, "output": {...}}`` (or ``"lengths"``) → Workload.

    Optional ``name``. Raises ``ValueError`` naming the bad key.
    """
    allowed = {"num_requests", "seed", "arrival", "prompt", "output", "lengths", "name"}
    if not isinstance(d, Mapping):
        raise ValueError(f"workload: expected a mapping, got {d!r}")
    for key in d:
        if key not in allowed:
            raise ValueError(f"workload: unexpected key {key!r}; expected keys {sorted(allowed)}")
    for key in ("num_requests", "arrival"):
        if key not in d:
            raise ValueError(f"workload: missing key {key!r}")
    seed = d.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"workload: seed must be an integer >= 0, got {seed!r}")
    parsed = {k: length_from_dict(d[k]) for k in ("prompt", "output", "lengths") if k in d}
    for key, dist in parsed.items():
        if isinstance(dist, Empirical) != (key == "lengths"):
            raise ValueError(f"workload: {key}: kind 'empirical' (joint pairs) goes under 'lengths', other kinds "
                             f"under 'prompt' and 'output'")
    return generate(d["num_requests"], arrival_from_dict(d["arrival"]), cast(Length | None, parsed.get("prompt")),
                    cast(Length | None, parsed.get("output")), lengths=cast(Empirical | None, parsed.get("lengths")),
                    seed=seed, name=d.get("name", "synthetic"))
