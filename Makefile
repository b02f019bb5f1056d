# `make help` lists the targets. Every target sets up .venv first (pinned by requirements.lock).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Offline machines keep MNIST beside the checkout; elsewhere the public mirrors serve it.
MNIST_MIRROR ?= $(if $(wildcard ../shared/mnist),$(abspath ../shared/mnist))
export MNIST_MIRROR

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint plots clean ui bench

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c requirements.lock -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create .venv if missing and install the project, pinned

run: install ## Run the whole pipeline (dvc repro) on the defaults, then summarise
	dvc repro
	mnist-pipeline summary

test: install ## Run the whole test suite (unit, then integration)
	pytest

test-fast: install ## Only the unit tests: no training, servers or Ray (under 2 minutes)
	pytest -m "not slow"

lint: install ## ruff and mypy
	ruff check . && ruff format --check . && mypy

plots: install ## Render the DVC plots to dvc_plots/index.html
	dvc plots show

clean: ## Remove pipeline outputs (not .venv, the DVC cache or the MLflow store)
	rm -rf data models metrics plots reports .ray_results dvc_plots

bench: install ## Run the benchmarks, results in bench/results/ (about an hour on 2 CPUs)
	$(VENV)/bin/python -m bench.training.run
	$(VENV)/bin/python -m bench.pipeline
	$(VENV)/bin/python -m bench.serving.run
	@if $(VENV)/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; \
	then $(VENV)/bin/python -m bench.gpu; else echo "no CUDA device: bench.gpu skipped"; fi
	$(VENV)/bin/python -m bench.accuracy

ui: install ## Browse the MLflow UI of the embedded store (http://127.0.0.1:5000)
	mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000
