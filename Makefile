# message_broker: `make run` serves, `make test` tests. Both set everything up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Each run gets a temporary directory of its own, removed afterwards: pytest's shared numbered
# directories under /tmp/pytest-of-$$USER get cleaned up by any other run of the same user, even
# while an embedded PostgreSQL still lives in one.
PYTEST = tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && $(BIN)/python -m pytest --basetemp="$$tmp"
BENCH_ARGS ?=
PGBOUNCER_TESTS ?= tests/integration tests/faults tests/pgbouncer
# The HA test cluster's manager; Debian's Python, whose packages Patroni needs (another python3 may come first on PATH).
HA := /usr/bin/python3 tests/ha/cluster.py

.PHONY: run verify test test-unit test-integration faults faults-ha ha-install ha-up ha-down pgbouncer-install pgbouncer-up pgbouncer-down test-pgbouncer test-browser db listen psql lint format bench install clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,embedded]'
	touch $(STAMP)

install: $(STAMP)

## run: migrate and serve on $$HOST:$$PORT (default 127.0.0.1:3333); embedded PostgreSQL under ./.pgdata unless DATABASE_URL is set
run: install
	$(BIN)/message-broker serve

## test: the whole suite against TEST_DATABASE_URL, or an embedded PostgreSQL when it is unset (fault scenarios: make faults, make faults-ha)
test: install
	$(PYTEST) -m "not faults and not browser" --ignore=tests/ha $(PYTEST_ARGS)

## faults: the fault scenarios (real server subprocesses, injected failures; installs Debian's pgbouncer when missing, for the many-processes scenario); FAULTS_REPORT=path keeps the figures
faults: install pgbouncer-install
	$(PYTEST) tests/faults -m faults $(PYTEST_ARGS)

## test-browser: the operator console in headless Chromium against the real server (installs Debian chromium and chromium-driver with apt when missing, and selenium); screenshots go to $$BROWSER_SCREENSHOTS or a printed temporary folder
test-browser: install
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "test-browser: install chromium and chromium-driver (apt), or run as root" >&2; exit 1; fi; \
		echo "test-browser: installing chromium and chromium-driver with apt"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi
	@$(BIN)/python -c 'import selenium' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[test,embedded,browser]'
	SE_OFFLINE=true $(PYTEST) tests/browser -m browser $(PYTEST_ARGS)

## ha-up: etcd, 3 Patroni nodes of PostgreSQL 15 (synchronous, strict) and HAProxy on 127.0.0.1, installed with apt if missing (root); idempotent; prints DATABASE_URL= and PATRONI_URLS= last
ha-up: ha-install
	$(HA) up

# etcd, Patroni, HAProxy and PostgreSQL 15 with apt, each only if missing
ha-install:
	@bash tests/ha/install.sh

## ha-down: stop the HA cluster and remove its data ($$HA_DIR, default /tmp/message_broker-ha)
ha-down:
	$(HA) down

## faults-ha: the failover scenarios against the HA cluster (installed with apt if missing, as root; started first if it is not running, and then stopped and removed at the end however the run ends), the combined random schedule for HA_COMBINED_S seconds (default 300; FAULTS_SEED replays one); FAULTS_HA_REPORT=path keeps the figures
# The EXIT trap brings down a cluster this run started: after the tests, a failing test, a failed `up`, or
# an interrupt (INT, TERM and HUP exit, so that the EXIT trap runs; the shell runs a trap only once its
# foreground command has ended, so pytest finishes its teardown first). make's exit status is the run's.
faults-ha: install ha-install
	@tmp=$$(mktemp -d); started=; $(HA) running || started=1; \
	trap 'if [ -n "$$started" ]; then $(HA) down; fi; rm -rf "$$tmp"' EXIT; \
	trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM; \
	$(HA) up --env-file "$$tmp/env" && . "$$tmp/env" && export DATABASE_URL PATRONI_URLS && \
	$(BIN)/python -m pytest --basetemp="$$tmp/pytest" tests/ha -m ha $(PYTEST_ARGS)

## pgbouncer-up: PgBouncer (Debian's, installed with apt if missing, as root) in transaction pooling on 127.0.0.1:$${PGBOUNCER_PORT:-6432} in front of the database make run uses (DATABASE_URL, else the embedded server, left running); prints DATABASE_URL= (through it) and LISTEN_DATABASE_URL= (direct) last
pgbouncer-up: install pgbouncer-install
	@$(BIN)/python -m tests.pgbouncer.bouncer up

# Debian's pgbouncer with apt, only if missing
pgbouncer-install:
	@bash tests/pgbouncer/install.sh

## pgbouncer-down: stop that PgBouncer (and the embedded server pgbouncer-up started, unless make run still uses it)
pgbouncer-down: install
	@$(BIN)/python -m tests.pgbouncer.bouncer down

## test-pgbouncer: the integration suite, the fault scenarios that make sense there and the many-processes scenario, with the service's pool through a PgBouncer of their own in transaction pooling (LISTEN direct)
test-pgbouncer: install pgbouncer-install
	export TEST_PGBOUNCER=1; $(PYTEST) -m "not browser" $(PGBOUNCER_TESTS) $(PYTEST_ARGS)

test-unit: install
	$(PYTEST) tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PYTEST) tests/integration $(PYTEST_ARGS)

## bench: the benchmark: the server over HTTP against pgbench baselines, one table (BENCH_DATABASE_URL or embedded)
bench: install
	$(BIN)/python -m message_broker.bench $(BENCH_ARGS)

## db: create the database if missing and apply pending migrations; with APP_DB_ROLE set, also create that least-privilege role
db: install
	$(BIN)/message-broker migrate
	@if [ -n "$$APP_DB_ROLE" ]; then $(BIN)/message-broker create-role; fi

## psql: psql on the service's database: DATABASE_URL, else the embedded server under EMBEDDED_DATA_DIR (started as make run would); the machine's psql, else the one the embedded package ships; ARGS='-c "..."' are passed on
psql: install
	$(BIN)/message-broker psql $(ARGS)

## verify: prove the balances from the history (USER_ID=<id> for one user); exit 1 on any problem
verify: install
	$(BIN)/message-broker verify $(if $(USER_ID),--user $(USER_ID),)

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
