"""calibrate's pure parts on synthetic data: fits recover known coefficients, drift correction, outlier rejection,
the grid, and the budgeted sweep driven by a fake clock (every timeline computed by hand)."""

import numpy as np
import pytest

from calibrate import CalibrationError
from calibrate.fit import fit_decode, fit_linear_relative, fit_prefill
from calibrate.grid import GridLimits, GridPoint, build_grid
from calibrate.samples import SampleLog, drift_factors, outlier_mask, summarize_point
from calibrate.sweep import sweep
from calibrate.transfer import fit_link, plan_sizes


def prefill_shapes():
    n = np.repeat([1, 2, 4, 8], 7)
    lens = np.tile([32, 64, 128, 256, 512, 1024, 2048], 4)
    keep = n * lens <= 4096
    return n[keep], lens[keep]


@pytest.mark.parametrize("terms", ["", "d", "e"])
def test_prefill_fit_recovers_coefficients_from_noisy_data(terms):
    rng = np.random.default_rng(1)
    n, lens = prefill_shapes()
    s1, s2 = n * lens, n * lens * lens
    truth = {"a_s": 5e-3, "b_s": 4e-5, "c_s": 2e-8, "d_s": 1e-3 if "d" in terms else 0.0,
             "e_s": 1e-8 if "e" in terms else 0.0}
    y = truth["a_s"] + truth["b_s"] * s1 + truth["c_s"] * s2 + truth["d_s"] * n + truth["e_s"] * s1 * s1
    fit = fit_prefill(n, s1, s2, y * rng.lognormal(0, 0.02, len(y)))
    assert set(terms) <= set(fit.terms)
    for key, want in truth.items():
        assert getattr(fit.cost, key) == pytest.approx(want, rel=0.15, abs=3e-4 * want + 1e-12), key
    assert fit.cv_mape < 0.04


def test_decode_fit_finds_the_batch_breakpoint():
    rng = np.random.default_rng(2)
    b = np.repeat([1, 2, 4, 8, 16, 32, 64, 128], 5)
    ctx = b * np.tile([16, 64, 256, 1024, 2048], 8)
    small = 4e-3 + 1e-4 * b + 7e-7 * ctx
    large = 2e-3 + 4e-4 * b + 9e-7 * ctx
    y = np.where(b <= 8, small, large) * rng.lognormal(0, 0.02, len(b))
    fit = fit_decode(b, ctx, y)
    assert [p.max_batch for p in fit.pieces][:-1] == [8]
    lo, hi = fit.pieces
    assert (lo.a_s, lo.b_s, lo.c_s) == pytest.approx((4e-3, 1e-4, 7e-7), rel=0.15)
    assert (hi.a_s, hi.b_s, hi.c_s) == pytest.approx((2e-3, 4e-4, 9e-7), rel=0.15)
    assert np.mean(np.abs(fit.predict(b, ctx) / y - 1)) < 0.03


def test_decode_fit_keeps_one_piece_when_the_data_is_linear():
    b = np.repeat([1, 2, 4, 8, 16, 32], 4)
    ctx = b * np.tile([64, 256, 1024, 2048], 6)
    fit = fit_decode(b, ctx, 3e-3 + 5e-5 * b + 8e-7 * ctx)
    assert len(fit.pieces) == 1 and fit.pieces[0].max_batch == 1 << 30
    assert fit.pieces[0].c_s == pytest.approx(8e-7, rel=1e-3)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 4"):
        fit_prefill([1, 2], [10, 20], [100, 400], [1e-3, 2e-3])
    with pytest.raises(ValueError, match="> 0"):
        fit_linear_relative(np.ones((3, 2)), np.array([1.0, 0.0, 2.0]))


def test_transfer_fit_recovers_latency_and_bandwidth():
    sizes = np.array([4096 * 4**i for i in range(9)], dtype=float)
    link, info = fit_link("shm", sizes, 30e-6 + sizes / 5e9)
    assert link.latency_s == pytest.approx(30e-6, rel=1e-3)
    assert link.bandwidth_bytes_per_s == pytest.approx(5e9, rel=1e-3)
    assert info["mape"] < 1e-6
    assert plan_sizes(100.0, 2, 6e9) == (sizes.astype(int).tolist(), 6)
    assert plan_sizes(0.1, 2, 6e9)[0] == sizes[:4].astype(int).tolist()


def test_drift_correction_removes_a_slow_spell_and_outliers_are_dropped():
    rng = np.random.default_rng(3)
    true = {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0}
    points = np.concatenate([rng.permutation(4) for _ in range(30)])
    slow = np.where((np.arange(len(points)) // 20) % 2 == 1, 1.6, 1.0)  # slow spells of 20 samples
    times = np.array([true[p] for p in points]) * slow * rng.lognormal(0, 0.01, len(points))
    f = drift_factors(points, times)
    fixed = times / f
    for p, want in true.items():
        raw, corrected = np.median(times[points == p]), np.median(fixed[points == p])
        assert abs(corrected / want - 1) < abs(raw / want - 1) or abs(corrected / want - 1) < 0.05
        assert np.std(np.log(fixed[points == p])) < 0.6 * np.std(np.log(times[points == p]))  # edges of spells stay blurred
    assert outlier_mask(np.array([1.0, 1.01, 0.99, 1.02, 5.0])).tolist() == [True] * 4 + [False]
    s = summarize_point(np.array([1.0, 1.01, 0.99, 1.02, 5.0]))
    assert (s.median_s, s.kept, s.rejected) == (pytest.approx(1.005), 4, 1)


def test_grid_respects_limits_is_seeded_and_holds_out_in_between_shapes():
    lim = GridLimits(max_prefill_tokens=2048, max_prefill_batch=8, max_len=2048)
    a = build_grid("prefill", lim, np.random.default_rng(0))
    b = build_grid("prefill", lim, np.random.default_rng(0))
    assert a == b
    fit = [p for p in a if not p.heldout]
    held = [p for p in a if p.heldout]
    assert len(held) >= 6 and len(fit) >= 15
    assert all(p.sum_tokens <= 2048 and p.length <= 2048 for p in a)
    grid_lens = {32 * 2**i for i in range(7)}
    assert all(p.length not in grid_lens for p in held)
    with pytest.raises(ValueError, match="unknown phase"):
        build_grid("train", lim, np.random.default_rng(0))


class FakeClock:
    """A clock that only moves when a fake step runs: step (b, L) takes b * L milliseconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def step(self, p: GridPoint) -> float:
        dt = p.batch * p.length * 1e-3
        self.now += dt
        return dt


def grid(n_fit: int, n_held: int = 2) -> list[GridPoint]:
    pts = [GridPoint("decode", i, 1, 10 * (i + 1), False) for i in range(n_fit)]
    return pts + [GridPoint("decode", n_fit + j, 1, 15 + 10 * j, True) for j in range(n_held)]


def test_sweep_timeline_with_a_fake_clock():
    # pilot visits 0.01, 0.015, 0.02, 0.025, 0.03, 0.04 s (ascending work); all fit (pilot 0.14 s + 3 x 0.14 <= 1 s)
    clock = FakeClock()
    log = SampleLog()
    res = sweep(grid(4), clock.step, 1.0, log, np.random.default_rng(0), min_rounds=3, max_rounds=5, clock=clock)
    assert res.dropped == [] and res.rounds == 5  # 0.14 + 5 x 0.14 = 0.84 s < 1 s: capped by max_rounds
    assert len(log.rows) == 6 * 6
    assert clock.now == pytest.approx(0.84)
    assert all(s.median_s == pytest.approx(0.001 * p.length) for p in res.points for s in [res.summaries[p.index]])
    assert all(r["rejected"] for r in log.rows if r["round"] == 0)


def test_sweep_drops_big_points_and_stops_at_the_budget():
    clock = FakeClock()
    res = sweep(grid(8, 0), clock.step, 0.5, SampleLog(), np.random.default_rng(0), min_rounds=3, clock=clock)
    assert [p.length for p in res.points] == [10, 20, 30, 40]  # 0.1 s of pilot + 3 x 0.1 s <= 0.5 s; 50 is out
    assert [p.length for p in res.dropped] == [50, 60, 70, 80]
    assert res.rounds >= 3 and clock.now <= 0.5 + 0.04


def test_sweep_refuses_a_budget_too_small():
    clock = FakeClock()
    with pytest.raises(CalibrationError, match="too small"):
        sweep(grid(4), clock.step, 0.02, SampleLog(), np.random.default_rng(0), clock=clock)
    with pytest.raises(CalibrationError, match="fit point"):
        sweep(grid(8), clock.step, 0.25, SampleLog(), np.random.default_rng(0), min_fit_points=6, clock=clock)
