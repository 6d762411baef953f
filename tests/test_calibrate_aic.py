"""Profiles for hardware that is not here: import from aiconfigurator-core's kernel tables, and the roofline."""

import pytest

pytest.importorskip("aiconfigurator_core")

from typer.testing import CliRunner

from calibrate import CalibrationError, import_aic, roofline
from calibrate.aic_import import StepComposer
from calibrate.report import compare
from disagg_cli.main import app
from sim.cost_profile import CostProfile
from sim.model_spec import PRESETS


@pytest.fixture(scope="module")
def h200_8b():
    return import_aic("h200_sxm", "llama-3.1-8b", tp=1)


def test_import_builds_a_profile_that_follows_the_kernel_sums(h200_8b):
    prof = h200_8b
    assert prof.source == "imported" and prof.hardware == "h200-sxm" and prof.tp == 1
    assert prof.memory_bytes == 151397597184
    src = prof.fit["source"]
    assert src["framework"] == "vllm" and src["gemm_tables"] and src["kernels"]["generation_attention"]
    for phase in ("prefill", "decode"):
        assert prof.fit[phase]["heldout_points"] >= 6 and prof.fit[phase]["heldout_mape"] < 0.10
    # batch-1 decode is bound by reading the weights: 16 GB at 0.8 x 4.8 TB/s is 4.2 ms
    weights_s = PRESETS["llama-3.1-8b"].weight_bytes / (4.8e12 * 0.8)
    assert weights_s < prof.decode_step_s(1, 1024) < 1.5 * weights_s


def test_imported_and_roofline_agree_within_a_factor(h200_8b):
    roof = roofline("llama-3.1-8b", "h200-sxm", 1)
    for row in compare({"aic": h200_8b, "roofline": roof}):
        assert 0.5 < row["aic"] / row["roofline"] < 2.0, row


def test_composer_against_a_hand_count():
    comp = StepComposer(PRESETS["llama-3.1-8b"], "h200_sxm", tp=1)
    # prefill of 4096 tokens: ~2 x 7.5 GFLOP/token of GEMMs at several hundred TFLOP/s, plus attention
    flops = 2 * PRESETS["llama-3.1-8b"].matmul_params * 4096
    assert flops / 989e12 < comp.prefill_s(1, 4096) < flops / 300e12
    assert comp.decode_s(64, 4096) > comp.decode_s(64, 1024) > comp.decode_s(1, 1024)


def test_tensor_parallel_import_and_json_round_trip(tmp_path):
    prof = import_aic("h100_sxm", "llama-3.1-70b", tp=4)
    assert prof.fit["source"]["kernels"]["allreduce"]
    again = CostProfile.load(prof.save(tmp_path / "aic.json"))
    assert again == prof and again.source == "imported"
    one = import_aic("h100_sxm", "llama-3.1-8b", tp=1)
    two = import_aic("h100_sxm", "llama-3.1-8b", tp=2)
    assert two.prefill_s([4096]) < one.prefill_s([4096])


@pytest.mark.parametrize("kwargs, message", [
    ({"gpu": "tpu_v5"}, "unknown GPU"),
    ({"framework": "tensorflow"}, "frameworks:"),
    ({"version": "0.0.1"}, "versions"),
    ({"tp": 3}, "divide"),
    ({"model": "no-such-model"}, "unknown model"),
    ({"model": "Qwen/Qwen3-30B-A3B"}, "mixture-of-experts"),
])
def test_bad_input_gives_clear_errors(kwargs, message):
    with pytest.raises(CalibrationError, match=message):
        import_aic(**kwargs)


def test_cli_import_aic_and_roofline(tmp_path):
    out = tmp_path / "h200.json"
    r = CliRunner().invoke(app, ["calibrate", "import-aic", "--gpu", "h200_sxm", "--model", "llama-3.1-8b", "--tp",
                                 "1", "--out", str(out)], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    assert "roofline" in r.output and "decode 32 @ 2048" in r.output and out.is_file()
    r = CliRunner().invoke(app, ["calibrate", "import-aic", "--gpu", "nope"])
    assert r.exit_code == 2 and "unknown GPU" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["calibrate", "roofline", "--hardware", "b200", "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 0 and CostProfile.load(tmp_path / "r.json").source == "roofline"
