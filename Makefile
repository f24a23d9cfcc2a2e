# The two commands: `make run` (the pipeline on the bundled data) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
UV_VERSION := 0.13.9
export PATH := $(BIN):$(PATH)

.PHONY: env tools run test test-slow test-all docs lab bench bench-nannyml-env lock lock-nannyml clean team-up team-down

# The environment: pinned versions from requirements.lock, mlnb itself editable, and a
# Jupyter kernel named `mlnb` inside the venv that papermill and JupyterLab use.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	@# --compile-bytecode: imports read .pyc made here once (with PYTHONDONTWRITEBYTECODE set, nothing would be cached later)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name mlnb --display-name "Python (mlnb)" >/dev/null
	touch $@

env: $(VENV)/.installed

# What the tests need beyond Python, from Debian's packages: promtool (package `prometheus`) checks the Prometheus config
# and alert rules in deploy/; a local PostgreSQL (role mlnb) backs the team-mode MLflow server the registry tests start.
# chromium: the documentation test opens the built site in it (headless) and takes screenshots.
tools:
	command -v promtool >/dev/null || (apt-get install -y --no-install-recommends prometheus || (apt-get update && apt-get install -y --no-install-recommends prometheus) || sudo apt-get install -y --no-install-recommends prometheus)
	command -v chromium >/dev/null || (apt-get install -y --no-install-recommends chromium || (apt-get update && apt-get install -y --no-install-recommends chromium) || sudo apt-get install -y --no-install-recommends chromium)
	bash deploy/team/postgres.sh

# Team mode on this machine: PostgreSQL and an MLflow tracking server on 127.0.0.1:5000 backed by it (docs/guides/team-mode.md).
team-up: env
	bash deploy/team/up.sh

team-down:
	bash deploy/team/down.sh

run: env
	dvc repro
	@echo
	mlnb summary

# The default suite leaves out the tests marked slow (long end-to-end and fault runs); CI runs those too, with `make test-slow`.
# lint-imports first: the package's layers (pyproject.toml [tool.importlinter]).
test: env tools
	lint-imports
	nbdev-test --n-workers 2
	pytest -m "not slow"

test-slow: env tools
	pytest -m slow

test-all: test test-slow

# The documentation site, built from the notebooks (with their stored outputs) and docs/guides/ by Sphinx: _docs/html/.
# It also writes README.md from nbs/index.ipynb.
docs: env
	python docs/build.py

lab: env
	jupyter lab

bench: env
	python benchmarks/onnx_vs_sklearn.py
	command -v wrk >/dev/null || (apt-get install -y wrk || sudo apt-get install -y wrk)
	python benchmarks/serve_bench.py
	python benchmarks/load_bench.py
	python benchmarks/log_writer_bench.py
	python benchmarks/request_cost_bench.py
	python benchmarks/cache_bench.py
	python benchmarks/drift_bench.py
	python benchmarks/batch_bench.py
	python benchmarks/monitor_bench.py
	python benchmarks/hpo_bench.py
	python benchmarks/robustness_bench.py
	python benchmarks/auth_bench.py
	python benchmarks/log_encryption_bench.py
	python benchmarks/datasets_bench.py
	$(MAKE) bench-nannyml-env
	python benchmarks/estimation_bench.py

# The benchmark-only venv that benchmarks/estimation_bench.py runs NannyML in (Python 3.11: NannyML 0.13.1 needs < 3.13),
# pinned in benchmarks/requirements-nannyml.txt. Not part of mlnb's environment; nothing else uses it.
NANNYML_VENV := .venv-nannyml
$(NANNYML_VENV)/.installed: benchmarks/requirements-nannyml.txt | $(VENV)/.installed
	test -x $(NANNYML_VENV)/bin/python || $(BIN)/uv venv --quiet --python $(PYTHON) $(NANNYML_VENV)
	$(BIN)/uv pip install --quiet --python $(NANNYML_VENV)/bin/python -r benchmarks/requirements-nannyml.txt
	touch $@

bench-nannyml-env: $(NANNYML_VENV)/.installed

# Re-resolve the pins after editing requirements.in.
lock: env
	$(BIN)/uv pip compile requirements.in --python-version 3.11 --quiet -o requirements.lock

lock-nannyml: env
	$(BIN)/uv pip compile benchmarks/requirements-nannyml.in --python-version 3.11 --exclude-newer 2025-08-01 --quiet -o benchmarks/requirements-nannyml.txt

clean:
	rm -rf $(VENV) $(NANNYML_VENV) data/processed features models reports mlruns.db mlruns mlartifacts
