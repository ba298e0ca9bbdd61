# qdsize: `make test` and `make quickstart` set everything up from nothing (venv, install) and run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: test quickstart install bench lint clean

# torch with pip, pinned, so that pip's own configuration applies (a machine may keep a CPU wheel of it on disk, where
# uv does not look) and nothing asked for later pulls another build; then uv installs the ~200 other packages in
# well under a minute where pip takes minutes
UV_INSTALL := $(BIN)/uv pip install -q --python $(BIN)/python

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 uv
	$(UV_INSTALL) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20

quickstart: export QDSIZE_HOME ?= $(CURDIR)/.qdsize
quickstart: $(STAMP)
	$(BIN)/python -m qdsize.platform.quickstart

bench: $(STAMP)
	$(BIN)/python benchmarks/dse_vs_debyecalculator.py

lint: $(STAMP)
	$(BIN)/ruff check sim ml platform tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
