# FieldSync — everything a new machine needs goes through these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test chaos demo scale-demo up bench lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make test: the whole suite against a real embedded PostgreSQL and broker started by the session
test: $(STAMP)
	$(BIN)/pytest -m "not chaos" $(PYTEST_ARGS)

## make chaos: the long fault-injection scenarios of the reliability suite (docs/reliability.md)
chaos: $(STAMP)
	$(BIN)/pytest -m chaos $(PYTEST_ARGS)

## make demo: embedded services, sample CRM source, capture, and what landed on which topic
demo: $(STAMP)
	$(BIN)/fieldsync demo

## make scale-demo: two projectors and two gateways, one projector killed mid-run; all converge
scale-demo: $(STAMP)
	$(BIN)/fieldsync scale-demo

## make up: keep the embedded PostgreSQL and broker running for real use (Ctrl-C stops them)
up: $(STAMP)
	$(BIN)/fieldsync up

## make bench: every benchmark; results in bench/results/
bench: $(STAMP)
	$(BIN)/python -m bench all

lint: $(STAMP)
	$(BIN)/ruff check engine gateway device bench tests
	$(BIN)/ruff format --check engine gateway device bench tests

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .fieldsync .pytest_cache
