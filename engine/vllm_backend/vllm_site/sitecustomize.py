"""Imported at start-up by every vLLM process `VllmCluster` launches (its folder is their ``PYTHONPATH``): gives NIXL's
UCX progress thread a poll timeout so it stops spinning a whole core.

NIXL's Python agent (nixl 1.5.1, ``nixl_cuXX/_api.py``) always builds its agent with ``pthrDelay = 0``; the UCX
plugin's shared progress thread rounds that up to whole milliseconds (0) and calls ``poll(fds, 0)`` in a loop, so
each vLLM worker with the NIXL connector burns one core even when idle (measured: 1.98 CPU-s per 2 s for an idle
agent; 0.03 with this hook). vLLM passes no agent option for it. On a 2-core host the two spinning threads of a
1P1D pair (each bound to its worker's core) starved the engines: overlapping requests took 3-45 s and decode
starts stalled for ~30 s (until the prefill side's KV lease expired). The thread still wakes at once on UCX
events; the delay is only its periodic fall-back wake-up.

``DISAGG_NIXL_PROGRESS_DELAY_US`` (set by `engine.vllm_backend.cluster.VllmCluster.vllm_env`) is the delay; unset
or 0 leaves NIXL untouched. Standard library only: this runs in vLLM's interpreter, before anything else.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_DELAY_US = int(os.environ.get("DISAGG_NIXL_PROGRESS_DELAY_US") or 0)
_BINDINGS = {"nixl._bindings", "nixl_cu12._bindings", "nixl_cu13._bindings"}


class _NixlDelayFinder(importlib.abc.MetaPathFinder):
    """Loads NIXL's compiled bindings as usual, then wraps ``nixlAgent`` to set the agent config's ``pthrDelay``."""

    def find_spec(self, name, path, target=None):
        if name not in _BINDINGS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            agent = getattr(module, "nixlAgent", None)
            if agent is None:  # another NIXL layout: leave it as it is
                return

            def nixl_agent(name, config):
                config.pthrDelay = _DELAY_US
                return agent(name, config)
            module.nixlAgent = nixl_agent
        spec.loader.exec_module = exec_module
        return spec


if _DELAY_US > 0:
    sys.meta_path.insert(0, _NixlDelayFinder())
