"""The import directions of STYLE.md, enforced on the source (static: every import statement, top level or not)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "sim": {"torch", "vllm", "streamlit", "engine", "calibrate", "dashboard", "validate", "ray"},
    "engine": {"simpy", "calibrate", "dashboard", "validate", "streamlit"},
    "calibrate": {"dashboard", "validate", "streamlit", "simpy"},
    "dashboard": {"torch", "engine", "vllm"},
}
# Files allowed one of their package's forbidden imports: Ray stays out of the simulator except the one optional
# module that joins a cluster and runs planner jobs as tasks (imported only when --ray is asked for).
ALLOWED = {"sim/ray_jobs.py": {"ray"}}


def imports_of(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_directions(package):
    bad = []
    for f in sorted((ROOT / package).rglob("*.py")):
        hit = imports_of(f) & FORBIDDEN[package] - ALLOWED.get(str(f.relative_to(ROOT)), set())
        if hit:
            bad.append(f"{f.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, "\n".join(bad)


def test_calibrate_never_simulates():
    for f in (ROOT / "calibrate").rglob("*.py"):
        text = f.read_text()
        assert "sim.simulator" not in text and "simulate(" not in text, f"{f} runs the simulator"


def test_no_pickle_in_library_code():
    for package in ("sim", "engine", "calibrate", "dashboard", "validate", "disagg_cli"):
        for f in (ROOT / package).rglob("*.py") if (ROOT / package).exists() else []:
            assert not ({"pickle", "cloudpickle", "dill"} & imports_of(f)), f"{f} imports pickle"
