"""Synthetic workload generators (sim.workload_gen) and trace readers (sim.traces)."""

import time

import numpy as np
import pytest

from sim.request import Workload
from sim.traces import BUNDLED, detect_format, load_trace, read_trace
from sim.workload_gen import (
    Constant,
    Empirical,
    Fixed,
    Gamma,
    LogNormal,
    Poisson,
    Uniform,
    arrival_from_dict,
    generate,
    length_from_dict,
    workload_from_dict,
)


def _cv(x):
    return float(np.std(x) / np.mean(x))


def _columns(w: Workload):
    return (np.array([r.arrival_s for r in w]), np.array([r.prompt_tokens for r in w]),
            np.array([r.output_tokens for r in w]))


# --- generators ---------------------------------------------------------------------------------------------------

def test_generate_is_deterministic_and_seed_sensitive():
    args = (500, Gamma(4.0, 2.0), LogNormal(800, 1.0, 4096), Uniform(10, 300))
    a, b = generate(*args, seed=7), generate(*args, seed=7)
    assert a == b and a.to_table().equals(b.to_table())
    assert generate(*args, seed=8) != a
    assert generate(*args, seed=np.random.default_rng(7)) == generate(*args, seed=np.random.default_rng(7))
    assert [r.id for r in a] == list(range(500)) and a.requests[0].arrival_s == 0.0
    assert a.meta["seed"] == 7 and a.meta["generator"]["prompt"] == {"kind": "lognormal", "mean_tokens": 800,
                                                                     "sigma": 1.0, "max_tokens": 4096}


def test_streams_are_independent_per_distribution():
    a = generate(300, Poisson(2.0), Uniform(1, 1000), Fixed(5), seed=1)
    b = generate(300, Poisson(2.0), Uniform(1, 1000), LogNormal(100, 0.5), seed=1)
    assert [(r.arrival_s, r.prompt_tokens) for r in a] == [(r.arrival_s, r.prompt_tokens) for r in b]


def test_poisson_rate_and_cv():
    w = generate(20_000, Poisson(5.0), Fixed(10), Fixed(10), seed=0)
    assert w.rate_rps == pytest.approx(5.0, rel=0.03)
    assert _cv(np.diff(_columns(w)[0])) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_rate_and_cv(cv):
    t = Gamma(8.0, cv).sample(np.random.default_rng(3), 200_000)
    gaps = np.diff(t)
    assert t[0] == 0.0 and len(t) == 200_000 and np.all(gaps >= 0)
    assert 1.0 / gaps.mean() == pytest.approx(8.0, rel=0.03)
    assert _cv(gaps) == pytest.approx(cv, rel=0.06)


def test_constant_arrivals_are_exact():
    t = Constant(4.0).sample(np.random.default_rng(0), 5)
    assert t.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(generate(0, Constant(1.0), Fixed(1), Fixed(1))) == 0
    assert generate(1, Poisson(1.0), Fixed(1), Fixed(1)).requests[0].arrival_s == 0.0


def test_lognormal_mean_and_clipping():
    rng = np.random.default_rng(0)
    x = LogNormal(1000, 1.0).sample(rng, 200_000)
    assert x.dtype == np.int64 and x.mean() == pytest.approx(1000, rel=0.02)
    clipped = LogNormal(1000, 1.0, max_tokens=2000).sample(rng, 50_000)
    assert clipped.max() == 2000 and clipped.mean() < 1000
    tiny = LogNormal(1, 2.0, max_tokens=50).sample(rng, 50_000)
    assert tiny.min() == 1 and tiny.max() == 50


def test_lognormal_from_mean_p99_matches_azure_conv_shape():
    d = LogNormal.from_mean_p99(1155, 4142)
    x = d.sample(np.random.default_rng(1), 400_000)
    assert x.mean() == pytest.approx(1155, rel=0.02) and np.percentile(x, 99) == pytest.approx(4142, rel=0.03)
    with pytest.raises(ValueError, match="no log-normal"):
        LogNormal.from_mean_p99(100, 90)


def test_uniform_and_fixed():
    x = Uniform(3, 6).sample(np.random.default_rng(0), 2000)
    assert set(x.tolist()) == {3, 4, 5, 6}
    assert Fixed(7).sample(np.random.default_rng(0), 3).tolist() == [7, 7, 7]


def test_empirical_samples_pairs_jointly():
    src = Empirical((10, 20, 30), (1, 2, 3), "tiny")
    w = generate(1000, Poisson(1.0), lengths=src, seed=2)
    pairs = {(r.prompt_tokens, r.output_tokens) for r in w}
    assert pairs == {(10, 1), (20, 2), (30, 3)}
    assert w.meta["generator"]["lengths"] == {"kind": "empirical", "source": "tiny", "pairs": 3}


def test_generate_rejects_bad_combinations():
    with pytest.raises(ValueError, match="lengths="):
        generate(10, Poisson(1.0), Empirical((1,), (1,)), Fixed(1))
    with pytest.raises(ValueError, match="both prompt= and output="):
        generate(10, Poisson(1.0), Fixed(1))
    with pytest.raises(ValueError, match="num_requests"):
        generate(-1, Poisson(1.0), Fixed(1), Fixed(1))


def test_parse_from_dicts():
    assert arrival_from_dict({"kind": "gamma", "rate_rps": 2, "cv": 4}) == Gamma(2, 4)
    assert arrival_from_dict({"kind": "constant", "rate_rps": 1.5}) == Constant(1.5)
    assert length_from_dict({"kind": "lognormal", "mean_tokens": 500, "sigma": 0.5}) == LogNormal(500, 0.5)
    assert length_from_dict({"kind": "uniform", "low_tokens": 1, "high_tokens": 9}) == Uniform(1, 9)
    p99 = length_from_dict({"kind": "lognormal", "mean_tokens": 1155, "p99_tokens": 4142, "max_tokens": 8192})
    assert p99 == LogNormal.from_mean_p99(1155, 4142, 8192)
    emp = length_from_dict({"kind": "empirical", "trace": "azure-code", "limit": 50})
    assert isinstance(emp, Empirical) and len(emp.prompt_tokens) == 50 and emp.source == "azure-code"


@pytest.mark.parametrize("d, message", [
    ({"kind": "weibull", "rate_rps": 1}, "unknown kind 'weibull'"),
    ({"rate_rps": 1}, "unknown kind None"),
    ({"kind": "poisson"}, "missing key 'rate_rps'"),
    ({"kind": "poisson", "rate": 1}, "unexpected key 'rate'"),
    ({"kind": "poisson", "rate_rps": -2}, "rate_rps must be > 0, got -2"),
    ({"kind": "gamma", "rate_rps": 1, "cv": "high"}, "cv must be a finite number, got 'high'"),
    ("poisson", "expected a mapping"),
])
def test_arrival_dict_errors_name_the_key(d, message):
    with pytest.raises(ValueError, match=message):
        arrival_from_dict(d)


@pytest.mark.parametrize("d, message", [
    ({"kind": "fixed", "tokens": 0}, "tokens must be an integer >= 1, got 0"),
    ({"kind": "fixed", "tokens": 2.5}, "tokens must be an integer >= 1, got 2.5"),
    ({"kind": "uniform", "low_tokens": 9, "high_tokens": 3}, "high_tokens"),
    ({"kind": "lognormal", "mean": 1000, "sigma": 1}, "unexpected key 'mean'"),
    ({"kind": "lognormal", "mean_tokens": 1000, "sigma": 1, "p99_tokens": 9}, "not both"),
    ({"kind": "lognormal", "mean_tokens": 1000}, "missing key 'sigma'"),
    ({"kind": "empirical"}, "missing key 'trace'"),
    ({"kind": "empirical", "trace": "no-such-trace"}, "unknown trace 'no-such-trace'"),
])
def test_length_dict_errors_name_the_key(d, message):
    with pytest.raises(ValueError, match=message):
        length_from_dict(d)


def test_workload_from_dict():
    cfg = {"num_requests": 200, "seed": 3, "arrival": {"kind": "poisson", "rate_rps": 10},
           "prompt": {"kind": "fixed", "tokens": 64}, "output": {"kind": "uniform", "low_tokens": 1, "high_tokens": 8}}
    w = workload_from_dict(cfg)
    assert len(w) == 200 and w == workload_from_dict(cfg)
    assert w == generate(200, Poisson(10), Fixed(64), Uniform(1, 8), seed=3)
    with pytest.raises(ValueError, match="unexpected key 'rate'"):
        workload_from_dict({**cfg, "rate": 3})
    with pytest.raises(ValueError, match="missing key 'arrival'"):
        workload_from_dict({"num_requests": 3})


# --- bundled traces -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def traces():
    return {name: load_trace(name) for name in BUNDLED}


@pytest.mark.parametrize("name, rows, rate, prompt_mean, output_mean, gap_cv", [
    ("azure-conv", 19366, 5.53, 1155, 211, 1.1),
    ("azure-code", 8819, 2.57, 2048, 28, 13.0),
    ("mooncake-conv", 12031, 3.40, 12035, 343, None),
])
def test_bundled_trace_shapes(traces, name, rows, rate, prompt_mean, output_mean, gap_cv):
    w = traces[name]
    t, p, o = _columns(w)
    assert len(w) == rows and w.name == name and w.meta["rows"] == rows and w.meta["clamped_rows"] == 0
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0) and [r.id for r in w][:3] == [0, 1, 2]
    assert w.rate_rps == pytest.approx(rate, rel=0.01)
    assert p.mean() == pytest.approx(prompt_mean, rel=0.01) and o.mean() == pytest.approx(output_mean, rel=0.01)
    if gap_cv is not None:
        assert _cv(np.diff(t)) == pytest.approx(gap_cv, rel=0.05)


def test_azure_conv_loads_fast_and_first_rows_exact():
    start = time.perf_counter()
    w = load_trace("azure-conv")
    assert time.perf_counter() - start < 2.0  # ~0.1 s here; generous for a shared machine
    r0, r1 = w.requests[:2]
    assert (r0.prompt_tokens, r0.output_tokens, r1.prompt_tokens, r1.output_tokens) == (374, 44, 396, 109)
    assert r1.arrival_s == pytest.approx(50.9951690 - 46.6805900, abs=1e-6)


def test_mooncake_keeps_prefix_blocks_and_ms_timestamps(traces):
    w = traces["mooncake-conv"]
    assert w.requests[0].prefix_block_ids == tuple(range(14))
    assert w.requests[1].prefix_block_ids[0] == 0  # shares block 0 with request 0
    assert w.duration_s == pytest.approx(3536.999)
    assert w.meta["format"] == "mooncake"


def test_limit_and_rate_scaling(traces):
    head = load_trace("azure-code", limit=100)
    assert len(head) == 100 and [r.prompt_tokens for r in head] == [r.prompt_tokens for r in traces["azure-code"]][:100]
    assert len(load_trace("mooncake-conv", limit=10)) == 10 and len(load_trace("azure-conv", limit=0)) == 0
    w = traces["azure-conv"]
    assert w.with_rate(10.0).rate_rps == pytest.approx(10.0)
    fast = w.scale_rate(2.0)
    assert fast.duration_s == pytest.approx(w.duration_s / 2) and _columns(fast)[1].tolist() == _columns(w)[1].tolist()


def test_detect_format_of_bundled_files():
    assert detect_format(BUNDLED["azure-conv"]) == "azure"
    assert detect_format(BUNDLED["mooncake-conv"]) == "mooncake"


# --- other formats and bad rows, on small files -------------------------------------------------------------------

def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_vidur_reader(tmp_path):
    path = _write(tmp_path, "vidur.csv", "arrived_at,num_prefill_tokens,num_decode_tokens,num_total_tokens\n"
                                         "10.5,100,20,120\n11.0,200,0,200\n10.25,50,5,55\n")
    w = read_trace(path)
    assert w.meta["format"] == "vidur" and w.name == "vidur" and w.meta["clamped_rows"] == 1
    assert [(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in w] == [
        (2, 0.0, 50, 5), (0, 0.25, 100, 20), (1, 0.75, 200, 1)]


def test_splitwise_reader(tmp_path):
    path = _write(tmp_path, "sw.csv", "request_id,request_type,application_id,arrival_timestamp,batch_size,"
                                      "prompt_size,token_size\n0,2,0,0.0,1,1020,129\n1,2,0,0.125,1,4,7\n")
    w = read_trace(path)
    assert w.meta["format"] == "splitwise"
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in w] == [(0.0, 1020, 129), (0.125, 4, 7)]


def test_burstgpt_reader_skips_failures(tmp_path):
    path = _write(tmp_path, "burst.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                                         "5,ChatGPT,472,18,490,Conversation log\n"
                                         "7,GPT-4,1000,0,1000,Conversation log\n"
                                         "9,ChatGPT,0,30,30,API log\n")
    w = read_trace(path)
    assert w.meta["format"] == "burstgpt" and w.meta["failed_rows"] == 1 and w.meta["clamped_rows"] == 1
    assert [(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in w] == [(0, 0.0, 472, 18), (1, 4.0, 1, 30)]


AZ = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n"


@pytest.mark.parametrize("body, line, message", [
    (AZ + "2023-11-16 18:17:04.0319600,abc,8\n", 3, "column 'ContextTokens': expected a whole number >= 0, got 'abc'"),
    (AZ + "\n2023-11-16 18:17:04.0319600,5,-8\n", 4, "column 'GeneratedTokens'.*got '-8'"),
    (AZ + "2023-11-16 18:17:04.0319600,5.5,8\n", 3, "got '5.5'"),
    (AZ + "2023-11-16 18:17:04.0319600,,8\n", 3, "got ''"),
    (AZ + "2023-13-16 18:17:04.0319600,5,8\n", 3, "column 'TIMESTAMP': expected a datetime"),
    (AZ + "2023-11-16 18:17:04.0319600,5\n", 3, "expected 3 fields, got 2"),
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:17:04.0319600,5\n", 1, "missing column 'GeneratedTokens'"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, body, line, message):
    path = _write(tmp_path, "bad.csv", body)
    with pytest.raises(ValueError, match=f"bad.csv: line {line}: .*{message}"):
        read_trace(path, format="azure")


MC = '{"timestamp": 0, "input_length": 5, "output_length": 2}\n'


@pytest.mark.parametrize("body, line, message", [
    (MC + '{"timestamp": 1,\n', 2, "invalid JSON"),
    ('{"timestamp": 0, "input_length": 5}\n', 1, "missing key 'output_length'"),
    (MC + '\n{"timestamp": 0, "input_length": -5, "output_length": 2}\n', 3, "'input_length': expected a whole number >= 0, got -5"),
    ('{"timestamp": 0, "input_length": 5, "output_length": "2"}\n', 1, "got '2'"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [1, "x"]}\n', 1, "'hash_ids'"),
    ('[1, 2]\n', 1, "expected a JSON object"),
])
def test_bad_mooncake_rows_name_file_and_line(tmp_path, body, line, message):
    path = _write(tmp_path, "bad.jsonl", body)
    with pytest.raises(ValueError, match=f"bad.jsonl: line {line}: .*{message}"):
        read_trace(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the trace format"):
        read_trace(_write(tmp_path, "x.csv", "a,b,c\n1,2,3\n"))
    with pytest.raises(ValueError, match="unknown trace format 'parquet'"):
        read_trace(_write(tmp_path, "y.csv", AZ), format="parquet")
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="limit must be"):
        read_trace(_write(tmp_path, "z.csv", AZ), limit=-1)
    assert load_trace(str(_write(tmp_path, "az.csv", AZ))).meta["format"] == "azure"
