# smsops: `make run` sets everything up and starts the app; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export SMSOPS_HOME ?= $(CURDIR)/data
CHROMIUM := /usr/bin/chromium

.PHONY: setup run demo build test lint format bench chromium clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

run: setup  ## demo data if the store is empty, dbt build, then the app on http://127.0.0.1:8501
	$(BIN)/smsops run

demo: setup
	$(BIN)/smsops demo --if-empty

build: setup
	$(BIN)/smsops build

chromium:  ## Debian's Chromium for the browser tests (Playwright's own download is not reachable)
	@test -x $(CHROMIUM) || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup chromium lint
	$(BIN)/pytest -n 2 --dist loadfile

bench: setup  ## benchmarks (not part of `make test`); figures go to docs/performance.md
	$(BIN)/pytest -m bench -p no:cacheprovider -s bench

clean:
	rm -rf $(VENV) data dbt_project/target dbt_project/logs
