# disagg — set-up, run, test, benchmark. `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean

# torch first, from the local CPU wheel (a plain `pip install torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,aic,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/disagg simulate sim/configs/llama8b-h100-colocated.yaml sim/configs/llama8b-h100-2p2d.yaml --out out/run

test: $(STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) bench/sim_bench.py
	$(PY) bench/calibrate_bench.py
	$(PY) bench/engine_bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check sim
	$(VENV)/bin/mypy sim

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
