# Two commands on a fresh machine: `make test` and `make serve`. Both build .venv first:
# torch==2.13.0 before anything else (a looser pin would pull a multi-GB CUDA build), then the
# project with its test extras.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.blockserve-installed
PROMPT ?= a red circle on a blue background

.PHONY: venv test unit integration lint serve demo loadtest gpu-check gpu-wheels clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP)
	$(PY) -m pytest tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The HTTP API on the default models file (the trained tiny shapes model from assets/, then a
# random-weight tiny SD model written on first start);
# BLOCKSERVE_* variables apply (e.g. BLOCKSERVE_PORT, BLOCKSERVE_MODELS_FILE, BLOCKSERVE_API_KEYS).
serve: $(STAMP)
	$(VENV)/bin/blockserve serve

# Locust, headless, against a `blockserve serve` it starts on a free loopback port and stops:
# results in loadtests/results/<timestamp>/ (CSVs + summary.md). MODELS= picks a models file
# (default: the built-in one); LOADTEST_WEIGHT_{TEXT2IMAGE,EDIT,STREAM} set the request mix.
DURATION ?= 60
USERS ?= 6
SPAWN_RATE ?= 2
MODELS ?=
RESULTS ?= loadtests/results
loadtest: $(STAMP)
	$(PY) loadtests/run.py --duration $(DURATION) --users $(USERS) --spawn-rate $(SPAWN_RATE) \
		--results $(RESULTS) $(if $(MODELS),--models $(MODELS))

# The GPU check (bench/gpu_check.py): real-size SD 1.5 and FLUX.2 [klein] with random weights
# on CUDA, at most 8 minutes on one H200; reports in $OUT, else bench/results/gpu-check-full.
# GPU_CHECK_ARGS adds options (--budget-s 300, --only sd, --smoke, ...). It runs on .venv when
# there is one, else on python3 (a CUDA image with torch: see gpu-wheels).
GPU_CHECK_ARGS ?=
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# What a CUDA image with Python 3.12, torch and transformers but no internet lacks for the GPU
# check, as wheels in .whl/ (the versions of this .venv). There:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
# ray (for the weight_pool check) is left out: its wheel alone is ~80 MB.
GPU_WHEEL_PACKAGES = diffusers fastapi starlette pydantic pydantic-core annotated-types \
	annotated-doc typing-inspection typing-extensions opentelemetry-api python-multipart \
	fastapi-offline
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $$($(PY) -c "from importlib.metadata import \
		version; print(' '.join(f'{p}=={version(p)}' for p in '$(GPU_WHEEL_PACKAGES)'.split()))")

demo: $(STAMP)
	$(PY) -m blocks.demo "$(PROMPT)" -o demo.png

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
