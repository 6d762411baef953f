"""Composing a cluster's goodput from simulated single-instance rate curves (the planner's fast screen).

With round-robin routing each of N instances of a pool sees every N-th request, so a cluster at rate λ behaves
roughly like its instances each at λ/N (roughly: every N-th arrival is smoother than the trace itself, so this
errs on the safe side). A colocated cluster of N instances meets the SLO at λ about as well as one instance at λ/N;
a disaggregated xPyD cluster meets TTFT as its prefill instance at λ/x does and TPOT as its decode instance at λ/y
does, and both about as often as the product of the two (as if misses were independent).

Each `Curve` holds one instance's simulated points (attainment of its metric and latency percentiles per rate);
values between points are interpolated linearly in log(rate), attainment made non-increasing in rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sim.topology import Topology

NAN = math.nan


@dataclass
class Curve:
    """One instance's simulated rate ladder: points sorted by rate (full runs only)."""

    points: list[dict]
    target: float

    def __post_init__(self) -> None:
        self.points = sorted((p for p in self.points if p["full"]), key=lambda p: p["rate_rps"])
        att, low = [], 1.0
        for p in self.points:
            low = min(low, p["attainment"])
            att.append(low)
        self._att = att

    def _interp(self, rate: float, values: list[float]) -> float:
        rates = [p["rate_rps"] for p in self.points]
        if not rates:
            return NAN
        if rate <= rates[0]:
            return values[0]
        for i in range(1, len(rates)):
            if rate <= rates[i]:
                w = math.log(rate / rates[i - 1]) / math.log(rates[i] / rates[i - 1])
                return values[i - 1] + w * (values[i] - values[i - 1])
        return NAN

    def attainment(self, rate: float) -> float:
        """Attainment at ``rate``; past the last point: that point's value if it failed, else 0 (unexplored)."""
        if not self.points:
            return 0.0
        if rate > self.points[-1]["rate_rps"]:
            return 0.0 if self._att[-1] >= self.target else self._att[-1]
        return self._interp(rate, self._att)

    def pct(self, metric: str, q: str, rate: float) -> float:
        """Latency percentile ``q`` (p50/p90/p99/slo) of ``metric`` (ttft/tpot) at ``rate``; NaN past the curve."""
        return self._interp(rate, [p[metric][q] for p in self.points])


@dataclass
class Composition:
    """How one topology's attainment follows from its instances' curves."""

    topology: Topology
    parts: list[tuple[Curve, int, str]]  # (curve, instances sharing the load, metric it supplies: ttft/tpot/both)

    def attainment(self, rate: float) -> float:
        a = 1.0
        for curve, n, _ in self.parts:
            a *= curve.attainment(rate / n)
        return a

    def point(self, rate: float) -> dict:
        """A point like a simulated one: attainment and percentiles at cluster rate ``rate``."""
        out: dict = {"rate_rps": rate, "requests": 0, "full": True, "attainment": self.attainment(rate)}
        out["passes"] = out["attainment"] >= self.parts[0][0].target
        for curve, n, metric in self.parts:
            for m in ("ttft", "tpot"):
                if metric in (m, "both"):
                    out[m] = {q: curve.pct(m, q, rate / n) for q in ("p50", "p90", "p99", "slo")}
        return out

    def goodput(self, target: float) -> float:
        """Largest cluster rate with composed attainment >= target (0.0 when even the lowest simulated rate fails)."""
        lo_r = min(c.points[0]["rate_rps"] * n for c, n, _ in self.parts if c.points) if self._ok() else NAN
        if not self._ok() or self.attainment(lo_r) < target:
            return 0.0
        hi_r = min(c.points[-1]["rate_rps"] * n for c, n, _ in self.parts) * 1.0001
        if self.attainment(hi_r) >= target:
            return hi_r
        return _bisect(lambda r: self.attainment(r) >= target, lo_r, hi_r)

    def _ok(self) -> bool:
        return all(c.points for c, _, _ in self.parts)


def _bisect(ok: Callable[[float], bool], lo: float, hi: float, rel: float = 1e-3) -> float:
    while hi / lo > 1 + rel:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
