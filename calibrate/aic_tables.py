"""Read NVIDIA's measured kernel tables shipped in ``aiconfigurator-core`` (Apache-2.0) and interpolate them.

Layout of the installed package (read with pyarrow / pyyaml; nothing of the package's own code is used)::

    aiconfigurator_core/systems/<gpu>.yaml                                   gpu.mem_bw, mem_capacity, node.* ...
    aiconfigurator_core/systems/data/<gpu>/gemm/<framework>/<version>/gemm_perf.parquet
        m, n, k, gemm_dtype, kernel_source, latency                          y = x[m, k] @ W[k, n]
    .../attention/<framework>/<version>/context_attention_perf.parquet
        batch_size, isl, num_heads, num_key_value_heads, head_dim, kv_cache_dtype, [window_size], latency
    .../attention/<framework>/<version>/generation_attention_perf.parquet
        batch_size, step (context = step + 1 tokens), num_heads, num_key_value_heads, head_dim, ..., latency
    .../comm/<framework>/<version>/custom_allreduce_perf.parquet   num_gpus, message_size (elements), latency

Latencies in the tables are milliseconds per kernel (one layer); this module returns seconds. Head counts are per
GPU (after tensor parallelism). Interpolation is piecewise linear between measured points; beyond the largest one
it extrapolates proportionally (GEMM rows, attention batch, decode context) or quadratically (prefill length).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from calibrate import CalibrationError

PACKAGE = "aiconfigurator-core"


def systems_dir() -> Path:
    """The installed package's ``systems`` folder. Raises `CalibrationError` when the package is not installed."""
    spec = importlib.util.find_spec("aiconfigurator_core")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(f"import-aic needs the optional package {PACKAGE}: pip install 'disagg[aic]' "
                               f"(or pip install {PACKAGE})")
    return Path(next(iter(spec.submodule_search_locations))) / "systems"


def gpus() -> list[str]:
    """GPUs with a system file and a data folder, e.g. ``h200_sxm``."""
    root = systems_dir()
    return sorted(p.stem for p in root.glob("*.yaml") if (root / "data" / p.stem).is_dir())


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in re.split(r"[.\-a-z]+", v) if x)


def table_folder(gpu: str, op: str, framework: str, version: str | None) -> Path:
    """``data/<gpu>/<op>/<framework>/<version>``; the newest version when ``version`` is None.

    Raises `CalibrationError` naming what is available when the GPU, framework or version is missing.
    """
    if gpu not in gpus():
        raise CalibrationError(f"unknown GPU {gpu!r} in {PACKAGE}; expected one of {', '.join(gpus())}")
    base = systems_dir() / "data" / gpu / op
    fws = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if framework not in fws:
        raise CalibrationError(f"{PACKAGE} has no {op} tables for {gpu} / {framework}; frameworks: {', '.join(fws)}")
    versions = sorted((p.name for p in (base / framework).iterdir() if p.is_dir()), key=_version_key)
    if version is None:
        return base / framework / versions[-1]
    if version not in versions:
        raise CalibrationError(f"{gpu} / {framework} {op} tables exist for versions {', '.join(versions)}, "
                               f"not {version!r}")
    return base / framework / version


def system_spec(gpu: str) -> dict:
    """The GPU's system YAML (``gpu``, ``node`` sections) as a dict."""
    import yaml

    path = systems_dir() / f"{gpu}.yaml"
    if not path.is_file():
        raise CalibrationError(f"unknown GPU {gpu!r} in {PACKAGE}; expected one of {', '.join(gpus())}")
    return yaml.safe_load(path.read_text())


def _read(path: Path, filters: dict[str, object]) -> dict[str, np.ndarray]:
    """Columns of the rows of a parquet table matching ``filters`` (column -> value; absent columns ignored)."""
    if not path.is_file():
        raise CalibrationError(f"{PACKAGE} table missing: {path}")
    t = pq.read_table(path)
    for col, val in filters.items():
        if col in t.column_names:
            t = t.filter(pc.equal(t[col], val))
    return {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}


@dataclass(frozen=True)
class Curve:
    """Measured latencies (s) along one axis ``x`` (ascending); ``power`` sets the extrapolation beyond the end."""

    x: np.ndarray
    t: np.ndarray
    power: float = 1.0

    def __call__(self, x: float) -> float:
        if x > self.x[-1]:
            return float(self.t[-1] * (x / self.x[-1]) ** self.power)
        return float(np.interp(x, self.x, self.t))


class Table2D:
    """Latency over (``a``, ``x``): a `Curve` along ``x`` per measured ``a``; linear in ``a`` between curves that
    cover ``x``, proportional in ``a`` above the largest one that does (batched kernels scale ~linearly)."""

    def __init__(self, a: np.ndarray, x: np.ndarray, t_ms: np.ndarray, power: float, what: str):
        if len(t_ms) == 0:
            raise CalibrationError(f"{PACKAGE}: no measurements for {what}")
        self.what = what
        self.curves: dict[float, Curve] = {}
        for av in np.unique(a):
            sel = a == av
            order = np.argsort(x[sel])
            self.curves[float(av)] = Curve(x[sel][order].astype(float), t_ms[sel][order] / 1e3, power)

    def __call__(self, a: float, x: float) -> float:
        keys = sorted(self.curves)
        covering = [k for k in keys if self.curves[k].x[-1] >= x] or keys[:1]
        lo = [k for k in covering if k <= a]
        hi = [k for k in covering if k >= a]
        if lo and hi:
            k0, k1 = lo[-1], hi[0]
            t0, t1 = self.curves[k0](x), self.curves[k1](x)
            return t0 if k1 == k0 else t0 + (t1 - t0) * (a - k0) / (k1 - k0)
        if lo:
            return self.curves[lo[-1]](x) * a / lo[-1]
        return self.curves[hi[0]](x)


class GemmTable:
    """bf16 GEMM latency (s) for ``m x k`` @ ``k x n``: per (n, k) a curve over m, bilinear over the (n, k) grid,
    proportional beyond its largest n or k."""

    def __init__(self, folder: Path):
        cols = _read(folder / "gemm_perf.parquet", {"gemm_dtype": "bfloat16"})
        self.ns, self.ks = np.unique(cols["n"]), np.unique(cols["k"])
        self.curves: dict[tuple[int, int], Curve] = {}
        for n in self.ns:
            for k in self.ks:
                sel = (cols["n"] == n) & (cols["k"] == k)
                if sel.any():
                    order = np.argsort(cols["m"][sel])
                    self.curves[(int(n), int(k))] = Curve(cols["m"][sel][order].astype(float),
                                                          cols["latency"][sel][order] / 1e3)
        if not self.curves:
            raise CalibrationError(f"{PACKAGE}: no bf16 GEMM measurements in {folder}")

    @staticmethod
    def _bracket(grid: np.ndarray, v: float) -> tuple[int, int, float]:
        """(lo, hi, scale): neighbours of v on the grid, and a factor for v beyond the grid's end."""
        if v >= grid[-1]:
            return int(grid[-1]), int(grid[-1]), v / grid[-1]
        if v <= grid[0]:
            return int(grid[0]), int(grid[0]), 1.0
        i = int(np.searchsorted(grid, v))
        return int(grid[i - 1]), int(grid[i]), 1.0

    def _at(self, m: float, n: int, k: int) -> float:
        if (n, k) in self.curves:
            return self.curves[(n, k)](m)
        near = min(self.curves, key=lambda nk: abs(np.log(nk[0] / n)) + abs(np.log(nk[1] / k)))
        return self.curves[near](m) * n * k / (near[0] * near[1])

    def __call__(self, m: float, n: float, k: float) -> float:
        n0, n1, sn = self._bracket(self.ns, n)
        k0, k1, sk = self._bracket(self.ks, k)
        fn = 0.0 if n1 == n0 else (min(n, n1) - n0) / (n1 - n0)
        fk = 0.0 if k1 == k0 else (min(k, k1) - k0) / (k1 - k0)
        t = ((1 - fn) * (1 - fk) * self._at(m, n0, k0) + fn * (1 - fk) * self._at(m, n1, k0)
             + (1 - fn) * fk * self._at(m, n0, k1) + fn * fk * self._at(m, n1, k1))
        return t * sn * sk


def _pick_kernel(cols: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """Keep one kernel source: the one measured at the most shapes (ties: the lower median latency)."""
    kinds = np.unique(cols["kernel_source"])
    best = max(kinds, key=lambda k: ((cols["kernel_source"] == k).sum(),
                                     -np.median(cols["latency"][cols["kernel_source"] == k])))
    sel = cols["kernel_source"] == best
    return {c: v[sel] for c, v in cols.items()}, str(best)


def attention_tables(folder: Path, heads: int, kv_heads: int, head_dim: int) -> tuple[Table2D, Table2D, dict]:
    """(prefill attention over (batch, prompt length), decode attention over (batch, context), kernel names) for
    ``heads`` / ``kv_heads`` per GPU of ``head_dim``, bf16 KV, no sliding window.

    Raises `CalibrationError` listing the measured (heads, kv_heads) pairs when this one is absent.
    """
    want = {"num_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "kv_cache_dtype": "bfloat16", "window_size": 0}
    out, kernels = [], {}
    for name, xcol, power in (("context_attention", "isl", 2.0), ("generation_attention", "step", 1.0)):
        cols = _read(folder / f"{name}_perf.parquet", want)
        if len(cols["latency"]) == 0:
            every = _read(folder / f"{name}_perf.parquet", {"head_dim": head_dim})
            pairs = sorted(set(zip(every["num_heads"].tolist(), every["num_key_value_heads"].tolist())))
            raise CalibrationError(f"{PACKAGE}: {folder.parent.parent.parent.name} {name} has no measurements for "
                                   f"{heads} heads / {kv_heads} KV heads per GPU (head_dim {head_dim}); measured "
                                   f"(heads, kv_heads): {pairs}")
        cols, kernels[name] = _pick_kernel(cols)
        x = cols[xcol].astype(float) + (1.0 if xcol == "step" else 0.0)  # decode: context = step + 1 tokens
        out.append(Table2D(cols["batch_size"].astype(float), x, cols["latency"], power, name))
    return out[0], out[1], kernels


def allreduce_curve(gpu: str, framework: str, version: str | None, tp: int) -> tuple[Curve, str]:
    """All-reduce latency (s) over message size in bf16 elements on ``tp`` GPUs: the framework's custom all-reduce
    table (CUDA-graph variant when measured), else NCCL's. Raises `CalibrationError` when ``tp`` was not measured."""
    try:
        folder, fname = table_folder(gpu, "comm", framework, version), "custom_allreduce_perf.parquet"
        if not (folder / fname).is_file():
            raise CalibrationError("no custom all-reduce table")
        cols = _read(folder / fname, {"num_gpus": tp})
    except CalibrationError:
        folder, fname = table_folder(gpu, "comm", "nccl", None), "nccl_perf.parquet"
        cols = _read(folder / fname, {"num_gpus": tp, "op_name": "all_reduce", "nccl_dtype": "half"})
    if len(cols["latency"]) == 0:
        raise CalibrationError(f"{PACKAGE}: no all-reduce measurements for {tp} GPUs on {gpu}")
    graph = np.array(["graph" in str(k) for k in cols["kernel_source"]])
    if graph.any():
        cols = {c: v[graph] for c, v in cols.items()}
    cols, kernel = _pick_kernel(cols)
    order = np.argsort(cols["message_size"])
    return Curve(cols["message_size"][order].astype(float), cols["latency"][order] / 1e3), kernel
