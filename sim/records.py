"""`RequestRecord`: what happened to one request, stamped the same way by the simulator and the engine.

The request lifecycle (phase names are the field names; all times in seconds on one clock, from the workload's start)::

    arrival_s            the request reaches the router
    prefill_start_s      a prefill (or colocated) instance starts the batch holding it
    prefill_end_s        that batch ends; the first output token is sampled here
    first_token_s        the first token reaches the client: == prefill_end_s (both modes; disaggregated: the prefill
                         instance produces and delivers it, the decode instance produces tokens 2..N) — except with
                         `Topology.first_token` "decode" (vLLM's P/D): the end of the decode instance's first step
                         for the request, which produces tokens 1..N
    kv_transfer_start_s  disaggregated only: the prompt's KV starts moving to the decode instance
    kv_transfer_end_s    ... and has fully arrived (NaN when colocated, or when output_tokens == 1)
    decode_start_s       the request joins a decode batch (after admission: it may wait for KV blocks)
    last_token_s         the last output token is produced
    finished_s           the request leaves the system (== last_token_s)

In disaggregated mode the KV transfer and decode admission wait therefore fall inside the first inter-token gap
(first_token_s -> second token), not inside TTFT. ``max_itl_s`` is the largest gap between consecutive output tokens.

A request that cannot be served (prompt larger than the KV capacity, longer than the model's context, queue full ...)
is recorded with ``status="rejected"`` and a ``reason``; its times after ``arrival_s`` are NaN.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, fields
from operator import attrgetter

import numpy as np
import pyarrow as pa

NAN = math.nan


@dataclass(slots=True)
class RequestRecord:
    """Lifecycle timestamps of one request (seconds), the instances that served it, and how it ended."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefill_start_s: float = NAN
    prefill_end_s: float = NAN
    first_token_s: float = NAN
    kv_transfer_start_s: float = NAN
    kv_transfer_end_s: float = NAN
    decode_start_s: float = NAN
    last_token_s: float = NAN
    finished_s: float = NAN
    max_itl_s: float = 0.0
    prefill_instance: str = ""
    decode_instance: str = ""
    kv_bytes: int = 0
    preemptions: int = 0
    status: str = "pending"
    reason: str = ""


RECORD_FIELDS = [f.name for f in fields(RequestRecord)]

_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string()}
RECORD_SCHEMA = pa.schema([(f.name, _TYPES[{"int": int, "float": float, "str": str}[f.type]])  # type: ignore[index]
                           for f in fields(RequestRecord)])


def records_to_table(records: Iterable[RequestRecord]) -> pa.Table:
    """Records (any order) as a pyarrow Table with `RECORD_SCHEMA`, sorted by request id."""
    rows = sorted(records, key=attrgetter("request_id"))
    return pa.table([pa.array(list(map(attrgetter(f.name), rows)), type=f.type) for f in RECORD_SCHEMA],
                    schema=RECORD_SCHEMA)


class RecordColumns:
    """Records whose lifecycle is over, stored by column (8 bytes a number, one shared str reference a name): what a
    long simulation keeps instead of one `RequestRecord` object per request. ``add`` copies a record (later changes to
    it are not seen); `to_table` equals `records_to_table` of every record added."""

    _CHUNK = 4096  # records buffered as tuples, then moved into the columns together

    def __init__(self) -> None:
        kinds = {pa.int64(): "q", pa.float64(): "d"}
        self._cols: list = [array(kinds[f.type]) if f.type in kinds else [] for f in RECORD_SCHEMA]
        self._row = attrgetter(*RECORD_FIELDS)
        self._rows: list[tuple] = []
        self._flushed = 0

    def __len__(self) -> int:
        return self._flushed + len(self._rows)

    def add(self, rec: RequestRecord) -> None:
        self._rows.append(self._row(rec))
        if len(self._rows) >= self._CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        for col, values in zip(self._cols, zip(*self._rows, strict=True), strict=True):
            col.extend(values)
        self._flushed += len(self._rows)
        self._rows.clear()

    def to_table(self) -> pa.Table:
        """The records as a pyarrow Table with `RECORD_SCHEMA`, sorted by request id."""
        self._flush()
        arrays = [pa.array(col, f.type) if isinstance(col, list) else pa.array(np.array(col))
                  for f, col in zip(RECORD_SCHEMA, self._cols, strict=True)]
        table = pa.table(arrays, schema=RECORD_SCHEMA)
        ids = np.frombuffer(self._cols[RECORD_FIELDS.index("request_id")], dtype=np.int64)
        return table if bool(np.all(ids[1:] > ids[:-1])) else table.take(np.argsort(ids, kind="stable"))


def table_to_records(table: pa.Table) -> list[RequestRecord]:
    """The inverse of `records_to_table`; missing optional columns take their defaults."""
    names = [n for n in RECORD_FIELDS if n in table.column_names]
    cols = [table.column(n).to_pylist() for n in names]
    return [RequestRecord(**dict(zip(names, row, strict=False))) for row in zip(*cols, strict=False)]
