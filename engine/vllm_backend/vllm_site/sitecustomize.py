"""Imported at start-up by every vLLM process `VllmCluster` launches (its folder is their ``PYTHONPATH``): three fixes
for vLLM on a CPU host with a core per instance, each applied when its module is first imported, each switched by an
environment variable that `engine.vllm_backend.cluster.VllmCluster.vllm_env` sets (unset: the module is left as is).

1. ``DISAGG_NIXL_PROGRESS_DELAY_US``: a poll timeout for NIXL's UCX progress thread, so it stops spinning a core.
   NIXL's Python agent (nixl 1.5.1, ``nixl_cuXX/_api.py``) always builds its agent with ``pthrDelay = 0``; the UCX
   plugin's shared progress thread rounds that to whole milliseconds (0) and calls ``poll(fds, 0)`` in a loop, so each
   vLLM worker with the NIXL connector burns one core even when idle (measured: 1.98 CPU-s per 2 s for an idle agent;
   0.03 with this hook). vLLM passes no agent option for it. On a 2-core host the two spinning threads of a 1P1D pair
   starved the engines: overlapping requests took 3-45 s and decode starts stalled for ~30 s (until the prefill
   side's KV lease expired). The thread still wakes at once on UCX events; the delay is its fall-back wake-up.

2. ``DISAGG_VLLM_KEEP_AFFINITY``: keep the worker's CPU binding through the NIXL connector's set-up. On CPU, vLLM
   0.32's ``NixlBaseConnectorWorker.__init__`` (``nixl/base_worker.py``, "reserve different cores for
   start_load_kv()") calls ``os.sched_setaffinity(0, [last core of each NUMA node])`` — on the thread that builds it,
   which is the worker's main thread, the one that runs the model. Every P/D worker thus ends up on the same last
   core whatever ``VLLM_CPU_OMP_THREADS_BIND`` said: measured on this 2-core host, the prefill worker's main thread
   was moved from core 0 to core 1, next to the decode worker, and a 1P1D pair computed on one core (prefill
   iterations of 2,048 tokens took 1.9-3.6 s instead of ~0.5 s). The hook restores the thread's affinity after it.

3. ``DISAGG_VLLM_SHM_SPIN_SLEEP_US``: readers of vLLM's shared-memory message queues nap instead of spinning. vLLM
   0.32 (``shm_broadcast.SpinCondition``) has every reader busy-wait with ``sched_yield()`` for a second after each
   read before it blocks on its ZMQ notification socket: while serving, the EngineCore spins all the time its worker
   computes a step (and the worker while the EngineCore schedules). With one core per worker and none to spare, the
   spinning threads share the workers' cores: measured here, vLLM's own logged step times in a 2C run were 1.6-2.5x
   those of a lone instance (decode at batch 1: 8.8-12.0 ms vs 5.5 ms). With this hook the busy-wait sleeps that
   many microseconds per check instead of yielding, so a message waits at most that long. (Blocking on the
   notification at once, ``busy_loop_s = 0``, was tried: notifications get lost — the publisher keeps one — and
   steps then stalled for the 5 s poll timeout.)

Standard library only: this runs in vLLM's interpreter, before anything else.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_DELAY_US = int(os.environ.get("DISAGG_NIXL_PROGRESS_DELAY_US") or 0)
_KEEP_AFFINITY = os.environ.get("DISAGG_VLLM_KEEP_AFFINITY", "0") not in ("", "0")
_NIXL_WORKER = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker"
_SHM_SPIN_SLEEP_US = int(os.environ.get("DISAGG_VLLM_SHM_SPIN_SLEEP_US") or 0)


def _patch_nixl_bindings(module) -> None:
    """Wrap ``nixlAgent`` to set the agent config's ``pthrDelay`` (fix 1)."""
    agent = getattr(module, "nixlAgent", None)
    if agent is None:  # another NIXL layout: leave it as it is
        return

    def nixl_agent(name, config):
        config.pthrDelay = _DELAY_US
        return agent(name, config)
    module.nixlAgent = nixl_agent


def _patch_nixl_worker(module) -> None:
    """Restore the calling thread's CPU affinity after ``NixlBaseConnectorWorker.__init__`` (fix 2)."""
    cls = getattr(module, "NixlBaseConnectorWorker", None)
    if cls is None or not hasattr(os, "sched_getaffinity"):
        return
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        before = os.sched_getaffinity(0)
        try:
            init(self, *args, **kwargs)
        finally:
            if os.sched_getaffinity(0) != before:
                os.sched_setaffinity(0, before)
    cls.__init__ = __init__


def _patch_shm_broadcast(module) -> None:
    """Readers of vLLM's shm message queues sleep ``DISAGG_VLLM_SHM_SPIN_SLEEP_US`` per busy-wait check (fix 3)."""
    cls = getattr(module, "SpinCondition", None)
    if cls is None or not hasattr(cls, "wait"):
        return
    import time

    wait, nap = cls.wait, _SHM_SPIN_SLEEP_US / 1e6

    def spin_sleeping_wait(self, timeout_ms=None):
        last, busy = getattr(self, "last_read", None), getattr(self, "busy_loop_s", None)
        if self.is_reader and last is not None and busy is not None and time.monotonic() <= last + busy:
            time.sleep(nap)  # where vLLM calls sched_yield()
            return None
        return wait(self, timeout_ms)
    cls.wait = spin_sleeping_wait


_PATCHES = {}
if _DELAY_US > 0:
    _PATCHES.update(dict.fromkeys(("nixl._bindings", "nixl_cu12._bindings", "nixl_cu13._bindings"),
                                  _patch_nixl_bindings))
if _KEEP_AFFINITY:
    _PATCHES[_NIXL_WORKER] = _patch_nixl_worker
if _SHM_SPIN_SLEEP_US > 0:
    _PATCHES["vllm.distributed.device_communicators.shm_broadcast"] = _patch_shm_broadcast


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Loads a module named in ``_PATCHES`` as usual, then applies its patch."""

    def find_spec(self, name, path, target=None):
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)
        spec.loader.exec_module = exec_module
        return spec


if _PATCHES:
    sys.meta_path.insert(0, _PatchAfterImport())
