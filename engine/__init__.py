"""The disaggregated serving engine: a router and prefill / decode (or colocated) worker processes.

Processes (`engine.cluster.Cluster` launches them; ``disagg serve`` wraps it)::

    client --HTTP/SSE--> router (engine.server + engine.router) --control (tcp, msgpack)--> workers
                                                  P0..  prefill: FCFS prompt batches, first token   (engine.prefill_worker)
                                                  D0..  decode: continuous batching                 (engine.decode_worker)
                                                  C0..  colocated: both, prefill-first / chunked    (+ engine.colocated_steps)
    P --KV (engine.transport: shm | tcp | cuda)--> D      pull-based: D reserves blocks, then pulls (engine.kv_ship)

Request lifecycle: the phases are `sim.records`' (``arrival_s`` at the router; ``prefill_start_s`` /
``prefill_end_s`` = ``first_token_s`` on the prefill or colocated worker; ``kv_transfer_start_s`` when the decode
worker has reserved blocks and pulls, ``kv_transfer_end_s`` when the KV is in its cache; ``decode_start_s`` when it
joins the batch; ``last_token_s`` = ``finished_s``), stamped with ``time.monotonic()`` by the process where each
happens and assembled by the router into one `sim.records.RequestRecord` per request. Scheduling mirrors
`sim.prefill_instance` / `sim.decode_instance` so the simulator can predict this engine.

Python API (used by validation)::

    from engine.cluster import Cluster
    from engine.loadgen import run_load
    with Cluster("tiny", Topology.disaggregated(1, 1)) as c:
        records = run_load(c.url, workload)     # pyarrow Table: RECORD_SCHEMA + client-side columns

Greedy outputs are exact across topologies in fp32; bf16 matmuls on CPU are not batch-invariant, so a batched bf16
run may pick a different token where two logits nearly tie (see tests/test_engine_correctness.py).
"""
