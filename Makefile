# Two commands on a fresh machine: `make test` and `make serve`. Both build .venv first:
# torch==2.13.0 before anything else (a looser pin would pull a multi-GB CUDA build), then the
# project with its test extras.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.blockserve-installed
PROMPT ?= a red circle on a blue background

.PHONY: venv test unit integration lint serve demo loadtest clean

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

demo: $(STAMP)
	$(VENV)/bin/blockserve demo "$(PROMPT)" -o demo.png

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
