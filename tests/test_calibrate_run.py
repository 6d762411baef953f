"""A real short calibration of the tiny model on this CPU (model runner, shm/tcp transports), the profile it writes
used by the simulator, the CLI, and the errors users get for bad input."""

import json
import math

import pytest

pytest.importorskip("torch")

import pyarrow.parquet as pq
from typer.testing import CliRunner

import calibrate
from calibrate import CalibrationError
from calibrate.samples import SAMPLE_SCHEMA
from disagg_cli.main import app
from sim.cost_profile import CostProfile
from sim.request import Workload
from sim.topology import Topology

BUDGET_S = 25.0


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles") / "tiny-cpu-bf16.json"
    return calibrate.run("tiny", device="cpu", dtype="bf16", budget_s=BUDGET_S, out=out, seed=0)


def test_short_calibration_writes_a_profile_and_every_sample(calibrated):
    res = calibrated
    assert res.wall_s < BUDGET_S * 1.25
    prof = CostProfile.load(res.profile_path)
    assert prof.source == "calibrated" and prof.model.name == "tiny" and prof.dtype == "bf16"
    assert prof.prefill.a_s > 0 and prof.prefill.b_s > 0 and all(p.c_s > 0 for p in prof.decode)
    for phase in ("prefill", "decode"):
        info = prof.fit[phase]
        assert info["fit_points"] >= 4 and info["heldout_points"] >= 1 and info["rounds"] >= 3
        assert math.isfinite(info["heldout_mape"]) and info["heldout_mape"] < 0.5  # sanity; figures in the report
    env = prof.environment
    assert {"device_name", "cpu_cores", "torch_version", "dtype", "torch_threads", "git_revision",
            "date_utc"} <= set(env) and env["torch_threads"] == 1
    derived = prof.fit["derived"]
    assert derived["copy_bytes_per_s"] > 0 and all(x > 0 for x in derived["decode_kv_bytes_per_s"])
    table = pq.read_table(res.samples_path)
    assert table.schema.names == SAMPLE_SCHEMA.names
    phases = set(table.column("phase").to_pylist())
    assert {"prefill", "decode"} <= phases
    assert prof.meta["samples_file"] == res.samples_path.name


def test_transports_are_measured_against_the_copy_ceiling(calibrated):
    prof = calibrated.profile
    links = prof.fit["links"]
    assert links["copy_ceiling_bytes_per_s"] > 0
    for kind in ("shm", "tcp"):
        if "error" in links.get(kind, {}):
            pytest.fail(f"{kind}: {links[kind]['error']}")
        assert prof.links[kind].bandwidth_bytes_per_s > 1e7 and prof.links[kind].latency_s >= 0
        assert len(links[kind]["sizes"]) >= 4 and links[kind]["sizes"][0] == 4096


def test_profile_json_round_trips(calibrated, tmp_path):
    prof = CostProfile.load(calibrated.profile_path)
    again = CostProfile.load(prof.save(tmp_path / "again.json"))
    assert again == prof
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(calibrated.profile_path.read_text())


def test_the_simulator_uses_the_calibrated_profile(calibrated):
    import sim

    prof = CostProfile.load(calibrated.profile_path)
    wl = Workload.from_lists([0.05 * i for i in range(20)], [64 + 16 * (i % 5) for i in range(20)], [8] * 20)
    res = sim.simulate(Topology.colocated(1, kv_capacity_tokens=8192), wl, prof, model=prof.model, seed=0)
    assert res.summary["completed"] == 20
    ttft = res.records.column("first_token_s").to_numpy() - res.records.column("arrival_s").to_numpy()
    assert (ttft >= prof.prefill_s([64]) * 0.999).all()


def test_cli_show_prints_the_fit_table(calibrated):
    r = CliRunner().invoke(app, ["calibrate", "show", str(calibrated.profile_path)], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    assert "held-out" in r.output and "prefill" in r.output and "transfer shm" in r.output


def test_cli_run_end_to_end(tmp_path):
    out = tmp_path / "p.json"
    r = CliRunner().invoke(app, ["calibrate", "run", "--budget-s", "10", "--transport", "none", "--out", str(out)],
                           env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    assert out.is_file() and (tmp_path / "p.samples.parquet").is_file()
    assert "decode KV read" in r.output and CostProfile.load(out).links == {}


@pytest.mark.slow
def test_cli_run_with_a_serving_calibration(tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(app, ["calibrate", "run", "--budget-s", "15", "--transport", "shm", "--serving-s", "5",
                                 "--out", str(out)], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    prof = CostProfile.load(out)
    assert prof.name.endswith(":serving-colocated") and prof.fit["method"] == "engine steps (u)"
    assert "shm" in prof.links and prof.fit["links"]["shm"]["sizes"]  # the grid run's measured transport is kept
    assert prof.fit["base"]["prefill"]["heldout_points"] > 0  # and its fit figures
    assert len(prof.prefill_dispersion) == 41 and "prefill steps / fitted time: p10" in r.output
    # the workers' wait for their cores, printed when the host had enough other work to measure it against
    assert (prof.core_wait is not None) == ("core_wait" in r.output)
    steps = list((tmp_path / "s.serving-steps").glob("*.jsonl"))
    assert {p.stem for p in steps} == {f"C{i}" for i in range(len(steps))} and steps[0].stat().st_size > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, "unknown device"),
    ({"device": "cuda"}, "use --device cpu"),
    ({"dtype": "int4"}, "unknown dtype"),
    ({"budget_s": 0}, "positive number"),
    ({"budget_s": 0.3}, "too small"),
    ({"model": "llama-3.1-8b"}, "shape-only preset"),
    ({"model": "/nonexistent/model"}, "no such file"),
    ({"transports": ["udp"]}, "unknown transport"),
])
def test_bad_input_gives_clear_errors(kwargs, message):
    import torch

    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CalibrationError, match=message):
        calibrate.run(**{"transports": [], **kwargs})


def test_missing_weights_and_cli_errors_have_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CalibrationError, match="no \\*.safetensors"):
        calibrate.run(str(tmp_path), transports=[])
    r = CliRunner().invoke(app, ["calibrate", "run", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["calibrate", "show", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "no such cost profile" in r.output
    r = CliRunner().invoke(app, ["calibrate", "run", "--serving-s", "-1"])
    assert r.exit_code == 2 and "--serving-s must be >= 0" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["calibrate", "run", "--serving-s", "5", "--device", "cuda"])
    assert r.exit_code == 2 and "use it with --device cpu" in r.output


@pytest.mark.gpu
def test_cuda_calibration_when_a_gpu_is_lent(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    res = calibrate.run("tiny", device="cuda", dtype="bf16", budget_s=40, out=tmp_path / "cuda.json", transports=[])
    prof = res.profile
    assert prof.hardware.startswith("cuda:") and prof.memory_bytes > 0
    assert prof.fit["prefill"]["heldout_mape"] < 0.5 and prof.fit["decode"]["heldout_mape"] < 0.5
