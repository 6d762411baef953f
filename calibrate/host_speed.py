"""Host-speed sensors: how fast each CPU core runs the model, over time.

A shared host's cores change speed under their other tenants. Measured on the 2-core machine disagg is developed on:
a fixed bf16 GEMM on one core alternates between ~150 and ~400 us for seconds at a time, each core on its own
schedule; the engine's own prefill steps followed a sensor's reading with a correlation of 0.80 over 2-second windows
(decode 0.82). A profile calibrated in a fast spell then predicts a serving run in a slow one 1.5x too fast, whatever
the simulator does. Like the background CPU load (`sim.topology.HostCPU`), this is a property of the host during the
run, so validation measures it during the run and gives it to the simulator.

A sensor is a small process pinned to one CPU that runs a reference prefill (`PREFILL_TOKENS` tokens) and a
reference decode step (batch 1, `DECODE_CONTEXT` tokens of context) of the same model every ``period_s``, each twice
in a row, and times the second of each pair in the thread's CPU time (waiting for the core while a worker runs is not
counted; running slowly on it is). The first of a pair warms the core up: single probes after the sleep read what
the core was doing before (measured: 8.5 % faster on a core kept busy by a worker than on an idle one, against
2.3 % for the second of two, median of 8 alternations each). Readings
taken while the profile is calibrated are its `reference`; a run's readings divided by the reference are each core's
slowdown factors over time, and `speed_traces` turns them into a `sim.topology.SpeedTrace` per engine instance
(workers pinned with ``Cluster(pin_cores=True)``). Cost: about 4 % of each core at the default period on the tiny
model (~40 ms of probes every second), counted in the background CPU the contention model sees.

Limitation (measured, why `disagg validate` makes this opt-in): the readings also follow the run's own load on the
cores, not only other tenants'. With the reference taken during a serving calibration (heavy load) the readings in
lighter validation runs came out mostly lower (per-instance median factors 0.61-1.04), while the engine's steps
were not faster by as much: the corrected step times were still too fast in all 12 runs (prefill 8-21 %, decode
5-19 %).

Files: each sensor appends JSON lines ``{"t": monotonic s, "prefill_s": s, "decode_s": s}`` (after one
``{"ready": true}`` line once its model is loaded and warm) to ``<dir>/cpu<N>.jsonl``.

    with Sensors(model_dir, cpus=[0, 1]) as sensors:
        ...                                     # calibrate, or run the engine
    ref = reference(sensors.readings())         # or speed_traces(sensors.readings(), ...)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sim.topology import SpeedTrace

PREFILL_TOKENS = 64
DECODE_CONTEXT = 128
PERIOD_S = 1.0
SMOOTH = 5  # readings per rolling median (5 s at the default period)
READY_TIMEOUT_S = 120.0


class SensorError(RuntimeError):
    """A sensor process failed to start or died; the message has its log's tail."""


@dataclass(frozen=True)
class Reference:
    """The sensors' median readings while a profile was calibrated: the speed the profile's numbers hold at."""

    prefill_s: float
    decode_s: float
    samples: int
    prefill_tokens: int = PREFILL_TOKENS
    decode_context: int = DECODE_CONTEXT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "profile meta.host_speed_reference") -> Reference:
        try:
            ref = cls(float(d["prefill_s"]), float(d["decode_s"]), int(d["samples"]),
                      int(d.get("prefill_tokens", PREFILL_TOKENS)), int(d.get("decode_context", DECODE_CONTEXT)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad or missing value ({e})") from None
        if not (ref.prefill_s > 0 and ref.decode_s > 0 and math.isfinite(ref.prefill_s + ref.decode_s)):
            raise ValueError(f"{where}: reference times must be finite and > 0")
        if (ref.prefill_tokens, ref.decode_context) != (PREFILL_TOKENS, DECODE_CONTEXT):
            raise ValueError(f"{where}: measured with other probe shapes ({ref.prefill_tokens} prefill tokens, "
                             f"{ref.decode_context} decode context; this disagg uses {PREFILL_TOKENS}, {DECODE_CONTEXT})")
        return ref


Readings = dict[int, np.ndarray]  # cpu -> rows of (t, prefill_s, decode_s), ascending t


class Sensors:
    """One sensor process per CPU in ``cpus`` (context manager). Starting waits until every sensor is warm."""

    def __init__(self, model_dir: str | Path, cpus: list[int], period_s: float = PERIOD_S, dtype: str = "bf16",
                 out_dir: str | Path | None = None):
        if not cpus:
            raise ValueError("Sensors needs at least one CPU")
        if not period_s > 0:
            raise ValueError(f"sensor period must be > 0 s, got {period_s!r}")
        self.model_dir, self.cpus, self.period_s, self.dtype = str(model_dir), list(cpus), period_s, dtype
        self.out_dir = Path(out_dir) if out_dir else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.dir = self.out_dir or Path()  # set by `start` (a temporary folder without ``out_dir``)
        self.procs: dict[int, subprocess.Popen] = {}
        self._stopped = False

    def __enter__(self) -> Sensors:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _path(self, cpu: int) -> Path:
        return self.dir / f"cpu{cpu}.jsonl"

    def start(self) -> None:
        if self.out_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="disagg-speed-")
            self.dir = Path(self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stopped = False
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        try:
            for cpu in self.cpus:
                self._path(cpu).unlink(missing_ok=True)
                with open(self.dir / f"cpu{cpu}.log", "ab") as log:
                    self.procs[cpu] = subprocess.Popen(
                        [sys.executable, "-m", "calibrate.host_speed", self.model_dir, str(cpu), str(self._path(cpu)),
                         str(self.period_s), self.dtype, str(os.getpid())],
                        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + READY_TIMEOUT_S
            for cpu, p in self.procs.items():
                while not self._ready(cpu):
                    if p.poll() is not None or time.monotonic() > deadline:
                        why = f"exited with status {p.returncode}" if p.returncode is not None else \
                            f"not ready after {READY_TIMEOUT_S:g} s"
                        raise SensorError(f"host-speed sensor on CPU {cpu} {why}:\n{self._log_tail(cpu)}")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def _ready(self, cpu: int) -> bool:
        p = self._path(cpu)
        return p.exists() and p.read_text().startswith('{"ready"')

    def _log_tail(self, cpu: int) -> str:
        p = self.dir / f"cpu{cpu}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-15:]) if p.exists() else "(no log)"

    def stop(self) -> None:
        self._stopped = True
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _cpu, p in self.procs.items():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def readings(self, t_from: float = -math.inf, t_to: float = math.inf) -> Readings:
        """Every reading so far (or between two monotonic times), per CPU. Sensors keep running. Raises
        `SensorError` if a sensor has died since `start` (its CPU's speed would be unknown)."""
        out: Readings = {}
        for cpu in self.cpus:
            p = self.procs.get(cpu)
            if p is not None and not self._stopped and p.poll() is not None:
                raise SensorError(f"host-speed sensor on CPU {cpu} exited with status {p.returncode} while "
                                  f"running:\n{self._log_tail(cpu)}")
            rows = []
            path = self._path(cpu)
            for line in (path.read_text().splitlines() if path.exists() else []):
                try:
                    d = json.loads(line)
                except ValueError:  # the line being written as we read
                    continue
                if "t" in d and t_from <= d["t"] <= t_to:
                    rows.append((d["t"], d["prefill_s"], d["decode_s"]))
            out[cpu] = np.array(rows, float).reshape(-1, 3)
        return out

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def reference(readings: Readings) -> Reference:
    """The medians over every CPU's readings (the speed a calibration that ran meanwhile saw, on whichever core)."""
    rows = np.concatenate([r for r in readings.values() if len(r)]) if any(len(r) for r in readings.values()) else None
    if rows is None or len(rows) < 3:
        raise SensorError(f"too few host-speed readings for a reference ({0 if rows is None else len(rows)}; "
                          "the calibration was shorter than a few sensor periods)")
    return Reference(float(np.median(rows[:, 1])), float(np.median(rows[:, 2])), len(rows))


def _rolling_median(x: np.ndarray, width: int) -> np.ndarray:
    half = width // 2
    return np.array([np.median(x[max(0, i - half):i + half + 1]) for i in range(len(x))])


def speed_traces(readings: Readings, cpu_of: Mapping[str, int], ref: Reference, t_origin: float,
                 smooth: int = SMOOTH) -> dict[str, SpeedTrace]:
    """A `SpeedTrace` per instance name in ``cpu_of`` (instance -> CPU it was pinned to): each reading's time minus
    ``t_origin`` (the run's monotonic origin), and its CPU's rolling-median (``smooth`` readings, centred) reading
    over the reference, for prefill and decode. Instances whose CPU has no reading get none."""
    out = {}
    for name, cpu in cpu_of.items():
        r = readings.get(cpu)
        if r is None or not len(r):
            continue
        pre = _rolling_median(r[:, 1], smooth) / ref.prefill_s
        dec = _rolling_median(r[:, 2], smooth) / ref.decode_s
        out[name] = SpeedTrace(tuple(float(t) for t in r[:, 0] - t_origin), tuple(map(float, pre)),
                               tuple(map(float, dec)))
    return out


# ---- the sensor process ----------------------------------------------------------------------------------------
def _sensor_main(argv: list[str]) -> int:
    model_dir, cpu, out, period_s, dtype, parent = argv[0], int(argv[1]), Path(argv[2]), float(argv[3]), argv[4], int(argv[5])
    os.sched_setaffinity(0, {cpu})
    import torch

    from engine.model.runner import ModelRunner, Sequence

    torch.set_num_threads(1)
    blocks = (PREFILL_TOKENS + DECODE_CONTEXT) // 16 + 4
    runner = ModelRunner.from_folder(model_dir, blocks, 16, dtype=dtype)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    vocab = runner.cfg.vocab_size

    def timed(seq: Sequence, step: Callable) -> float:
        """Thread CPU seconds of ``step([seq])``; the sequence's blocks are freed after."""
        try:
            t0 = time.thread_time()
            step([seq])
            return time.thread_time() - t0
        finally:
            runner.free(seq)

    def prefill() -> float:
        return timed(Sequence(-1, [(7 * i) % vocab for i in range(PREFILL_TOKENS)]), runner.prefill)

    def decode() -> float:
        s = Sequence(-2, [(5 * i) % vocab for i in range(DECODE_CONTEXT)])
        s.num_cached_tokens = DECODE_CONTEXT - 1
        runner.reserve([s], [DECODE_CONTEXT])
        return timed(s, runner.decode)

    def second(probe: Callable[[], float]) -> float:
        probe()
        return probe()

    for _ in range(5):
        prefill()
        decode()
    with open(out, "a", buffering=1) as f:
        f.write('{"ready": true}\n')
        while not stop.is_set() and os.getppid() == parent:
            t = time.monotonic()
            f.write(json.dumps({"t": t, "prefill_s": second(prefill), "decode_s": second(decode)}) + "\n")
            stop.wait(max(0.0, period_s - (time.monotonic() - t)))
    return 0


if __name__ == "__main__":
    sys.exit(_sensor_main(sys.argv[1:]))
