# The two commands of the README: `make lab` and `make test`. Both set up what they need.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
SPEC ?= deployments/lab/platform.yaml
# Until phases 1 to 3 act on the lab, the main job runs in plan-only mode.
RUN_FLAGS ?= --plan-only

.PHONY: setup test lint typecheck unit bench lab down status plan schema clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/python -m pytest || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc; }

unit: setup
	$(BIN)/python -m pytest tests/unit

bench: setup
	@$(BIN)/python -m tests.bench

lab: setup
	$(BIN)/platformctl lab up $(SPEC)
	$(BIN)/platformctl lab run $(RUN_FLAGS) $(SPEC)

down: setup
	$(BIN)/platformctl lab down

status: setup
	$(BIN)/platformctl lab status $(SPEC)

plan: setup
	$(BIN)/platformctl plan $(SPEC)

schema: setup
	$(BIN)/platformctl schema -o deployments/platform.schema.json
