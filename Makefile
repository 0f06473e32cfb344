# Local workflow: `make run` brings the whole platform up from a clean clone,
# `make test` is what CI runs (.ci/run). Every target builds what it needs, so
# none of them assumes an activated virtualenv or an earlier step.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PYTHON ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQUIREMENTS := requirements.txt requirements-dev.txt
# Lazily evaluated: only looked up when the virtualenv has to be created.
BASE_PYTHON = $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
# The stdlib-only scripts may run before the virtualenv exists (fail fast on services).
STDLIB_PYTHON = $(if $(wildcard $(PYTHON)),$(PYTHON),$(BASE_PYTHON))
WEB_PORT ?= 8000
FLOWER_PORT ?= 5555
# [observability] Prometheus multiprocess directory of `make run`: web and worker processes
# write their samples there, the web's /metrics merges them. Emptied at every start, so a
# previous run's processes are not counted again.
METRICS_DIR ?= $(CURDIR)/.make/prometheus

.PHONY: help venv services setup run test lint bench clean

help:
	@echo "make run       set everything up, seed demo data, start web/worker/beat/flower"
	@echo "make test      set up, lint, run the test suite (what CI runs)"
	@echo "make setup     virtualenv, service check, .env, database, migrations, static files"
	@echo "make venv      create .venv / reinstall when a requirements file changed"
	@echo "make services  check that PostgreSQL and RabbitMQ answer"
	@echo "make lint      ruff check"
	@echo "make bench     run the benchmarks"
	@echo "make clean     remove .venv and staticfiles/"

venv: $(STAMP)

$(VENV)/bin/python:
	@test -n "$(BASE_PYTHON)" || { echo "python3.11 (or python3) is not on PATH" >&2; exit 1; }
	$(BASE_PYTHON) -m venv $(VENV)

# The stamp is newer than both requirements files after a successful install, so
# editing either one (and only that) triggers a reinstall.
$(STAMP): $(REQUIREMENTS) | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --upgrade pip \
		|| echo "warning: could not upgrade pip, continuing with the installed one" >&2
	$(VENV)/bin/python -m pip install -r requirements-dev.txt
	touch $@

services:
	@$(STDLIB_PYTHON) scripts/check_services.py

setup: services venv
	$(PYTHON) scripts/bootstrap_env.py
	$(PYTHON) scripts/ensure_database.py
	$(PYTHON) manage.py migrate --noinput
	$(PYTHON) manage.py collectstatic --noinput --verbosity 0

# honcho gives .env precedence over the shell environment, so the printed ports
# and Flower user come from .env first, like the processes will see them.
run: setup
	$(PYTHON) manage.py seed_demo
	@dotenv() { sed -n "s/^$$1=//p" .env | tail -n 1; }; \
	web_port=$$(dotenv WEB_PORT); web_port=$${web_port:-$(WEB_PORT)}; \
	flower_port=$$(dotenv FLOWER_PORT); flower_port=$${flower_port:-$(FLOWER_PORT)}; \
	flower_user=$$(dotenv FLOWER_BASIC_AUTH); flower_user=$${flower_user%%:*}; \
	echo; \
	echo "  Web       http://127.0.0.1:$$web_port/"; \
	echo "  Admin     http://127.0.0.1:$$web_port/admin/"; \
	echo "  API docs  http://127.0.0.1:$$web_port/api/docs/"; \
	echo "  Dashboard http://127.0.0.1:$$web_port/admin/eventing/dashboard/"; \
	echo "  Metrics   http://127.0.0.1:$$web_port/metrics  (Flower's own: http://127.0.0.1:$$flower_port/metrics)"; \
	echo "  Flower    http://127.0.0.1:$$flower_port/  user: $${flower_user:-?}," \
		"password: the part after ':' of FLOWER_BASIC_AUTH in $(CURDIR)/.env"; \
	echo "  Stop everything with Ctrl-C."; \
	echo
	rm -rf "$(METRICS_DIR)" && mkdir -p "$(METRICS_DIR)"
	PROMETHEUS_MULTIPROC_DIR="$(METRICS_DIR)" exec $(VENV)/bin/honcho start

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench: setup
	$(PYTHON) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) staticfiles
