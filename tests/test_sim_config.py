"""Config files: the shipped examples run; every bad input names the file and the key."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from disagg_cli.main import app
from sim.config import ConfigError, load_config
from sim.simulator import simulate

CONFIGS = Path(__file__).parents[1] / "sim" / "configs"

BASE = {
    "model": "tiny",
    "hardware": {"constant": {"prefill_s": 0.05, "decode_step_s": 0.01}},
    "workload": {"generator": {"arrival": {"kind": "poisson", "rate_rps": 5},
                               "prompt": {"kind": "uniform", "low_tokens": 10, "high_tokens": 100},
                               "output": {"kind": "fixed", "tokens": 5}}, "num_requests": 50},
    "topology": {"kind": "disaggregated", "prefill": {"instances": 1, "kv_capacity_tokens": 4096},
                 "decode": {"instances": 1, "kv_capacity_tokens": 4096}, "link": "eth25"},
    "slo": {"ttft_ms": 500, "tpot_ms": 50},
    "seed": 3,
}


def write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert len(cfg.workload) > 0 and cfg.topology.gpus >= 1


def test_generator_config_runs(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    res = simulate(cfg.topology, cfg.workload, cfg.profiles, model=cfg.model, slo=cfg.slo, seed=cfg.seed)
    assert res.summary["completed"] == 50 and res.summary["topology"] == "1P1D"


def test_first_token_from_decode_lengthens_ttft(tmp_path):
    """``topology.first_token: decode`` (vLLM's P/D): TTFT then includes the KV transfer and a decode step."""
    runs = {}
    for where in ("prefill", "decode"):
        cfg = load_config(write(tmp_path, {**BASE, "topology": {**BASE["topology"], "first_token": where}}))
        assert cfg.topology.first_token == where
        runs[where] = simulate(cfg.topology, cfg.workload, cfg.profiles, model=cfg.model, seed=cfg.seed).records
    ttft = {k: (r.column("first_token_s").to_numpy() - r.column("arrival_s").to_numpy()) for k, r in runs.items()}
    assert (ttft["decode"] >= ttft["prefill"] + 0.01 - 1e-9).all()  # + the transfer and at least one 10 ms step


@pytest.mark.parametrize("patch,message", [
    ({"model": "llama-9000"}, "unknown model 'llama-9000'"),
    ({"hardware": "tpu-v9"}, "unknown preset 'tpu-v9'"),
    ({"topology": {"kind": "disaggregated", "prefill": {"instances": 0}, "decode": {}}}, "topology.prefill.instances"),
    ({"topology": {"kind": "colocated"}}, "needs a 'colocated' pool"),
    ({"topology": {"kind": "mesh", "colocated": {}}}, "topology.kind"),
    ({"workload": {"num_requests": 3}}, "exactly one of 'trace' or 'generator'"),
    ({"workload": {"trace": "no-such-trace.csv"}}, "no-such-trace"),
    ({"slo": {"ttft_ms": -1}}, "slo.ttft_ms"),
    ({"seeed": 1}, "seeed"),
    ({"topology": {**BASE["topology"], "router": "psychic"}}, "unknown router policy 'psychic'"),
    ({"topology": {**BASE["topology"], "first_token": "router"}}, "topology.first_token"),
    ({"workload": {"generator": {"arrival": {"kind": "poisson", "rate_rps": 5},
                                 "prompt": {"kind": "fixed", "tokens": -3}, "output": {"kind": "fixed", "tokens": 1}},
                   "num_requests": 5}}, "tokens"),
])
def test_bad_configs_name_file_and_key(tmp_path, patch, message):
    p = write(tmp_path, {**BASE, **patch})
    with pytest.raises((ConfigError, ValueError)) as e:
        cfg = load_config(p)
        simulate(cfg.topology, cfg.workload, cfg.profiles, model=cfg.model)
    assert message in str(e.value)
    if isinstance(e.value, ConfigError):
        assert str(p) in str(e.value)


def test_missing_required_key(tmp_path):
    cfg = dict(BASE)
    del cfg["topology"]
    with pytest.raises(ConfigError, match=r"c\.yaml: topology: Field required"):
        load_config(write(tmp_path, cfg))


def test_weights_do_not_fit(tmp_path):
    p = write(tmp_path, {**BASE, "model": "llama-3.1-70b", "hardware": "l40s",
                         "topology": {"kind": "colocated", "colocated": {"instances": 1}}})
    with pytest.raises(ConfigError, match="do not fit"):
        cfg = load_config(p)
        simulate(cfg.topology, cfg.workload, cfg.profiles, model=cfg.model)


def test_cli_simulate_writes_outputs_and_reports_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["simulate", str(write(tmp_path, BASE)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "records.parquet").exists() and (out / "summary.json").exists()
    assert "1P1D" in res.output and "TTFT" in res.output
    bad = runner.invoke(app, ["simulate", str(write(tmp_path, {**BASE, "model": "nope"}, "bad.yaml"))])
    assert bad.exit_code == 2 and "bad.yaml" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(app, ["simulate", str(tmp_path / "absent.yaml")])
    assert missing.exit_code == 2 and "no such config file" in missing.output
