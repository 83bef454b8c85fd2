# secondstage — the two commands users need: `make serve` and `make test`.
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: serve test install demo lint bench bench-quick clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

## Build the demo model if no model is configured, then serve on 127.0.0.1:8000.
serve: $(STAMP)
	@if [ -z "$$SECONDSTAGE_MODEL" ]; then $(BIN)/secondstage model demo; fi
	$(BIN)/secondstage serve

## The whole suite: unit tests, then the real-engine and end-to-end tests.
test: $(STAMP)
	$(BIN)/secondstage model demo
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/secondstage model demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## Every benchmark (about 30 min on 2 idle cores): bench/results/*.json and one PNG each. Figures, never a failure.
bench: $(STAMP)
	$(BIN)/secondstage model demo
	$(BIN)/python -m bench.run_all

## The same chain at small sizes (a smoke run, about 5 min): proves every benchmark still runs.
bench-quick: $(STAMP)
	$(BIN)/secondstage model demo
	$(BIN)/python -m bench.run_all --quick

clean:
	rm -rf var/redis var/spool .pytest_cache
