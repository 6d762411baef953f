"""Ray, optional: joining a cluster (`connect`) and running the planner's simulation jobs as Ray tasks (`run_jobs`).

Ray is imported only here (and only when asked for); without it, `import_ray` raises `RayUnavailable` with the
install command. A planner job is the same JSON document `sim.plan_worker` reads, answered by the same
`sim.plan_search.search`, so a plan spread over a Ray cluster equals the local one. Every node needs the same disagg
version installed (a job carries `sim.plan_search.code_version`; a node with other code refuses it, naming both).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

RAY_HINT = "Ray is not installed here: pip install 'disagg[ray]' (or pip install 'ray>=2.30'), on every node"
_KNOWN: set[str] = set()  # base-workload digests this (Ray worker) process has loaded


class RayUnavailable(RuntimeError):
    """Ray is not installed (the message says how to install it)."""


class RayConnectError(RuntimeError):
    """The Ray cluster could not be joined; the message names the address."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable(RAY_HINT) from None
    return ray


def connect(address: str | None):
    """Join the Ray cluster at ``address`` ("auto": the one ``ray start`` left on this machine, or $RAY_ADDRESS;
    "local" or None: a private single-machine Ray started by this process; else "HOST:PORT"). Idempotent: an
    already initialised Ray is reused. Returns the ray module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kw: dict = {"log_to_driver": False, "configure_logging": False}
    try:
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayConnectError(f"cannot join the Ray cluster at {address!r}: {e}") from None
    return ray


def _search(base_doc: str, job_doc: str) -> str:
    """One planner job inside a Ray worker process (loads the base workload once per process)."""
    from sim import plan_search

    digest = hashlib.sha256(base_doc.encode()).hexdigest()
    if digest not in _KNOWN:
        plan_search.set_base_workload(base_doc)
        _KNOWN.add(digest)
    want, have = json.loads(job_doc).get("code_version"), plan_search.code_version()
    if want != have:
        raise RuntimeError(f"this Ray node runs disagg code {have}, the planner sent jobs for {want}: install the "
                           "same disagg version on every node")
    return plan_search.search(job_doc)


def run_jobs(address: str | None, base_doc: str, jobs: Sequence[str], on_answer: Callable[[int, str], None]) -> None:
    """Run ``jobs`` (JSON documents for `sim.plan_search.search`) as Ray tasks, one CPU each, on the cluster at
    ``address``; ``on_answer(index, answer)`` is called here as each finishes. A failed task raises RuntimeError with
    Ray's account of it; the remaining tasks are cancelled."""
    ray = connect(address)
    task = ray.remote(num_cpus=1, max_retries=1)(_search)
    base = ray.put(base_doc)
    pending = {task.remote(base, job): i for i, job in enumerate(jobs)}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                answer = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"planner job {i} failed on Ray: {e}") from None
            on_answer(i, answer)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
