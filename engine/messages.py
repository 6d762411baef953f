"""Control messages between engine processes: msgspec Structs, msgpack on the wire (never pickle).

Router <-> worker (router connects to each worker's control address)::

    Submit  router -> P/C   a request attempt: tokens so far, how many to generate, sampling, the chosen decode worker
    Cancel  router -> any   drop an attempt and free its KV (client gone, retried elsewhere, timed out)
    Query   router -> any   ask for a `Stats` snapshot
    Prefilled  P/C -> router   first token of a batch's requests, with prefill start/end stamps
    Tokens     D/C -> router   one decode step: (rid, token) pairs, who joined the batch, who finished
    KVArrived  D -> router     KV of an attempt is in the decode worker's cache (transfer start/end, bytes, checksums)
    Failed     any -> router   an attempt cannot continue here (``retryable``: another worker may take it)
    Stats      any -> router   queue lengths, KV blocks, counters

Prefill worker <-> decode worker (P connects to D's KV address; the body of `KVData` is the KV itself)::

    KVReady  P -> D   prefilled; KV waits on P until D has blocks for it
    KVPull   D -> P   D reserved blocks: send it now (kv_transfer_start_s is stamped here)
    KVData   P -> D   header of the KV body: shape, dtype, optional SHA-256
    KVDrop   D -> P   D will not take it (cancelled): free it
    KVMissing P -> D  P no longer has it (cancelled): free the reserved blocks

All times are ``time.monotonic()`` seconds of the sending host (system-wide on Linux, so processes on one host share
the clock). ``rid`` is the router's attempt id (a retry gets a fresh one; stale messages are ignored).
"""

from __future__ import annotations

import msgspec


class Submit(msgspec.Struct, tag="submit"):
    rid: int
    token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    eos_id: int | None = None
    decode: str = ""
    decode_kv: str = ""


class Cancel(msgspec.Struct, tag="cancel"):
    rid: int


class Query(msgspec.Struct, tag="query"):
    nonce: int


class Prefilled(msgspec.Struct, tag="prefilled"):
    t_end: float
    items: list[tuple[int, int, float]]  # (rid, first token, that request's prefill start)
    finished: list[tuple[int, str]] = []


class Tokens(msgspec.Struct, tag="tokens"):
    t_start: float
    t_end: float
    items: list[tuple[int, int]]  # (rid, token)
    joined: list[tuple[int, float]] = []  # (rid, decode_start) of requests that joined the batch since the last step
    finished: list[tuple[int, str]] = []  # (rid, "stop" | "length")
    preempted: list[int] = []


class KVArrived(msgspec.Struct, tag="kv"):
    rid: int
    t_start: float  # D reserved blocks and sent the pull
    t_end: float  # the KV is in D's cache
    nbytes: int
    t_export_start: float = 0.0  # P began gathering the KV into the link's buffer (P's clock = D's on one host)
    t_recv: float = 0.0  # the whole body had arrived at D (before the scatter into the cache)
    sent_sha256: str = ""
    received_sha256: str = ""


class Failed(msgspec.Struct, tag="failed"):
    rid: int
    message: str
    retryable: bool = False


class Stats(msgspec.Struct, tag="stats"):
    nonce: int
    name: str
    role: str
    values: dict[str, float]


class KVReady(msgspec.Struct, tag="ready"):
    rid: int
    token_ids: list[int]
    num_tokens: int
    max_tokens: int
    temperature: float
    seed: int
    eos_id: int | None
    src: str


class KVPull(msgspec.Struct, tag="pull"):
    rid: int


class KVData(msgspec.Struct, tag="data"):
    rid: int
    shape: list[int]  # [layers, 2, tokens padded to whole blocks, kv_heads, head_dim] (`engine.kv_ship`)
    dtype: str
    num_tokens: int
    block_size: int
    t_export_start: float
    sha256: str = ""


class KVDrop(msgspec.Struct, tag="drop"):
    rid: int


class KVMissing(msgspec.Struct, tag="missing"):
    rid: int


ToWorker = Submit | Cancel | Query
ToRouter = Prefilled | Tokens | KVArrived | Failed | Stats
Peer = KVReady | KVPull | KVData | KVDrop | KVMissing

to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
to_router_decoder = msgspec.msgpack.Decoder(ToRouter)
peer_decoder = msgspec.msgpack.Decoder(Peer)
