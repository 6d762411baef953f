"""Host-speed sensors (`calibrate.host_speed`): the reference and per-instance traces computed from constructed
readings, and real sensor processes on this machine's CPUs."""

import os
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from calibrate.host_speed import (
    DECODE_CONTEXT,
    PREFILL_TOKENS,
    Reference,
    SensorError,
    Sensors,
    reference,
    speed_traces,
)


def _rows(t, pre, dec):
    return np.array(list(zip(t, pre, dec, strict=True)), float)


def test_reference_is_the_median_over_all_cpus():
    r = {0: _rows([1, 2, 3], [0.010, 0.012, 0.030], [0.005, 0.006, 0.007]), 1: _rows([1.5, 2.5], [0.011, 0.020], [0.004, 0.008])}
    ref = reference(r)
    assert (ref.prefill_s, ref.decode_s, ref.samples) == (pytest.approx(0.012), pytest.approx(0.006), 5)
    with pytest.raises(SensorError, match="too few host-speed readings"):
        reference({0: _rows([1, 2], [0.01, 0.01], [0.01, 0.01]), 1: np.zeros((0, 3))})


def test_speed_traces_are_rolling_medians_over_the_reference_per_instance():
    ref = Reference(0.010, 0.005, 10)
    r = {0: _rows([100.0, 100.5, 101.0, 101.5, 102.0], [0.010, 0.030, 0.020, 0.020, 0.010], [0.005] * 5),
         1: np.zeros((0, 3))}
    tr = speed_traces(r, {"C0": 0, "C1": 1}, ref, t_origin=100.0, smooth=3)
    assert set(tr) == {"C0"}  # C1's CPU has no reading: no trace, simulated at the profile's speed
    assert tr["C0"].t_s == (0.0, 0.5, 1.0, 1.5, 2.0)
    # centred medians of 3: [10,30] -> 20, [10,30,20] -> 20, [30,20,20] -> 20, [20,20,10] -> 20, [20,10] -> 15 (ms)
    assert tr["C0"].prefill == pytest.approx((2.0, 2.0, 2.0, 2.0, 1.5))
    assert tr["C0"].decode == pytest.approx((1.0,) * 5)


def test_reference_round_trips_and_rejects_bad_values():
    ref = Reference(0.02, 0.01, 7)
    assert Reference.from_dict(ref.to_dict()) == ref
    with pytest.raises(ValueError, match=r"meta\.host_speed_reference: bad or missing"):
        Reference.from_dict({"prefill_s": 0.02})
    with pytest.raises(ValueError, match="finite and > 0"):
        Reference.from_dict({"prefill_s": 0.0, "decode_s": 0.01, "samples": 3})
    with pytest.raises(ValueError, match="other probe shapes"):
        Reference.from_dict({**ref.to_dict(), "prefill_tokens": PREFILL_TOKENS + 1})
    assert (ref.prefill_tokens, ref.decode_context) == (PREFILL_TOKENS, DECODE_CONTEXT)


def test_real_sensors_read_every_cpu_and_stop(tiny_model_dir, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    with Sensors(tiny_model_dir, cpus, period_s=0.1, dtype="fp32", out_dir=tmp_path) as s:
        time.sleep(1.0)
        r = s.readings()
        procs = list(s.procs.values())
    assert all(p.returncode is not None for p in procs)  # stopped on leaving the block
    for cpu in cpus:
        rows = r[cpu]
        assert len(rows) >= 3
        assert np.all(np.diff(rows[:, 0]) > 0)
        assert np.all((rows[:, 1:] > 0) & (rows[:, 1:] < 5)) and np.all(np.isfinite(rows))
    ref = reference(r)
    assert ref.prefill_s > ref.decode_s  # 96 new tokens cost more than one token over 128 cached, on any CPU
    lo, hi = time.monotonic() - 3600, r[cpus[0]][1, 0]
    assert len(s.readings(lo, hi)[cpus[0]]) == 2  # the time window is inclusive


def test_a_sensor_that_cannot_start_says_why(tmp_path):
    with pytest.raises(SensorError, match=r"(?s)sensor on CPU \d+ exited with status 1.*no-model"):
        Sensors(tmp_path / "no-model", [sorted(os.sched_getaffinity(0))[0]], out_dir=tmp_path / "s").start()


def test_a_sensor_that_dies_while_running_is_an_error_not_a_silent_gap(tiny_model_dir):
    cpus = sorted(os.sched_getaffinity(0))[:1]
    with Sensors(tiny_model_dir, cpus, period_s=0.1, dtype="fp32") as s:
        folder = s.dir
        assert len(s.readings()[cpus[0]]) >= 0
        s.procs[cpus[0]].kill()
        s.procs[cpus[0]].wait()
        with pytest.raises(SensorError, match=rf"sensor on CPU {cpus[0]} exited with status -9 while running"):
            s.readings()
    assert not folder.exists()  # its temporary folder goes with it
