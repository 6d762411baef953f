"""One request of a workload (`RequestSpec`) and an ordered set of them (`Workload`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import pyarrow as pa


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What a client asks for: ``prompt_tokens`` in, ``output_tokens`` out, arriving at ``arrival_s`` (seconds from start).

    ``prefix_block_ids`` are ids of fixed-size prompt blocks (Mooncake's ``hash_ids``): equal ids mean a shared prefix.
    """

    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_block_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"request {self.id}: prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"request {self.id}: output_tokens must be >= 1, got {self.output_tokens}")
        if not self.arrival_s >= 0:
            raise ValueError(f"request {self.id}: arrival_s must be >= 0, got {self.arrival_s}")


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival time, with a name saying where they came from."""

    requests: tuple[RequestSpec, ...]
    name: str = "workload"
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        reqs = tuple(sorted(self.requests, key=lambda r: (r.arrival_s, r.id)))
        ids = {r.id for r in reqs}
        if len(ids) != len(reqs):
            raise ValueError(f"workload {self.name!r}: request ids are not unique")
        object.__setattr__(self, "requests", reqs)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[RequestSpec]:
        return iter(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def rate_rps(self) -> float:
        """Mean arrival rate (requests / s) over the span of arrivals."""
        n = len(self.requests)
        return (n - 1) / self.duration_s if n > 1 and self.duration_s > 0 else 0.0

    def scale_rate(self, factor: float) -> Workload:
        """Arrivals ``factor`` times as fast (inter-arrival times divided by ``factor``); lengths unchanged."""
        if not factor > 0:
            raise ValueError(f"rate scale must be > 0, got {factor}")
        if not self.requests:
            return self
        t0 = self.requests[0].arrival_s
        return Workload(tuple(replace(r, arrival_s=(r.arrival_s - t0) / factor) for r in self.requests),
                        f"{self.name}x{factor:g}", dict(self.meta))

    def with_rate(self, rate_rps: float) -> Workload:
        """Rescale arrivals so the mean rate is ``rate_rps``."""
        if self.rate_rps <= 0:
            raise ValueError(f"workload {self.name!r} has no arrival span to rescale")
        return self.scale_rate(rate_rps / self.rate_rps)

    def head(self, n: int) -> Workload:
        """The first ``n`` requests, arrival times shifted to start at 0."""
        if n < 0:
            raise ValueError(f"cannot take {n} requests")
        reqs = self.requests[:n]
        t0 = reqs[0].arrival_s if reqs else 0.0
        return Workload(tuple(replace(r, arrival_s=r.arrival_s - t0) for r in reqs), self.name, dict(self.meta))

    def clip_lengths(self, max_prompt_tokens: int | None = None, max_output_tokens: int | None = None,
                     max_total_tokens: int | None = None) -> Workload:
        """Truncate lengths (e.g. to fit a small model's context); ``max_total_tokens`` bounds prompt + output."""
        out = []
        for r in self.requests:
            p, o = r.prompt_tokens, r.output_tokens
            if max_prompt_tokens:
                p = min(p, max_prompt_tokens)
            if max_output_tokens:
                o = min(o, max_output_tokens)
            if max_total_tokens and p + o > max_total_tokens:
                o = max(1, min(o, max_total_tokens // 4))
                p = max(1, min(p, max_total_tokens - o))
            out.append(replace(r, prompt_tokens=p, output_tokens=o))
        return Workload(tuple(out), self.name, dict(self.meta))

    def to_table(self) -> pa.Table:
        return pa.table({
            "id": pa.array([r.id for r in self.requests], pa.int64()),
            "arrival_s": pa.array([r.arrival_s for r in self.requests], pa.float64()),
            "prompt_tokens": pa.array([r.prompt_tokens for r in self.requests], pa.int64()),
            "output_tokens": pa.array([r.output_tokens for r in self.requests], pa.int64()),
        })

    @classmethod
    def from_lists(cls, arrivals: Sequence[float], prompts: Sequence[int], outputs: Sequence[int],
                   name: str = "workload") -> Workload:
        return cls(tuple(RequestSpec(i, float(a), int(p), int(o))
                         for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))), name)
