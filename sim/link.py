"""KV transfer links in the simulator: concurrent transfers share bandwidth equally (processor sharing).

Each decode instance has one ingress link (bandwidth of the topology's link x the smaller TP of the two pools, since
each TP rank ships its own KV shard in parallel). A transfer first pays ``latency_s`` on its own, then joins the shared
phase; when transfers start or end, every active one's rate is recomputed. Events per transfer: O(1) amortised.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import simpy


class SharedLink:
    """A link of ``bandwidth_bytes_per_s`` shared equally by the transfers in flight; ``latency_s`` per transfer."""

    def __init__(self, env: simpy.Environment, bandwidth_bytes_per_s: float, latency_s: float, name: str = "link"):
        self.env = env
        self.bw = bandwidth_bytes_per_s
        self.latency_s = latency_s
        self.name = name
        self._active: list[list] = []  # in start order: [remaining_bytes, done_callback, tolerance]
        self._last = 0.0
        self._due: simpy.Timeout | None = None  # when the smallest active transfer ends; earlier ones are superseded
        self.bytes_moved = 0.0
        self.busy_s = 0.0

    def send(self, nbytes: float, on_done: Callable[[], None]) -> None:
        """Start moving ``nbytes``; ``on_done()`` is called (inside the simulation) when the last byte arrives."""
        self.bytes_moved += nbytes
        if self.latency_s > 0:
            ev = self.env.timeout(self.latency_s)
            ev.callbacks.append(partial(self._join, nbytes, on_done))
        else:
            self._join(nbytes, on_done)

    def _advance(self) -> None:
        now = self.env.now
        n = len(self._active)
        if n:
            moved = (now - self._last) * self.bw / n
            self.busy_s += now - self._last
            for entry in self._active:
                entry[0] -= moved
        self._last = now

    def _join(self, nbytes: float, on_done: Callable[[], None], _latency_over: simpy.Event | None = None) -> None:
        self._advance()
        if nbytes <= 0:
            on_done()
            return
        self._active.append([float(nbytes), on_done, 1e-9 * float(nbytes)])
        self._reschedule()

    def _reschedule(self) -> None:
        active = self._active
        if not active:
            self._due = None
            return
        n = len(active)
        smallest = active[0][0] if n == 1 else min(e[0] for e in active)
        self._due = ev = self.env.timeout(max(0.0, smallest * n / self.bw))
        ev.callbacks.append(self._complete)

    def _complete(self, ev: simpy.Event) -> None:
        if ev is not self._due:
            return  # superseded by a later start or end
        self._advance()
        # This fires when the smallest transfer is due: it is done whatever float round-off left of it, and so is
        # every transfer within round-off (e[2]) of it.
        active = self._active
        if len(active) == 1:
            callbacks = [active.pop()[1]]
        else:
            smallest = min(e[0] for e in active)
            callbacks = [e[1] for e in active if e[0] <= smallest + e[2]]
            self._active = [e for e in active if e[0] > smallest + e[2]]
        self._reschedule()
        for cb in callbacks:
            cb()
