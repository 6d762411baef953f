"""A planner worker process: ``python -m sim.plan_worker`` reads JSON lines on stdin and answers JSON lines on stdout.

The first line is the base workload (`sim.plan_search.base_workload_doc`); each later line is one job for
`sim.plan_search.search`, answered by one line: the answer, or ``{"error": "..."}``. Plain subprocesses with JSON
over pipes: nothing is pickled, and the caller's ``__main__`` is never re-imported (as spawn/forkserver would).
"""

from __future__ import annotations

import json
import sys
import traceback


def main() -> None:
    from sim import plan_search

    first = sys.stdin.readline()
    if not first:
        return
    plan_search.set_base_workload(first)
    for line in sys.stdin:
        try:
            answer = plan_search.search(line)
        except Exception:
            answer = json.dumps({"error": traceback.format_exc()})
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
