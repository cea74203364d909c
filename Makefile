# `make test` and `make demo` work on a fresh machine: they create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench-fanout bench-balance clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: lint
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/xds-lab demo

# Style, types (strict on the product) and the import contracts (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check xds_server lrs xds_lab tests bench
	$(BIN)/ruff format --check xds_server lrs xds_lab tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench-fanout: $(STAMP)
	$(BIN)/python bench/fanout.py

# Balancing quality (issues 6, 15): ~19 minutes (ARGS=--quick: under 5); table and verdicts on
# stdout, JSON and PNGs in bench/results/ (matplotlib comes with the test extra).
bench-balance: $(STAMP)
	$(BIN)/python bench/balance.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
