"""Readers for public LLM request traces, each returning a ``Workload``.

Formats (``read_trace`` tells them apart by the CSV header, or a ``.jsonl`` name / JSON first line):

============  ==========================================================================  ==============
format        columns used (arrival → prompt, output)                                      arrival unit
============  ==========================================================================  ==============
azure         TIMESTAMP (``2023-11-16 18:17:03.9799600``), ContextTokens, GeneratedTokens  datetime
vidur         arrived_at, num_prefill_tokens, num_decode_tokens                            seconds
splitwise     arrival_timestamp, prompt_size, token_size (request_id etc. ignored)         seconds
burstgpt      Timestamp, Request tokens, Response tokens (Model, Log Type ignored)         seconds
mooncake      JSON lines: timestamp, input_length, output_length, hash_ids                 milliseconds
============  ==========================================================================  ==============

Conventions, for every format:

- ``arrival_s`` is seconds since the earliest arrival in the rows read; request ids are the row
  index (0-based, file order), so they join with records of any run replaying the same file.
- Lengths must be whole, non-negative numbers. A prompt or output of 0 is clamped to 1 and counted in
  ``meta["clamped_rows"]``; BurstGPT rows with 0 response tokens are failed requests, skipped and
  counted in ``meta["failed_rows"]``. Mooncake ``hash_ids`` become ``prefix_block_ids``.
- ``limit`` keeps the first N data rows of the file (before skipping failures).
- A bad row (missing column, non-numeric or negative value, unparsable timestamp, wrong number of
  fields, invalid JSON) raises ``ValueError("<file>: line <n>: ...")``, lines 1-based, header = line 1.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from sim.request import RequestSpec, Workload

TRACE_DIR = Path(__file__).parent / "data" / "traces"
BUNDLED: dict[str, Path] = {
    "azure-conv": TRACE_DIR / "azure2023" / "AzureLLMInferenceTrace_conv.csv",
    "azure-code": TRACE_DIR / "azure2023" / "AzureLLMInferenceTrace_code.csv",
    "mooncake-conv": TRACE_DIR / "mooncake" / "conversation_trace.jsonl",
}
# format → (arrival column, prompt column, output column, arrival kind)
CSV_FORMATS: dict[str, tuple[str, str, str, str]] = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens", "datetime"),
    "vidur": ("arrived_at", "num_prefill_tokens", "num_decode_tokens", "seconds"),
    "splitwise": ("arrival_timestamp", "prompt_size", "token_size", "seconds"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens", "seconds"),
}
FORMATS = (*CSV_FORMATS, "mooncake")


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


def _line_of_row(path: Path, row: int) -> int:
    """Physical line (1-based) of data row ``row`` (0-based), skipping empty lines like pyarrow does."""
    with open(path, encoding="utf-8-sig") as f:
        seen = -1  # the header is row -1
        for line_no, line in enumerate(f, start=1):
            if line.strip("\r\n"):
                if seen == row:
                    return line_no
                seen += 1
    return -1


def _bad_shape(path: Path, ncols: int) -> str:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        for fields in reader:
            if fields and len(fields) != ncols:
                return f"line {reader.line_num}: expected {ncols} fields, got {len(fields)}"
    return "malformed CSV"


def _read_columns(path: Path, columns: list[str], limit: int | None) -> dict[str, pa.ChunkedArray]:
    """The named columns of the first ``limit`` rows, as trimmed strings."""
    header = _header(path)
    for c in columns:
        if c not in header:
            raise ValueError(f"{path}: line 1: missing column {c!r}; header has {header}")
    convert = pcsv.ConvertOptions(include_columns=columns, column_types=dict.fromkeys(columns, pa.string()),
                                  strings_can_be_null=False)
    batches, rows = [], 0
    try:
        with pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 22),
                           convert_options=convert) as reader:
            schema = reader.schema
            for batch in reader:
                batches.append(batch)
                rows += batch.num_rows
                if limit is not None and rows >= limit:
                    break
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: {_bad_shape(path, len(header))}" if "Expected" in str(e) else f"{path}: {e}") from e
    table = pa.Table.from_batches(batches, schema=schema)
    if limit is not None:
        table = table.slice(0, limit)
    return {c: pc.utf8_trim_whitespace(table[c]) for c in columns}


def _bad_value(path: Path, col: str, values: pa.ChunkedArray, typ: pa.DataType, what: str) -> ValueError:
    for i, v in enumerate(values.to_pylist()):
        try:
            pc.cast(pa.array([v]), typ)
        except pa.ArrowInvalid:
            return ValueError(f"{path}: line {_line_of_row(path, i)}: column {col!r}: expected {what}, got {v!r}")
    return ValueError(f"{path}: column {col!r}: expected {what}")


def _numbers(path: Path, col: str, values: pa.ChunkedArray, *, whole: bool) -> np.ndarray:
    """Column as float64, each value finite and >= 0 (and a whole number when ``whole``)."""
    what = "a whole number >= 0" if whole else "a number >= 0"
    try:
        x = pc.cast(values, pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        raise _bad_value(path, col, values, pa.float64(), what) from None
    bad = ~np.isfinite(x) | (x < 0) | ((x != np.floor(x)) if whole else False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: line {_line_of_row(path, i)}: column {col!r}: expected {what}, "
                         f"got {values[i].as_py()!r}")
    return x


def _datetimes_s(path: Path, col: str, values: pa.ChunkedArray) -> np.ndarray:
    try:
        ns = pc.cast(values, pa.timestamp("ns")).to_numpy().astype("datetime64[ns]").astype(np.int64)
    except pa.ArrowInvalid:
        raise _bad_value(path, col, values, pa.timestamp("ns"), "a datetime like '2023-11-16 18:17:03.9799600'") \
            from None
    return (ns - ns.min()) / 1e9 if len(ns) else ns.astype(np.float64)


def _workload(arrival_s: np.ndarray, prompts: np.ndarray, outputs: np.ndarray, name: str, meta: dict,
              prefixes: list[tuple[int, ...]] | None = None) -> Workload:
    """Rebase arrivals to 0, clamp zero lengths to 1 (counted), and build the requests."""
    if len(arrival_s):
        arrival_s = arrival_s - arrival_s.min()
    zero = (prompts < 1) | (outputs < 1)
    prompts, outputs = np.maximum(prompts, 1).astype(np.int64), np.maximum(outputs, 1).astype(np.int64)
    pre = prefixes if prefixes is not None else [()] * len(prompts)
    reqs = tuple(RequestSpec(i, a, p, o, h) for i, (a, p, o, h)
                 in enumerate(zip(arrival_s.tolist(), prompts.tolist(), outputs.tolist(), pre, strict=True)))
    return Workload(reqs, name, {**meta, "rows": len(reqs), "clamped_rows": int(zero.sum())})


def _read_csv_trace(path: Path, fmt: str, limit: int | None, name: str) -> Workload:
    t_col, p_col, o_col, t_kind = CSV_FORMATS[fmt]
    cols = _read_columns(path, [t_col, p_col, o_col], limit)
    if t_kind == "datetime":
        t = _datetimes_s(path, t_col, cols[t_col])
    else:
        t = _numbers(path, t_col, cols[t_col], whole=False)
    p = _numbers(path, p_col, cols[p_col], whole=True)
    o = _numbers(path, o_col, cols[o_col], whole=True)
    meta: dict[str, object] = {"source": str(path), "format": fmt}
    if fmt == "burstgpt":
        ok = o >= 1
        meta["failed_rows"] = int((~ok).sum())
        t, p, o = t[ok], p[ok], o[ok]
    return _workload(t, p, o, name, meta)


def _read_mooncake(path: Path, limit: int | None, name: str) -> Workload:
    t: list[float] = []
    p: list[int] = []
    o: list[int] = []
    prefixes: list[tuple[int, ...]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(t) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {line_no}: expected a JSON object, got {row!r}")
            vals = []
            for key in ("timestamp", "input_length", "output_length"):
                v = row.get(key)
                if key not in row:
                    raise ValueError(f"{path}: line {line_no}: missing key {key!r}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v != int(v):
                    raise ValueError(f"{path}: line {line_no}: {key!r}: expected a whole number >= 0, got {v!r}")
                vals.append(v)
            hashes = row.get("hash_ids", [])
            if not isinstance(hashes, list) or not set(map(type, hashes)) <= {int}:
                raise ValueError(f"{path}: line {line_no}: 'hash_ids': expected a list of integers, got {hashes!r}")
            t.append(vals[0] / 1000.0)
            p.append(int(vals[1]))
            o.append(int(vals[2]))
            prefixes.append(tuple(hashes))
    return _workload(np.array(t, dtype=np.float64), np.array(p, dtype=np.float64), np.array(o, dtype=np.float64),
                     name, {"source": str(path), "format": "mooncake", "prefix_block_tokens": 512}, prefixes)


def detect_format(path: str | Path) -> str:
    """The trace format of ``path``: mooncake for ``.jsonl``/``.json`` or a JSON first line, else from the CSV header.

    Raises ``ValueError`` when no format matches.
    """
    path = Path(path)
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline()
    if path.suffix in (".jsonl", ".json") or first.lstrip().startswith("{"):
        return "mooncake"
    header = set(_header(path))
    for fmt, (t_col, p_col, o_col, _) in CSV_FORMATS.items():
        if {t_col, p_col, o_col} <= header:
            return fmt
    raise ValueError(f"{path}: cannot tell the trace format from line 1 {first.strip()!r}; "
                     f"pass format= one of {list(FORMATS)}")


def read_trace(path: str | Path, format: str | None = None, limit: int | None = None,
               name: str | None = None) -> Workload:
    """Read a trace file as a ``Workload`` (named after the file stem unless ``name`` is given).

    ``format`` is one of ``FORMATS`` or ``None`` to detect it. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for an unknown format, a bad ``limit`` or a bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; expected one of {list(FORMATS)}")
    name = name or path.stem
    if fmt == "mooncake":
        return _read_mooncake(path, limit, name)
    return _read_csv_trace(path, fmt, limit, name)


def load_trace(name_or_path: str | Path, limit: int | None = None) -> Workload:
    """A bundled trace by name (one of ``BUNDLED``: azure-conv, azure-code, mooncake-conv) or any trace file.

    Raises ``ValueError`` when the argument is neither a bundled name nor an existing file.
    """
    key = str(name_or_path)
    if key in BUNDLED:
        return read_trace(BUNDLED[key], limit=limit, name=key)
    if Path(key).is_file():
        return read_trace(key, limit=limit)
    raise ValueError(f"unknown trace {key!r}: not a bundled trace {sorted(BUNDLED)} nor an existing file")
