# Two commands for a fresh machine (Linux, Python 3.11):
#   make pipeline   installs everything into .venv and runs `dvc repro` (synthetic demo data by default)
#   make test       installs everything into .venv and runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV)/bin)

# The stages call `gtzan-mlops` and `dvc`, so the environment's scripts come first on PATH.
export PATH := $(BIN):$(PATH)
# Nothing phones home: DVC analytics and MLflow telemetry are off (also set in .dvc/config).
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: help setup pipeline test lint format benchmark benchmark-serve benchmark-load \
	mlflow-ui serve listen \
	report clean-venv

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 24

$(VENV)/.installed: pyproject.toml requirements.lock requirements-nodeps.lock
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version + ": name another interpreter with make PYTHON=/path/to/python3.11 ..."'
	# The duplicates stage fingerprints clips with Chromaprint's fpcalc (a Debian package); the
	# script says what it installs and runs apt-get, through sudo when not root.
	command -v fpcalc >/dev/null || bash .ci/system-packages.sh libchromaprint-tools
	# The promote stage's behavioural check re-encodes test clips as MP3 with lame (Debian too).
	command -v lame >/dev/null || bash .ci/system-packages.sh lame
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	# pip compiles every installed module to bytecode one file at a time (about a minute for
	# TensorFlow and the rest, on 2 cores); compileall does the same on every core.
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.lock
	# The musicnn wheel carries the MSD_musicnn weights; its own pins (numpy<1.17) are not ours.
	$(BIN)/python -m pip install --quiet --no-compile --no-deps --require-hashes -r requirements-nodeps.lock
	$(BIN)/python -m pip install --quiet --no-compile --no-deps --editable .
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib
	# The same for commands run in the activated environment (`mlflow ui`, `mlflow run`, `dvc`).
	grep -q MLFLOW_DISABLE_TELEMETRY $(VENV)/bin/activate || printf '%s\n' \
	  'export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1' >> $(VENV)/bin/activate
	touch $@

setup: $(VENV)/.installed ## installs everything into .venv (pinned)

pipeline: setup ## dvc repro (the synthetic demo set unless params.yaml says otherwise)
	dvc repro

# Two pytest-xdist workers, a test file at a time, longest files first (tests/conftest.py): the
# end-to-end pipeline on one, the rest on the other; then the tests with wall-clock bounds
# (marker `timing`) alone. Both parts run even if the first fails. docs/testing.md has the times.
TEST_WORKERS ?= 2
test: setup ## the test suite (needs ../shared and .ci/system-packages.sh)
	status=0; \
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not timing" || status=$$?; \
	pytest -m timing || status=$$?; \
	exit $$status

lint: setup ## ruff check and format check, and the architecture's import contracts
	ruff check src tests benchmarks tools
	ruff format --check src tests benchmarks tools
	lint-imports

format: setup ## ruff format and fix
	ruff format src tests benchmarks tools
	ruff check --fix src tests benchmarks tools

benchmark: setup ## feature extraction speed (benchmarks/extract.py)
	python benchmarks/extract.py

# The served champion's latency (p50/p95 per 30 s clip) and memory; no champion yet:
#   make benchmark-serve SERVE_ARGS=--build-demo-champion
benchmark-serve: setup ## served model latency and memory (benchmarks/serve.py)
	python benchmarks/serve.py $(SERVE_ARGS)

# Memory, 429s and latency of the served champion under 1, 4 and 8 clients of 30 s clips and
# 10-minute songs, with decompression bombs (benchmarks/serve_load.py; needs a champion).
benchmark-load: setup ## served champion under load: memory, 429s, latency
	python benchmarks/serve_load.py --bombs $(SERVE_LOAD_ARGS)

mlflow-ui: setup ## the MLflow UI of mlruns/ on http://127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///$(abspath mlruns/mlflow.db) --host 127.0.0.1 --port 5000

serve: setup ## the champion on MLflow's scoring app, guarded, 127.0.0.1:5001 (SERVE_OPTIONS=...)
	gtzan-mlops serve $(SERVE_OPTIONS)

listen: setup ## the listening page of the champion on http://127.0.0.1:5003
	gtzan-mlops listen $(LISTEN_OPTIONS)

report: setup ## the reproduction table, reports/reproduction/ (REPORT_OPTIONS=...)
	gtzan-mlops report $(REPORT_OPTIONS)

clean-venv: ## removes .venv
	rm -rf $(VENV)
