"""The dashboard: every page under Streamlit's AppTest with defaults and with a bad file (a readable error, never a
traceback), and the real app in headless Chromium until the plan's recommendation renders (screenshot saved)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "dashboard" / "pages"
SHOTS = ROOT / "out" / "screenshots"


@pytest.fixture(scope="module", autouse=True)
def plan_cache(tmp_path_factory):
    old = os.environ.get("DISAGG_CACHE")
    os.environ["DISAGG_CACHE"] = str(tmp_path_factory.mktemp("plan_cache"))
    yield os.environ["DISAGG_CACHE"]
    if old is None:
        os.environ.pop("DISAGG_CACHE", None)
    else:
        os.environ["DISAGG_CACHE"] = old


def run_page(name, **inputs):
    at = AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=240)
    at.run()
    for key, value in inputs.items():
        at.text_input(key=key).set_value(value)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_plan_page_defaults_show_a_recommendation():
    at = run_page("plan")
    assert any("Recommendation:" in s.value for s in at.success)
    assert at.dataframe and not at.error


@pytest.mark.parametrize("page", ["compare", "explain", "explorer"])
def test_pages_render_with_defaults(page):
    at = run_page(page)
    assert not at.error


@pytest.mark.parametrize("page", ["calibration", "validation"])
def test_pages_without_data_say_what_to_run(page):
    at = run_page(page)
    assert any("disagg" in i.value for i in at.info)


@pytest.mark.parametrize("page, key, what", [
    ("plan", "plan_prof_path", "cost profile"),
    ("plan", "plan_model_cfg_path", "model config"),
    ("calibration", "cal_file_path", "cost profile"),
    ("validation", "val_path", "validate report"),
    ("explorer", "rx_path", "run folder"),
])
def test_bad_files_give_a_readable_error(tmp_path, page, key, what):
    bad = tmp_path / "bad.json"
    bad.write_text("{ this is not json")
    target = tmp_path if page in ("validation", "explorer") else bad
    at = run_page(page, **{key: str(target)})
    assert any(f"Could not read the {what}" in e.value for e in at.error), [e.value for e in at.error]


def test_bad_topology_label_gives_a_readable_error():
    at = run_page("compare", cmp_labels="2C, 3X")
    assert any("topology label" in e.value for e in at.error)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
def test_browser_renders_the_recommendation(tmp_path, plan_cache):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian chromium + chromium-driver (make test installs them as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    port = _free_port()
    env = {**os.environ, "DISAGG_CACHE": plan_cache}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"),
                               "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless",
                               "true", "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1100"):
        opts.add_argument(flag)
    browser = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=opts)
        browser.get(f"http://127.0.0.1:{port}/")
        deadline = time.time() + 240
        found = False
        while time.time() < deadline and not found:
            found = "Recommendation:" in browser.find_element(By.TAG_NAME, "body").text
            time.sleep(1)
        assert found, "the recommendation never rendered"
        time.sleep(3)  # let the charts draw
        SHOTS.mkdir(parents=True, exist_ok=True)
        shot = SHOTS / "dashboard_plan.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=20)


def test_validation_page_shows_a_report_with_and_without_host_speed(tmp_path):
    from sim import PRESETS, Topology, Workload, constant_profile, simulate
    from validate.compare import compare
    from validate.report import write
    from validate.runner import RunResult, ValidationReport

    w = Workload.from_lists([0.0, 0.1, 0.2], [10, 20, 30], [4, 4, 4])
    topo = Topology.colocated(1, kv_capacity_tokens=1000)
    real = simulate(topo, w, constant_profile(0.02, 0.01), model=PRESETS["tiny"]).records
    sim = simulate(topo, w, constant_profile(0.018, 0.011), model=PRESETS["tiny"]).records
    other = simulate(topo, w, constant_profile(0.022, 0.011), model=PRESETS["tiny"]).records  # a second "seed"
    errors = {**compare(real, [sim, other]), "without_host_speed": compare(real, real)["errors"],
              "with_run_step_speed": compare(real, real)["errors"]}
    report = ValidationReport(constant_profile(0.02, 0.01), {"1C": 10.0}, [RunResult("1C", 0.5, 5.0, 0, real, sim, errors)],
                              config={"sim_seeds": 2})
    write(report, tmp_path)
    at = run_page("validation", val_path=str(tmp_path))
    assert not at.error
    table = at.dataframe[1].value
    assert table["ttft_p50 without host speed"].tolist() == [0.0]
    assert table["tpot_p50"].tolist() == [pytest.approx(errors["errors"]["tpot_p50"])]
    assert table["tpot_p50 at the run's step speed"].tolist() == [0.0]
    means = at.dataframe[2].value  # mean |error| per simulation over the runs
    assert means["simulated"].tolist() == ["as predicted", "at the run's step speed", "no host speed"]
    assert means["tpot_p50"].tolist() == [pytest.approx(abs(errors["errors"]["tpot_p50"])), 0.0, 0.0]
    noise = at.dataframe[3].value  # the simulator's spread over its seeds (no --repeat here, so no real spread)
    assert noise["spread"].tolist() == ["simulator, 2 seeds: sd / mean"] and noise["point"].tolist() == ["1C@0.5"]
    assert noise["ttft_p50"].tolist() == [pytest.approx(errors["sim_spread"]["ttft_p50"])] and errors["sim_spread"]["ttft_p50"] > 0
