# The two commands of the README: `make lab` and `make test`. Both set up what they need.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
SPEC ?= deployments/lab/platform.yaml

.PHONY: setup test lint typecheck unit bench lab down status plan schema clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

# Tests and benchmarks run in a network namespace and /run of their own
# (scripts/own-namespaces.sh): their labs never meet the lab `make lab` keeps up.
test: setup lint typecheck
	scripts/own-namespaces.sh $(BIN)/python -m pytest || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc; }

unit: setup
	$(BIN)/python -m pytest tests/unit

bench: setup
	@scripts/own-namespaces.sh $(BIN)/python -m tests.bench

# The main job twice: plan-only (every phase publishes what it will do; Completed), then
# for real (phases not built yet stop the run with "phase N ... is not implemented yet").
lab: setup
	$(BIN)/platformctl lab up $(SPEC)
	$(BIN)/platformctl lab run --plan-only $(SPEC)
	$(BIN)/platformctl lab run $(SPEC)

down: setup
	$(BIN)/platformctl lab down

status: setup
	$(BIN)/platformctl lab status $(SPEC)

plan: setup
	$(BIN)/platformctl plan $(SPEC)

schema: setup
	$(BIN)/platformctl schema -o deployments/platform.schema.json
