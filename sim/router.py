"""Router policies: pick one instance of a pool for a request. Shared in spirit with the engine's router.

A policy is a function ``(candidates, state, rng) -> index`` over objects exposing ``outstanding`` (requests assigned
and not finished) and ``kv_load`` (fraction of KV capacity used or promised). ``state`` is a per-pool dict the policy
may keep counters in. Adding a policy is one entry in `POLICIES`. Ties always go to the lowest index (deterministic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class Routable(Protocol):
    @property
    def outstanding(self) -> int: ...

    @property
    def kv_load(self) -> float: ...


Policy = Callable[[Sequence[Routable], dict, np.random.Generator], int]


def round_robin(cands: Sequence[Routable], state: dict, rng: np.random.Generator) -> int:
    i = state.get("next", 0) % len(cands)
    state["next"] = i + 1
    return i


def least_outstanding(cands: Sequence[Routable], state: dict, rng: np.random.Generator) -> int:
    return min(range(len(cands)), key=lambda i: (cands[i].outstanding, i))


def least_kv_load(cands: Sequence[Routable], state: dict, rng: np.random.Generator) -> int:
    return min(range(len(cands)), key=lambda i: (cands[i].kv_load, cands[i].outstanding, i))


def power_of_two(cands: Sequence[Routable], state: dict, rng: np.random.Generator) -> int:
    if len(cands) == 1:
        return 0
    a, b = (int(x) for x in rng.choice(len(cands), size=2, replace=False))
    return min((a, b), key=lambda i: (cands[i].outstanding, i))


POLICIES: dict[str, Policy] = {
    "round_robin": round_robin,
    "least_outstanding": least_outstanding,
    "least_kv_load": least_kv_load,
    "power_of_two": power_of_two,
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown router policy {name!r}; expected one of {', '.join(POLICIES)}")
    return POLICIES[name]
