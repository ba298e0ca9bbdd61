# qdsize: `make test` and `make quickstart` set everything up from nothing (venv, install) and run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: test quickstart install bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

quickstart: export QDSIZE_HOME ?= $(CURDIR)/.qdsize
quickstart: $(STAMP)
	$(BIN)/python -m qdsize.platform.quickstart

bench: $(STAMP)
	$(BIN)/python benchmarks/dse_vs_debyecalculator.py

lint: $(STAMP)
	$(BIN)/ruff check sim ml platform tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
