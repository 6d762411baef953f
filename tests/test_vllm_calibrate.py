"""Parsing vLLM's per-iteration log lines and replaying a burst's contexts, fit recovery (no vLLM needed), and one
short real calibration against a vLLM server (marked vllm)."""

import numpy as np
import pytest

from calibrate.vllm_iterations import burst_samples, fit_profile, parse_iterations
from sim.model_spec import PRESETS


def line(i, cr, ct, gr, gt, ms, dummy=False):
    return (f"(APIServer pid=1) INFO 11-29 04:18:04 [loggers.py:201] Iteration({i}): {cr} context requests, {ct} "
            f"context tokens, {gr} generation requests, {gt} generation tokens, iteration elapsed time: {ms:.2f} ms"
            f"{' (dummy)' if dummy else ''}, CPU KV cache usage: 1.0%\n")


def test_parse_skips_dummy_and_other_lines():
    text = "noise\n" + line(0, 1, 16, 0, 0, 17.5) + line(1, 0, 0, 0, 0, 0.0, dummy=True) + line(2, 0, 0, 2, 2, 9.25)
    its = parse_iterations(text)
    assert [(i.index, i.ctx_requests, i.gen_requests, i.elapsed_s) for i in its] == [(0, 1, 0, 0.0175), (2, 0, 2, 0.00925)]


def test_burst_replay_split_admission():
    # 3 prompts of 10 tokens, max_tokens 3: the first is admitted alone, the other two join with its first decode step
    its = parse_iterations(line(0, 1, 10, 0, 0, 20) + line(1, 2, 20, 1, 1, 30) + line(2, 0, 0, 3, 3, 11)
                           + line(3, 0, 0, 2, 2, 10))
    dec = burst_samples(its, "decode", 3, 10, 3)
    # step 2: request 0 has 2 tokens (context 12), requests 1, 2 have 1 (context 11 each); step 3: only 1 and 2 left
    assert [(s["num_seqs"], s["sum_tokens"], s["time_s"]) for s in dec] == [(3, 34, 0.011), (2, 24, 0.010)]
    pre = burst_samples(its[:1], "prefill", 3, 10, 1)
    assert [(s["num_seqs"], s["sum_tokens"], s["sum_sq_tokens"]) for s in pre] == [(1, 10, 100)]
    assert burst_samples(parse_iterations(line(0, 1, 7, 0, 0, 5)), "prefill", 1, 10, 1) == []  # chunked: no sample


def test_fit_recovers_known_coefficients():
    samples = []
    for b in (1, 2, 4):
        for n in (16, 64, 160, 320, 480):
            samples.append({"phase": "prefill", "num_seqs": b, "sum_tokens": b * n, "sum_sq_tokens": b * n * n,
                            "length": n, "time_s": 0.01 + 4e-5 * b * n + 7e-8 * b * n * n})
    for b in (1, 2, 4, 8, 16):
        for n in (32, 192, 448):
            for k in range(5):
                ctx = b * (n + 1 + k)
                samples.append({"phase": "decode", "num_seqs": b, "sum_tokens": ctx, "sum_sq_tokens": 0, "length": n,
                                "time_s": 0.007 + 3e-5 * b + 1e-6 * ctx})
    prof = fit_profile(samples, "t", PRESETS["tiny"], {}, {})
    assert np.isclose(prof.prefill_s([100, 200]), 0.01 + 4e-5 * 300 + 7e-8 * 50000, rtol=0.01)
    assert np.isclose(prof.decode_step_s(8, 8 * 300), 0.007 + 3e-5 * 8 + 1e-6 * 2400, rtol=0.01)
    assert prof.fit["prefill"]["heldout_mape"] < 0.01 and prof.fit["decode"]["heldout_mape"] < 0.01


def test_fit_adds_the_probed_overheads():
    """The step overhead goes into every formula's fixed term, the request overhead into the profile."""
    samples = [{"phase": "prefill", "num_seqs": b, "sum_tokens": b * n, "sum_sq_tokens": b * n * n, "length": n,
                "time_s": 0.01 + 4e-5 * b * n} for b in (1, 2, 4) for n in (16, 64, 160, 320)]
    samples += [{"phase": "decode", "num_seqs": b, "sum_tokens": b * (n + 1), "sum_sq_tokens": 0, "length": n,
                 "time_s": 0.007 + 1e-6 * b * (n + 1)} for b in (1, 2, 4, 8) for n in (32, 192, 448)]
    plain = fit_profile(samples, "t", PRESETS["tiny"], {}, {})
    over = fit_profile(samples, "t", PRESETS["tiny"], {}, {}, {"step_s": 0.002, "request_s": 0.005, "probes": {}})
    assert np.isclose(over.prefill_s([100]) - plain.prefill_s([100]), 0.002)
    assert np.isclose(over.decode_step_s(4, 800) - plain.decode_step_s(4, 800), 0.002)
    assert (plain.request_overhead_s, over.request_overhead_s) == (0.0, 0.005)
    assert over.fit["overheads"]["step_s"] == 0.002


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_calibrate_vllm_end_to_end_with_overhead_probes(tmp_path):
    """A short real calibration: one eager vLLM server, the iteration-log sweep, the overhead probes, the fit."""
    from calibrate.vllm_iterations import calibrate_vllm
    from sim import CostProfile

    prof = calibrate_vllm("tiny", budget_s=15, rounds=1, out=tmp_path / "v.json", log_dir=tmp_path / "logs")
    over = prof.fit["overheads"]
    assert over["probes"]["step"] >= 6 and over["probes"]["request"] >= 3
    # a streamed token and an HTTP request cost something beyond the logged model step, but not seconds
    assert 0 < over["step_s"] < 0.1 and 0 < over["request_s"] < 1.0
    assert prof.request_overhead_s == over["request_s"]
    assert 0 < prof.decode_step_s(1, 100) < 1.0 and prof.prefill_s([256]) > prof.prefill_s([16]) > 0
    again = CostProfile.load(tmp_path / "v.json")
    assert again.request_overhead_s == prof.request_overhead_s and (tmp_path / "v.samples.parquet").is_file()
